"""The job's config: one typed section per concern, loaded from YAML, checked at startup.

    pipeline:   which stages, in which order, how many replicas, where (PipelineConfig)
    server:     the rank-0 web server (ServerConfig)
    transport:  links between ranks (TransportConfig)
    control:    heartbeats, liveness, shutdown (ControlConfig)
    compute:    per-process threads and logging (ComputeConfig)
    flow:       queueing at the pipeline's entrance (FlowConfig)
    runtime:    the initial live settings the page can change (RuntimeSettings)
    presets:    named partial live settings (``preset.apply``)
    ingest / vision / generator / display / synthetic: each stage kind's own section
                (a stage's ``options`` override fields of it for that stage alone)

Every default lives on a dataclass field; a file only states what differs. Unknown
keys and bad values stop the job before anything starts, naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comms.config import TransportConfig
from runtime.config_loader import ConfigError, build, check, check_choice, check_range, to_dict
from runtime.control import ControlConfig
from runtime.live_config import LiveConfig, RuntimeSettings
from runtime.pipeline_config import PipelineConfig, StageSpec
from runtime.registry import STAGE_KINDS
from stages.display import DisplayConfig
from stages.generator.stage import GeneratorConfig
from stages.ingest import IngestConfig
from stages.server.config import ServerConfig
from stages.synthetic import SyntheticConfig
from stages.vision.config import VisionConfig


def default_presets() -> dict[str, dict[str, Any]]:
    return {
        "follow-emotion": {"style": "auto", "strength": 0.75, "smoothing": 0.5},
        "calm": {"style": "aurora", "strength": 0.45, "smoothing": 0.8},
        "comic": {"style": "pop", "strength": 0.9, "smoothing": 0.3},
        "sketch": {"style": "ink", "strength": 0.85, "smoothing": 0.4},
        "low-bandwidth": {"target_fps": 10.0, "capture_width": 320, "jpeg_quality": 60},
    }


@dataclass(kw_only=True, slots=True)
class ComputeConfig:
    torch_threads: int = 1
    """Intra-op threads per process; 1 keeps ranks from fighting over a few cores."""
    log_level: str = "INFO"
    """Log level for every rank."""

    def __post_init__(self) -> None:
        check_range(self.torch_threads, "torch_threads", 1, 256)
        check_choice(self.log_level, "log_level", ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(kw_only=True, slots=True)
class FlowConfig:
    session_queue_depth: int = 2
    """Camera frames each browser session may have waiting for ingest; older ones are
    dropped. Small on purpose: a live mirror should show the newest frame, not catch up."""

    def __post_init__(self) -> None:
        check_range(self.session_queue_depth, "session_queue_depth", 1, 64)


@dataclass(kw_only=True, slots=True)
class MirrorConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    presets: dict[str, dict[str, Any]] = field(default_factory=default_presets)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    display: DisplayConfig = field(default_factory=DisplayConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        stages = self.pipeline.stages
        for i, spec in enumerate(stages):
            check_choice(spec.kind, f"pipeline.stages[{i}].kind", sorted(STAGE_KINDS))
            try:
                self.stage_config(spec)
            except ConfigError as e:
                raise e.under(f"pipeline.stages[{i}].options") from None
        # Browsers talk to rank 0 only, so frames enter and leave the pipeline there.
        check(stages[0].placement == "server", "pipeline.stages[0].placement",
              f"the first stage ({stages[0].name}) receives browser frames and must be 'server'")
        check(stages[-1].placement == "server", f"pipeline.stages[{len(stages) - 1}].placement",
              f"the last stage ({stages[-1].name}) returns frames to browsers and must be 'server'")
        LiveConfig(self.runtime, self.presets)  # validates every preset against the settings

    def stage_config(self, spec: StageSpec) -> Any:
        """The config one stage runs with: its kind's section, with the fields named in the
        stage's ``options`` replaced for this stage alone (and the section's rules re-checked)."""
        section = getattr(self, spec.kind)
        if not spec.options:
            return section
        return build(STAGE_KINDS[spec.kind].Config, {**to_dict(section), **spec.options})


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> MirrorConfig:
    """Load ``path`` (None: the embedded defaults) and apply dotted ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return build(MirrorConfig, data)


def config_fields(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]
