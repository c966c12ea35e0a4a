"""docs/grafana/mindmirror-dashboard.json: a Grafana dashboard that imports and asks only for metrics that exist.

Grafana is not run here, so this checks what breaks an import or leaves a panel empty:
the JSON parses; the datasource is the ``${DS_PROMETHEUS}`` input Grafana asks for on
import; panel ids are unique and every panel sits on the 24-column grid without
overlapping another; and every PromQL expression (panels and template variables) names
only metrics of the list below (the names rank 0's /metrics exposes, as agreed for issue
12), uses only PromQL functions and keywords, has balanced brackets, and takes
``histogram_quantile`` over a histogram's ``_bucket`` rates grouped by ``le``. Every
metric of the list has a panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).parents[1] / "docs" / "grafana" / "mindmirror-dashboard.json"

PER_RANK = ("rank", "role", "node")
LINK = ("src_rank", "dst_rank", "src_node", "dst_node")
LABELS = {
    # histograms
    "mindmirror_frame_latency_seconds": ("pipeline", "generator"),
    "mindmirror_stage_compute_seconds": ("stage", *PER_RANK),
    "mindmirror_stage_queue_wait_seconds": ("stage", *PER_RANK),
    "mindmirror_hop_seconds": ("hop", *LINK),
    # counters
    "mindmirror_link_bytes_total": ("link", *LINK),
    "mindmirror_link_messages_total": ("link", *LINK),
    "mindmirror_frames_dropped_total": ("reason",),
    "mindmirror_registry_events_total": ("stage", "replica", "event", *PER_RANK),
    "mindmirror_diffusion_steps_total": ("stage", "replica", *PER_RANK),
    # gauges
    "mindmirror_queue_depth": ("queue",),
    "mindmirror_registry_models_resident": ("stage", "replica", *PER_RANK),
    "mindmirror_registry_bytes_used": ("stage", "replica", *PER_RANK),
    "mindmirror_registry_capacity_bytes": ("stage", "replica", *PER_RANK),
    "mindmirror_gpu_utilization_ratio": ("gpu", *PER_RANK),
    "mindmirror_gpu_memory_used_bytes": ("gpu", *PER_RANK),
    "mindmirror_gpu_memory_total_bytes": ("gpu", *PER_RANK),
    "mindmirror_rank_up": PER_RANK,
}
"""The metric names of the issue-12 contract (rank 0's /metrics exposes them) and their labels."""
CONTRACT = set(LABELS)
HISTOGRAMS = {name for name in CONTRACT if name.endswith("_seconds")}
SERIES = {name: set(labels) for name, labels in LABELS.items() if name not in HISTOGRAMS}
for _name in HISTOGRAMS:
    SERIES.update({f"{_name}_sum": set(LABELS[_name]), f"{_name}_count": set(LABELS[_name]),
                   f"{_name}_bucket": {*LABELS[_name], "le"}})
"""What a query may select, with the labels each series has: a histogram only through its series."""

FUNCTIONS = {
    "abs", "absent", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count_over_time",
    "delta", "deriv", "exp", "floor", "histogram_quantile", "idelta", "increase", "irate", "label_replace",
    "label_values", "ln", "max_over_time", "min_over_time", "predict_linear", "rate", "resets", "round",
    "scalar", "sort", "sort_desc", "sum_over_time", "time", "timestamp", "vector", "query_result",
}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable query."""
    found = [(f"panel {p['id']} {p.get('title')!r}", t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found.append((f"variable {variable['name']}", query))
    return found


def identifiers(expr: str) -> list[str]:
    """The names in a PromQL expression that are functions, keywords or metrics: strings,
    label matchers, ranges, grouping label lists and numbers taken out first (and the label
    argument of Grafana's ``label_values(metric, label)``)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"label_values\(([^,()]*),\s*\w+\s*\)", r"label_values(\1)", text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r"\1", text)
    text = re.sub(r"(?<![\w.])\d+(ms|s|m|h|d|w|y)\b", " ", text)  # durations (offset 5m)
    text = re.sub(r"(?<![\w.])\d*\.?\d+([eE][+-]?\d+)?", " ", text)
    return re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)


def metrics_in(expr: str) -> set[str]:
    return {name for name in identifiers(expr) if name not in FUNCTIONS | AGGREGATIONS | KEYWORDS}


def labels_in(expr: str) -> set[str]:
    """Labels an expression groups by, matches on, or asks ``label_values`` for."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^()]*)\)", text):
        found |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", text):
        found |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    found |= set(re.findall(r"label_values\([^,()]*,\s*(\w+)\s*\)", text))
    return found


def test_dashboard_parses_and_asks_for_its_prometheus_on_import():
    dashboard = load()
    assert dashboard["title"] == "Mind Mirror" and dashboard["uid"] == "mindmirror"
    [source] = dashboard["__inputs"]
    assert source == {**source, "name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}
    assert {r["id"] for r in dashboard["__requires"]} >= {"grafana", "prometheus"}
    used = {p["type"] for p in all_panels(dashboard)} - {"row"}
    assert used <= {r["id"] for r in dashboard["__requires"] if r["type"] == "panel"}, used
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_panel_ids_are_unique_and_panels_tile_the_grid():
    panels = all_panels(load())
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(ids) == len(set(ids)), ids
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in g.values()), p["title"]
        assert g["h"] >= 1 and 1 <= g["w"] <= 24 and 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["y"] >= 0, p["title"]
        if p["type"] == "row":
            assert g["w"] == 24 and g["h"] == 1 and g["x"] == 0
        boxes.append((p["title"], g))
    overlapping = [(a, b) for i, (a, ga) in enumerate(boxes) for b, gb in boxes[:i]
                   if ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
                   and ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"]]
    assert overlapping == []


def test_every_query_names_only_contract_metrics():
    found = expressions(load())
    assert len(found) >= 20
    for where, expr in found:
        names = metrics_in(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= set(SERIES), f"{where}: {sorted(names - set(SERIES))} are not metrics of the contract: {expr!r}"
        # Labels it groups by or matches on: ones its metrics have (else an empty legend or no data).
        has = set().union(*(SERIES[name] for name in names))
        assert labels_in(expr) <= has, f"{where}: labels {sorted(labels_in(expr) - has)} not on {sorted(names)}"
        for opening, closing in ("()", "[]", "{}"):
            depth = 0
            for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
                depth += (ch == opening) - (ch == closing)
                assert depth >= 0, f"{where}: unbalanced {opening}{closing} in {expr!r}"
            assert depth == 0, f"{where}: unbalanced {opening}{closing} in {expr!r}"
        # A quantile of a histogram: over rates of its buckets, the `le` label kept.
        for match in re.finditer(r"histogram_quantile\(\s*(0?\.\d+|1(\.0+)?)\s*,\s*sum by \(([^()]*)\) \(rate\((\w+)\{", expr):
            assert "le" in [label.strip() for label in match.group(3).split(",")], f"{where}: {expr!r}"
            assert match.group(4).endswith("_bucket"), f"{where}: {expr!r}"
        assert expr.count("histogram_quantile(") == len(re.findall(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(", expr)), \
            f"{where}: histogram_quantile not over `sum by (..., le) (rate(..._bucket...))`: {expr!r}"


def test_every_contract_metric_has_a_panel():
    used = set().union(*(metrics_in(expr) for _, expr in expressions(load())))
    covered = {name for name in CONTRACT if name in used or any(f"{name}{s}" in used for s in ("_bucket", "_sum", "_count"))}
    assert covered == CONTRACT, sorted(CONTRACT - covered)
    exprs = [expr for _, expr in expressions(load())]
    assert any("rate(mindmirror_link_bytes_total" in e and "[1m]" in e and "by (link)" in e for e in exprs)  # the bandwidth


@pytest.mark.parametrize("expr, names", [
    ('sum by (le) (rate(mindmirror_hop_seconds_bucket{hop=~"a|b", node="x"}[5m]))', {"mindmirror_hop_seconds_bucket"}),
    ("count(mindmirror_rank_up == 0) or vector(0)", {"mindmirror_rank_up"}),
    ("rate(mindmirror_link_bytes_total[1m]) / 1e6 * 8", {"mindmirror_link_bytes_total"}),
    ("sum by (stage) (rate(other_metric[1m]))", {"other_metric"}),
    ("mindmirror_frame_latency_seconds_bucket offset 5m", {"mindmirror_frame_latency_seconds_bucket"}),
])
def test_the_check_finds_metric_names(expr, names):
    """The checker itself: labels, strings, ranges and numbers are not taken for metrics."""
    assert metrics_in(expr) == names


def test_the_check_finds_labels():
    assert labels_in('sum by (stage, le) (rate(x_bucket{node=~"$node",event!="a,b"}[1m])) / on(stage) y') \
        == {"stage", "le", "node", "event"}
    assert labels_in("label_values(mindmirror_rank_up, node)") == {"node"}
    assert metrics_in("label_values(mindmirror_rank_up, node)") == {"mindmirror_rank_up"}
