"""Stage kinds the runtime can build, by the name configs use for them.

Each kind names its stage class and the top-level config section holding its
settings (the section has the kind's name: ``vision:`` configures every vision
replica; a stage's ``options`` override fields of it for that stage alone). Adding a
stage = one class with a ``Config`` + one line here + its section on ``MirrorConfig``.
"""

from __future__ import annotations

from stages.base import Stage
from stages.display import DisplayStage
from stages.generator.stage import GeneratorStage
from stages.ingest import IngestStage
from stages.synthetic import SyntheticStage
from stages.vision.stage import VisionStage

STAGE_KINDS: dict[str, type[Stage]] = {
    "ingest": IngestStage,
    "vision": VisionStage,
    "generator": GeneratorStage,
    "display": DisplayStage,
    "synthetic": SyntheticStage,
}
