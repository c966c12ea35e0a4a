"""Convert facenet-pytorch's MTCNN weights (pnet/rnet/onet.pt) into one file for our networks.

    python -m launch.convert_mtcnn_weights /tmp/wheels/facenet_pytorch-2.6.0-py3-none-any.whl \\
        --out stages/vision/weights/mtcnn.pt

The source is a facenet-pytorch wheel (read in place, nothing is installed or imported), a
directory holding the three ``.pt`` files, or, when omitted, the ``data`` directory of an
installed ``facenet_pytorch`` package (located without importing it, so torchvision is not
needed). Provenance of the weights: Zhang et al.'s Caffe MTCNN models, converted to
TensorFlow by davidsandberg/facenet (``det1/2/3.npy``, MIT) and from there to PyTorch by
facenet-pytorch (MIT, © 2019 Timothy Esler).

facenet-pytorch's RNet and ONet flatten the last conv map in (W, H, C) order, a leftover
of the TensorFlow layout, and pay a permute + copy per call for it. This converter permutes
the input columns of the first dense layer (``rnet.dense4``, ``onet.dense5``) to PyTorch's
plain (C, H, W) flatten order instead; every other tensor is copied unchanged. Before
writing, it checks both dense layers on random conv maps against the original column order
and loads each network strictly, so a mismatched file is refused, not silently ported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import logging
import sys
import zipfile
from pathlib import Path

import torch

from stages.vision.mtcnn_nets import NETWORKS
from stages.weights import load_state

log = logging.getLogger("convert_mtcnn_weights")

DENSE_AFTER_CONV: dict[str, tuple[str, tuple[int, int, int]]] = {
    "rnet": ("dense4", (64, 3, 3)),
    "onet": ("dense5", (128, 3, 3)),
}
"""Network -> (dense layer fed by the last conv map, that map's (C, H, W) shape)."""


def read_sources(source: Path | None) -> dict[str, tuple[bytes, str]]:
    """Raw bytes and a display name of ``{pnet,rnet,onet}.pt`` from a wheel, a directory or the installed package."""
    if source is None:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("facenet_pytorch is not installed; pass a wheel or a directory")
        source = Path(next(iter(spec.submodule_search_locations))) / "data"
    if source.is_dir():
        return {name: ((source / f"{name}.pt").read_bytes(), str(source / f"{name}.pt")) for name in NETWORKS}
    with zipfile.ZipFile(source) as wheel:
        return {name: (wheel.read(f"facenet_pytorch/data/{name}.pt"), f"{source.name}!facenet_pytorch/data/{name}.pt")
                for name in NETWORKS}


def flatten_chw_columns(weight: torch.Tensor, chw: tuple[int, int, int]) -> torch.Tensor:
    """Reorder a dense weight's input columns from (W, H, C) flatten order to (C, H, W)."""
    channels, height, width = chw
    return weight.reshape(-1, width, height, channels).permute(0, 3, 2, 1).reshape(weight.shape[0], -1).contiguous()


def convert(sources: dict[str, bytes]) -> dict[str, dict[str, torch.Tensor]]:
    """Load the three facenet-pytorch state dicts and return ``{"pnet": sd, "rnet": sd, "onet": sd}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in NETWORKS:
        # weights_only: refuse pickled code in a downloaded file.
        state = dict(torch.load(io.BytesIO(sources[name]), map_location="cpu", weights_only=True))
        if name in DENSE_AFTER_CONV:
            dense, chw = DENSE_AFTER_CONV[name]
            original = state[f"{dense}.weight"]
            converted = flatten_chw_columns(original, chw)
            conv_map = torch.randn(4, *chw)
            expected = conv_map.permute(0, 3, 2, 1).reshape(4, -1) @ original.T  # facenet-pytorch's order
            if not torch.allclose(conv_map.reshape(4, -1) @ converted.T, expected, atol=1e-5):
                raise ValueError(f"{name}.{dense}: column permutation does not reproduce the reference")
            state[f"{dense}.weight"] = converted
        # Strict load proves every parameter of our network came from the file.
        load_state(NETWORKS[name](), state, f"converted {name}")
        out[name] = state
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, nargs="?",
                        help="facenet_pytorch-*.whl or a directory with pnet/rnet/onet.pt "
                             "(default: the installed facenet_pytorch package)")
    parser.add_argument("--out", type=Path, default=Path("stages/vision/weights/mtcnn.pt"),
                        help="output file (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        raw = read_sources(args.source)
        bundle = convert({name: data for name, (data, _) in raw.items()})
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        log.error("cannot convert %s: %s", args.source or "the installed facenet_pytorch", e)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, args.out)
    values = sum(t.numel() for state in bundle.values() for t in state.values())
    log.info("wrote %s: %d values, %d bytes", args.out, values, args.out.stat().st_size)
    if args.source is not None and args.source.is_file():
        log.info("sha256 %s  %s", hashlib.sha256(args.source.read_bytes()).hexdigest(), args.source)
    for data, shown in raw.values():
        log.info("sha256 %s  %s", hashlib.sha256(data).hexdigest(), shown)
    log.info("sha256 %s  %s", hashlib.sha256(args.out.read_bytes()).hexdigest(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
