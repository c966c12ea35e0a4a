"""The ``pipeline`` config section: which stages run, in which order, how many of each.

A pipeline is a chain: messages flow ``stages[0] -> stages[1] -> ... -> stages[-1]``.
Each ``StageSpec`` says what a stage is (``kind``, the name its stage class registered
under, see ``stages.registry``), how many replicas it runs and where they may go;
``runtime.planner.plan`` turns that into ranks. Stage classes outside ``stages/`` are
found through ``plugins``:

    pipeline:
      name: tone
      plugins: [tone_stages.py]     # a file next to this YAML, or a module name
      stages:
        - {name: tone}
        - {name: gain}
        - {name: sink, kind: tone_sink, placement: server}

    pipeline:
      name: mirror
      stages:
        - {name: ingest, placement: server}
        - {name: vision, replicas: 1}
        - {name: generator, replicas: auto, max_batch: 4, batch_wait_ms: 5}
        - {name: display, placement: server}

A stage may also override fields of its kind's config section for itself alone with
``options`` (``runtime.config`` checks them against that section), e.g. two
stages of one kind with different costs:

        - {name: slow, kind: synthetic, options: {cost_ms: 40}}

Only rules that need no world size live here; the planner checks the rest (node and rank
ranges, enough ranks, GPUs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from core.config import check, check_choice, check_range

NAME_PATTERN = re.compile(r"[a-z0-9_-]+")
"""Stage and pipeline names; excludes '#' and '>' so link names like 'vision#0->generator#1' parse."""

PLACEMENTS = ("server", "worker")
DEVICES = ("auto", "cpu", "cuda")
ROUTINGS = ("round_robin", "least_loaded", "session", "affinity")
"""How a stage spreads its outputs over the next stage's replicas (``runtime.stage_loop.Router``)."""
AUTO = "auto"
MAX_BATCH_LIMIT = 64
MAX_BATCH_WAIT_MS = 1000.0


def _check_name(value: str, field_name: str) -> None:
    check(isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None, field_name,
          f"must be a non-empty name of a-z, 0-9, '_' or '-', got {value!r}")


@dataclass(kw_only=True, slots=True)
class StageSpec:
    """One stage of the chain and where its replicas may run."""

    name: str = ""
    """Unique identifier within the pipeline (a-z, 0-9, '_', '-'); used in roles and link names."""
    kind: str = ""
    """The stage class's registered kind (e.g. 'ingest', 'vision', 'generator', 'display');
    empty means the same as ``name``. Only the format is checked here; the config loader
    looks the kind up (``stages.registry``)."""
    replicas: int | str = 1
    """How many copies run, each on its own rank: an integer >= 1, or 'auto' to share the
    ranks left over once every fixed-count stage has its ranks."""
    placement: str = "worker"
    """'server': runs on the server rank (rank 0) next to the web server (replicas must be
    1); a stage that takes frames from the page or gives them to it must be there.
    'worker': runs on its own rank(s)."""
    nodes: list[int] | None = None
    """Node indices the replicas may go to; null means any node."""
    ranks: list[int] | None = None
    """Explicit global ranks, one per replica (its length must equal ``replicas``). Stages
    pinned this way may share a rank, which then runs them in one process."""
    device: str = "auto"
    """'auto' (a GPU for worker stages when the node has one, else CPU), 'cpu' or 'cuda'."""
    max_batch: int = 1
    """Micro-batch size: how many messages ``process`` gets at most, 1..64."""
    batch_wait_ms: float = 0.0
    """After the first message of a micro-batch arrives, how long to wait for more before
    processing a partial batch, 0..1000 ms. 0 processes whatever is already queued."""
    routing: str = "round_robin"
    """How this stage's outputs are spread over the next stage's replicas: 'round_robin'
    (take turns), 'least_loaded' (fewest messages in flight) or 'session' (every frame of
    one browser session goes to the same replica, for a next stage with per-session state)
    or 'affinity' (every message with one ``meta["affinity"]`` key, e.g. an avatar id, goes to
    the replica that holds that key's model, placed by the next stage's directory; only on a
    'server' stage, where the replicas' reports of what they hold arrive)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Fields of the kind's config section (the top-level section named like ``kind``)
    that this stage alone uses instead, e.g. ``{cost_ms: 40}`` for one synthetic stage of
    several. Checked against that section's fields and rules when the config loads."""
    fallback: str | None = None
    """Another stage of the pipeline that takes this stage's frames whenever this one
    cannot: it is saturated (no credit free within ``fallback_after_ms``) or it reports
    itself unavailable (e.g. a diffusion stage without a model). The fallback stage sits
    beside this one, not in the chain: it gets the same upstream and downstream stages."""
    fallback_after_ms: float = 0.0
    """How long a frame waits for a credit of this stage before it goes to the fallback
    (0..1000 ms); 0 diverts at once when every replica of this stage is busy."""

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        if self.kind == "":
            self.kind = self.name  # checked as the name already
        else:
            _check_name(self.kind, "kind")
        # The loader lets any string through for ``replicas`` so this message can say
        # both forms that are allowed, instead of a generic union mismatch.
        replicas_ok = check(self.replicas == AUTO or (isinstance(self.replicas, int)
                                                      and not isinstance(self.replicas, bool) and self.replicas >= 1),
                            "replicas", f"expected an integer >= 1 or 'auto', got {self.replicas!r}")
        check_choice(self.placement, "placement", PLACEMENTS)
        check_choice(self.device, "device", DEVICES)
        check_choice(self.routing, "routing", ROUTINGS)
        check_range(self.max_batch, "max_batch", 1, MAX_BATCH_LIMIT)
        check_range(self.batch_wait_ms, "batch_wait_ms", 0.0, MAX_BATCH_WAIT_MS)
        check_range(self.fallback_after_ms, "fallback_after_ms", 0.0, MAX_BATCH_WAIT_MS)
        if self.routing == "affinity":
            check(self.placement == "server", "routing",
                  "'affinity' needs placement 'server': the replicas' reports of which keys they hold "
                  "reach the server rank only")
        if self.fallback is not None:
            _check_name(self.fallback, "fallback")
            check(self.fallback != self.name, "fallback", f"must name another stage, not {self.name!r} itself")
        if self.nodes is not None:
            check(len(self.nodes) > 0, "nodes", "must list at least one node index, or be null for any node")
            for i, node in enumerate(self.nodes):
                check(node >= 0, f"nodes[{i}]", f"must be a node index >= 0, got {node}")
            check(len(set(self.nodes)) == len(self.nodes), "nodes", f"lists a node twice: {self.nodes}")
        if self.ranks is not None:
            for i, rank in enumerate(self.ranks):
                check(rank >= 0, f"ranks[{i}]", f"must be a rank >= 0, got {rank}")
            check(len(set(self.ranks)) == len(self.ranks), "ranks",
                  f"lists a rank twice: {self.ranks}; replicas of one stage need distinct ranks")
            fixed = replicas_ok and check(self.replicas != AUTO, "replicas", f"must be {len(self.ranks)} (the "
                                          "length of ranks), not 'auto': explicit ranks fix the count")
            if fixed:
                check(len(self.ranks) == self.replicas, "ranks",
                      f"has {len(self.ranks)} entries but replicas is {self.replicas}; give one rank per replica")
        if self.placement == "server":
            if replicas_ok:
                check(self.replicas == 1, "replicas",
                      f"must be 1 for placement 'server' (it runs on the server rank only), got {self.replicas!r}")
            check(self.nodes is None or 0 in self.nodes, "nodes",
                  f"placement 'server' runs on rank 0, which is on node 0; got nodes {self.nodes}")
            check(self.ranks is None or self.ranks == [0], "ranks",
                  f"placement 'server' runs on rank 0; got ranks {self.ranks}")

    @property
    def is_auto(self) -> bool:
        return self.replicas == AUTO


def mirror_stages() -> list[StageSpec]:
    """The default Mind Mirror chain: browser frames in and portraits out on rank 0,
    one vision worker, and every remaining rank running the generator.

    ``routing: session`` keeps each browser session on one vision replica (stable face
    ids from its tracker) and one generator replica (temporal smoothing), while
    different sessions spread over the replicas.
    """
    return [
        StageSpec(name="ingest", placement="server", routing="session"),
        StageSpec(name="vision", replicas=1, max_batch=4, routing="session"),
        StageSpec(name="generator", replicas=AUTO, max_batch=4),
        StageSpec(name="display", placement="server"),
    ]


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """The chain of stages one run executes."""

    name: str = "mirror"
    """Pipeline name (a-z, 0-9, '_', '-'), shown in logs, the dry-run plan and metrics."""
    plugins: list[str] = field(default_factory=list)
    """Where stage kinds not built in come from, imported before the stages are looked up:
    module names on the Python path, or ``.py`` files (relative to the config file's folder)."""
    stages: list[StageSpec] = field(default_factory=mirror_stages)
    """Stages in chain order: data flows stages[0] -> stages[1] -> ... -> stages[-1],
    except that a stage named as another's ``fallback`` is not in the chain: it sits
    beside that stage (list it anywhere)."""
    share_server_rank: bool = False
    """Allow worker stages pinned with ``ranks`` to include rank 0. Off by default because
    rank 0 also runs the web server's event loop, and a heavy stage there adds latency
    to every browser session."""

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        check(len(self.stages) >= 1, "stages", "must list at least one stage")
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.stages):
            check(spec.name not in seen, f"stages[{i}].name", f"duplicate stage name {spec.name!r} (also "
                                                              f"stages[{seen.get(spec.name)}]); stage names must be unique")
            seen.setdefault(spec.name, i)
        for i, entry in enumerate(self.plugins):
            check(bool(entry.strip()), f"plugins[{i}]", "must be a module name or a .py file, got an empty string")
        self._check_fallbacks()

    def _check_fallbacks(self) -> None:
        names = [spec.name for spec in self.stages]
        served: dict[str, str] = {}
        for i, spec in enumerate(self.stages):
            if spec.fallback is None:
                continue
            where = f"stages[{i}].fallback"
            if not check(spec.fallback in names, where,
                         f"no stage named {spec.fallback!r}; stages: {', '.join(names)}"):
                continue
            check(spec.fallback not in served, where, f"{spec.fallback!r} is already the fallback of "
                                                      f"{served.get(spec.fallback)!r}; a fallback serves one stage")
            served.setdefault(spec.fallback, spec.name)
        for i, spec in enumerate(self.stages):
            if spec.name in served:
                check(spec.fallback is None, f"stages[{i}].fallback",
                      f"{spec.name!r} is the fallback of {served[spec.name]!r} and cannot have a fallback itself")
        chain = [spec for spec in self.stages if spec.name not in served]
        for position, spec in enumerate(chain):
            if spec.fallback is not None:
                check(0 < position < len(chain) - 1, f"stages[{names.index(spec.name)}].fallback",
                      "only a stage between two others can have a fallback (the stage before it routes "
                      "frames to one or the other)")

    @property
    def chain(self) -> list[StageSpec]:
        """The stages data flows through in order, without the fallbacks beside them."""
        fallbacks = {spec.fallback for spec in self.stages if spec.fallback is not None}
        return [spec for spec in self.stages if spec.name not in fallbacks]

    def fallback_of(self, name: str) -> StageSpec | None:
        """The stage that serves ``name``'s frames when it cannot, if any."""
        fallback = self.stage(name).fallback
        return None if fallback is None else self.stage(fallback)
    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")
