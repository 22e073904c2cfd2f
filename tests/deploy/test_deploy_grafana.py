"""Grafana: the committed dashboards are the builder's output, well-formed, laid out without
overlaps, bound to the provisioned datasource, and provisioning points at them."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from deploy_helpers import DEPLOY

GRAFANA = DEPLOY / "grafana"


def _dashboards() -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_committed_json_is_the_builders_output() -> None:
    proc = subprocess.run(
        [sys.executable, str(GRAFANA / "build_dashboards.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_three_dashboards_with_unique_uids_and_titles() -> None:
    dashes = _dashboards()
    assert set(dashes) == {"overview.json", "quality.json", "jobs.json"}
    assert len({d["uid"] for d in dashes.values()}) == 3
    for d in dashes.values():
        assert d["title"].startswith("clinisynth / ") and "clinisynth" in d["tags"]


def test_panels_have_queries_a_datasource_and_do_not_overlap() -> None:
    for name, d in _dashboards().items():
        cells: set[tuple[int, int]] = set()
        ids = set()
        for p in d["panels"]:
            assert p["id"] not in ids, f"{name}: duplicate panel id"
            ids.add(p["id"])
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{name}:{p['title']}"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: '{p['title']}' overlaps another panel"
                    cells.add((x, y))
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"], f"{name}:{p['title']} has no query"
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_datasource_variable_defaults_to_the_provisioned_uid() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prom,) = ds["datasources"]
    for d in _dashboards().values():
        (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
        assert var["current"]["value"] == prom["uid"] == "prometheus"


def test_provisioning_points_at_the_compose_mount() -> None:
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "clinisynth.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_the_quality_and_jobs_views_show_what_the_issue_asks() -> None:
    titles = {
        n: " | ".join(p["title"] for p in d["panels"]).lower() for n, d in _dashboards().items()
    }
    for words in ("requests", "error", "latency", "triton", "queue", "batch"):
        assert words in titles["overview.json"], words
    for words in (
        "reward score",
        "generator version",
        "plausibility rate",
        "feedback",
        "agreement",
    ):
        assert words in titles["quality.json"], words
    for words in ("running", "queued", "loss", "checkpoint"):
        assert words in titles["jobs.json"], words
