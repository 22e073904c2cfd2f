"""Every PromQL expression in deploy/ refers only to metrics in deploy/prometheus/metrics.yaml.

Sources checked: recording rules, alerts, Grafana dashboard queries and variables, and the
prometheus-adapter rules behind the HPAs. Recording-rule outputs count as known names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, load_catalogue
from promql_names import base_name, label_values_metric, metric_names

RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


# --- the catalogue itself ---------------------------------------------------------------------


def test_catalogue_entries_are_complete_and_well_named() -> None:
    entries = load_catalogue()
    names = [m["name"] for m in entries]
    assert len(names) == len(set(names)), "duplicate metric names"
    for m in entries:
        assert set(m) == {"name", "type", "labels", "source", "help"}, m["name"]
        assert m["type"] in {"counter", "gauge", "histogram"}, m["name"]
        assert m["source"] in {
            "all-services", "generator", "reward", "counterfactual", "finetune", "triton",
            "prometheus",
        }, m["name"]  # fmt: skip
        assert m["help"].strip(), m["name"]
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", label) for label in m["labels"]), m["name"]
        assert "le" not in m["labels"], f"{m['name']}: le is implied by histogram"
        if m["source"] in {"all-services", "generator", "reward", "counterfactual", "finetune"}:
            assert m["name"].startswith("clinisynth_"), m["name"]
            if m["type"] == "counter":
                assert m["name"].endswith("_total"), f"{m['name']}: counters end in _total"
            else:
                assert not m["name"].endswith("_total"), m["name"]


def test_catalogue_has_the_contracted_service_metrics() -> None:
    names = {m["name"] for m in load_catalogue()}
    for required in (
        "clinisynth_grpc_requests_total",
        "clinisynth_grpc_request_duration_seconds",
        "clinisynth_grpc_in_flight_requests",
        "clinisynth_build_info",
        "clinisynth_dependency_up",
        "clinisynth_generator_queue_depth",
        "clinisynth_reward_score",
        "clinisynth_reward_feedback_pending",
        "clinisynth_counterfactual_duration_seconds",
        "clinisynth_finetune_job_failures_total",
        "nv_inference_queue_duration_us",
    ):
        assert required in names


# --- the name extractor -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('sum by (service) (rate(x_total{code=~"INTERNAL|OK"}[5m]))', {"x_total"}),
        ("sum(rate(a[5m])) by (le, service) / ignoring(code) group_left(x) b", {"a", "b"}),
        ("histogram_quantile(0.95, sum by (le) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
        ("rate(a[5m]) / 1e6 > 0.1", {"a"}),
        ("time() - ts_seconds > 7200", {"ts_seconds"}),
        ("avg_over_time(level:metric:mean1h[7d]) offset 1d", {"level:metric:mean1h"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ('m{job=~"$job", le="+Inf"} and on (instance) n', {"m", "n"}),
        ('{__name__="by_name"}', {"by_name"}),
        ("max_over_time(rate(c[5m])[1h:1m]) @ end()", {"c"}),
        ("sum without (pod) (g) unless bool h", {"g", "h"}),
        ("vector(1) + scalar(k)", {"k"}),
    ],
)
def test_metric_names_extracts_only_metrics(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_label_values_query_unwraps_grafana_variables() -> None:
    assert label_values_metric("label_values(foo_total, service)") == "foo_total"
    assert label_values_metric('label_values(x{kind=~"$kind"}, job)') == 'x{kind=~"$kind"}'
    assert label_values_metric("label_values(job)") is None


# --- every expression against the catalogue ---------------------------------------------------


def _recorded_names() -> set[str]:
    names: set[str] = set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def _expressions() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression in deploy/."""
    found: list[tuple[str, str]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                found.append((f"{path.name}:{name}", rule["expr"]))
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in _panels(dash["panels"]):
            for t in panel.get("targets", []):
                found.append((f"{path.name}:{panel['title']}:{t['refId']}", t["expr"]))
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                inner = label_values_metric(var["query"]["query"])
                if inner:
                    found.append((f"{path.name}:${var['name']}", inner))
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter.yaml").read_text())
    for rule in adapter["rules"]:
        found.append((f"prometheus-adapter:{rule['name']['as']}", rule["seriesQuery"]))
    return found


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def test_every_expression_uses_only_catalogued_metrics() -> None:
    catalogue = load_catalogue()
    known = {m["name"] for m in catalogue}
    histograms = {m["name"] for m in catalogue if m["type"] == "histogram"}
    recorded = _recorded_names()
    exprs = _expressions()
    assert len(exprs) > 60, "expected rules, dashboards and adapter rules to be found"
    unknown: list[str] = []
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            if name in recorded:
                continue
            base = base_name(name, histograms)
            if base not in known:
                unknown.append(f"{where}: {name}")
            elif base in histograms and base == name:
                unknown.append(f"{where}: {name} is a histogram; use _bucket/_sum/_count")
    assert not unknown, "metrics not in deploy/prometheus/metrics.yaml:\n" + "\n".join(unknown)


def test_every_catalogued_metric_is_watched_somewhere() -> None:
    """A catalogued metric nobody charts or alerts on is dead weight (or a missing panel)."""
    histograms = {m["name"] for m in load_catalogue() if m["type"] == "histogram"}
    used = {base_name(n, histograms) for _, e in _expressions() for n in metric_names(e)}
    unused = sorted({m["name"] for m in load_catalogue()} - used)
    assert not unused, f"catalogued but never used: {unused}"


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in _recorded_names():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_rule_files_are_the_ones_compose_mounts() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert all(isinstance(p, Path) for p in DASHBOARDS) and len(DASHBOARDS) == 3
