"""The job's config: one typed section per concern, loaded from YAML, checked at startup.

    pipeline:   which stages, in which order, how many replicas, where (PipelineConfig)
    server:     the web server on the server rank (ServerConfig)
    transport:  links between ranks (TransportConfig)
    control:    heartbeats, liveness, shutdown (ControlConfig)
    compute:    threads per process and logging (ComputeConfig)
    flow:       queueing at the pipeline's entrance (FlowConfig)
    runtime:    the initial live settings the page can change (RuntimeSettings)
    presets:    named partial live settings (``preset.apply``)
    <kind>:     each stage kind's own section, named like the kind (``vision:``,
                ``generator:``, a plugin's ``tone:``); a stage's ``options`` override
                fields of it for that stage alone

Every default lives on a dataclass field; a file only states what differs. Unknown
keys and bad values stop the job before anything starts, every one of them reported
at once with its field's path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comms.config import TransportConfig
from core.config import ConfigError, Problem, build, check_choice, check_range, to_dict
from core.settings import RuntimeSettings
from runtime.control import ControlConfig
from runtime.live_config import merged
from runtime.pipeline_config import PipelineConfig, StageSpec
from stages.registry import UnknownStageKind, load_plugins, stage_class
from stages.server.config import ServerConfig


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
    """Intra-op threads per process; 1 keeps the ranks of a node from fighting over its cores."""
    opencv_threads: int = 1
    """OpenCV's own thread pool per process (JPEG codecs, the face detector); 1 for the same
    reason, and one small frame gains nothing from splitting. 0 leaves OpenCV's default."""
    log_level: str = "INFO"
    """Log level for every rank."""

    def __post_init__(self) -> None:
        check_range(self.torch_threads, "torch_threads", 1, 256)
        check_range(self.opencv_threads, "opencv_threads", 0, 256)
        check_choice(self.log_level, "log_level", ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(kw_only=True, slots=True)
class FlowConfig:
    session_queue_depth: int = 2
    """Camera frames each browser session may have waiting for the first stage; older ones
    are dropped. Small on purpose: a live mirror should show the newest frame, not catch up."""
    audio_queue_depth: int = 100
    """Audio chunks each session may have waiting for the first stage of a pipeline that
    takes audio (2 s of the page's 20 ms chunks). Deep on purpose: a lost chunk is a gap
    in the speech, so only a stage that has stalled for seconds loses audio."""

    def __post_init__(self) -> None:
        check_range(self.session_queue_depth, "session_queue_depth", 1, 64)
        check_range(self.audio_queue_depth, "audio_queue_depth", 1, 1000)


SECTIONS: dict[str, type] = {
    "pipeline": PipelineConfig,
    "server": ServerConfig,
    "transport": TransportConfig,
    "control": ControlConfig,
    "compute": ComputeConfig,
    "flow": FlowConfig,
    "runtime": RuntimeSettings,
}
"""The runtime's own sections; every other top-level key is a stage kind's section."""
PRESETS = "presets"


@dataclass(kw_only=True, slots=True)
class JobConfig:
    pipeline: PipelineConfig
    server: ServerConfig
    transport: TransportConfig
    control: ControlConfig
    compute: ComputeConfig
    flow: FlowConfig
    runtime: RuntimeSettings
    presets: dict[str, dict[str, Any]]
    kind_sections: dict[str, Any] = field(default_factory=dict)
    """Each stage kind's section, by kind: every kind the pipeline uses or the file configures."""
    stage_configs: dict[str, Any] = field(default_factory=dict)
    """The config each stage runs with, by stage name: its kind's section, with the fields
    named in the stage's ``options`` replaced."""

    def stage_config(self, spec: StageSpec) -> Any:
        return self.stage_configs[spec.name]


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Load ``path`` (None: the embedded defaults) and apply dotted ``overrides``."""
    data: dict[str, Any] = {}
    base_dir = None
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
        base_dir = path.resolve().parent
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        target = data.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    return config_from_dict(data, base_dir)


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> JobConfig:
    """The job config from plain data; one ``ConfigError`` lists every problem found.
    ``base_dir`` is where relative plugin files are looked for."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(data).__name__}")
    problems: list[Problem] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except ConfigError as e:
            problems.extend(e.problems)
            return None

    sections = {name: attempt(build, cls, data.get(name), name) for name, cls in SECTIONS.items()}
    presets = attempt(_presets, data.get(PRESETS, default_presets()), sections["runtime"])
    pipeline: PipelineConfig | None = sections["pipeline"]
    kinds = _stage_kinds(data, pipeline, base_dir, problems)
    kind_sections = {kind: attempt(build, cls.Config, data.get(kind), kind) for kind, cls in kinds.items()}
    stage_configs = {}
    if pipeline is not None:
        for i, spec in enumerate(pipeline.stages):
            section = kind_sections.get(spec.kind)
            if section is not None:
                stage_configs[spec.name] = (
                    attempt(_with_options, kinds[spec.kind].Config, section, spec.options, i)
                    if spec.options else section)
    if problems:
        raise ConfigError(problems=problems)
    return JobConfig(**sections, presets=presets, kind_sections=kind_sections, stage_configs=stage_configs)


def _stage_kinds(data: dict[str, Any], pipeline: PipelineConfig | None, base_dir: Path | None,
                 problems: list[Problem]) -> dict[str, type]:
    """The stage class of every kind the pipeline uses or the file configures."""
    if pipeline is not None:
        try:
            load_plugins(pipeline.plugins, base_dir)
        except ImportError as e:
            problems.append(Problem("pipeline.plugins", str(e)))
    kinds: dict[str, type] = {}
    wanted = [(f"pipeline.stages[{i}].kind", spec.kind) for i, spec in enumerate(pipeline.stages if pipeline else [])]
    wanted += [(key, key) for key in data if key not in SECTIONS and key != PRESETS]
    for where, kind in wanted:
        if kind in kinds:
            continue
        try:
            kinds[kind] = stage_class(kind)
        except UnknownStageKind as e:
            if where == kind:  # a top-level key that is neither a section nor a kind
                allowed = ", ".join([*SECTIONS, PRESETS])
                problems.append(Problem(kind, f"unknown key; allowed: {allowed}, or the section of a stage kind ({e})"))
            else:
                problems.append(Problem(where, str(e)))
    return kinds


def _with_options(config_class: type, section: Any, options: dict[str, Any], index: int) -> Any:
    """The kind's section with ``options`` replacing some fields, re-checked as a whole."""
    try:
        return build(config_class, {**to_dict(section), **options})
    except ConfigError as e:
        raise e.under(f"pipeline.stages[{index}].options") from None


def _presets(value: Any, runtime: RuntimeSettings | None) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"expected a mapping of preset names to partial live settings, got {value!r}", PRESETS)
    problems = []
    for name, values in value.items():
        try:
            merged(runtime or RuntimeSettings(), values, path=f"{PRESETS}.{name}")
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems=problems)
    return {str(name): dict(values) for name, values in value.items()}
