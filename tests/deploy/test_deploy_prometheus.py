"""Prometheus config, rules and alert unit tests, checked by promtool and a real Prometheus.

promtool validates both scrape configs (compose and Kubernetes) with the repository's rule files,
runs `promtool test rules` on the alert unit tests, and a real Prometheus server on loopback
scrapes an exporter shaped like the services' (every catalogued metric) and evaluates every rule
without error.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, load_catalogue, require, run

PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))


def _with_repo_rules(config_path: Path, tmp_path: Path) -> dict[str, Any]:
    """The config with rule_files pointing at the repository's rules (compose mounts them)."""
    config = yaml.safe_load(config_path.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(PROM / "rules" / "*.yml")]
    return config


def test_promtool_check_compose_config(tmp_path: Path) -> None:
    promtool = require("promtool")
    config = _with_repo_rules(PROM / "prometheus.yml", tmp_path)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = run([promtool, "check", "config", str(path)])
    assert "SUCCESS" in out and "2 rule files found" in out, out


def test_promtool_check_kubernetes_config(tmp_path: Path) -> None:
    """Debian builds Prometheus without Kubernetes discovery, so file_sd stands in for it;
    the relabelling, jobs and rule files are checked as written."""
    promtool = require("promtool")
    config = _with_repo_rules(PROM / "prometheus-kubernetes.yml", tmp_path)
    for job in config["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs")
        assert sd[0]["role"] == "pod"
        job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
        labels = [c["source_labels"] for c in job["relabel_configs"] if "source_labels" in c]
        assert ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] in labels
    (tmp_path / "targets.json").write_text("[]")
    path = tmp_path / "prometheus-kubernetes.yml"
    path.write_text(yaml.safe_dump(config))
    run([promtool, "check", "config", str(path)])


def test_promtool_check_rules() -> None:
    out = run([require("promtool"), "check", "rules", *map(str, RULES)])
    assert out.count("SUCCESS") == len(RULES), out


def test_promtool_alert_unit_tests() -> None:
    out = run([require("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM / "tests")
    assert "SUCCESS" in out, out


def test_every_alert_is_unit_tested_and_documented() -> None:
    alerts = {
        rule["alert"]: rule
        for group in yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alerts) <= fired, f"alerts never shown firing: {sorted(set(alerts) - fired)}"
    ops = (DEPLOY.parent / "docs" / "OPERATIONS.md").read_text().lower()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert f"### {anchor}" in ops, f"{name}: no '### {anchor}' section in OPERATIONS.md"


# --- a real Prometheus server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_exporter_text() -> str:
    """Prometheus text with one series per catalogued metric, as the services would export."""
    lines: list[str] = []
    for m in load_catalogue():
        if m["source"] == "prometheus":
            continue
        labels = ",".join(f'{name}="x"' for name in m["labels"])
        if "code" in m["labels"]:
            labels = labels.replace('code="x"', 'code="OK"')
        sep = "," if labels else ""
        kind = m["type"]
        lines.append(f"# TYPE {m['name']} {kind}")
        if kind == "histogram":
            for le in ("0.5", "1", "+Inf"):
                lines.append(f'{m["name"]}_bucket{{{labels}{sep}le="{le}"}} {int(time.time())}')
            lines.append(f"{m['name']}_sum{{{labels}}} {int(time.time())}")
            lines.append(f"{m['name']}_count{{{labels}}} {int(time.time())}")
        else:
            lines.append(f"{m['name']}{{{labels}}} {int(time.time())}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def exporter() -> Iterator[int]:
    """A loopback HTTP server serving _sample_exporter_text() at /metrics (counters grow)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = _sample_exporter_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _get(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_real_prometheus_loads_and_evaluates_every_rule(tmp_path: Path, exporter: int) -> None:
    binary = require("prometheus")
    # The repository's rules, evaluated every second instead of every 30 s to keep this short.
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for path in RULES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
        (rules_dir / path.name).write_text(yaml.safe_dump(doc))
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules_dir / "*.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["clinisynth"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{exporter}"], "labels": {"component": "generator"}}
    ]
    jobs["triton"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{exporter}"], "labels": {"component": "triton"}}
    ]
    port = _free_port()
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        groups: list[dict[str, Any]] = []
        recorded: list[Any] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                groups = _get(port, "/api/v1/rules")["data"]["groups"]
                recorded = _get(
                    port, "/api/v1/query", query="service:clinisynth_grpc_requests:rate5m"
                )["data"]["result"]
            except OSError:
                groups, recorded = [], []
            rules = [r for g in groups for r in g["rules"]]
            evaluated = all(r.get("lastEvaluation", "").startswith("20") for r in rules)
            if rules and evaluated and recorded:
                break
            time.sleep(0.5)
        rules = [r for g in groups for r in g["rules"]]
        written = sum(
            len(g["rules"]) for path in RULES for g in yaml.safe_load(path.read_text())["groups"]
        )
        assert len(rules) == written, f"expected all {written} rules loaded, got {len(rules)}"
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not broken, broken
        assert recorded, "recording rules produced nothing from the scraped metrics"
        targets = _get(port, "/api/v1/targets")["data"]["activeTargets"]
        assert {t["labels"]["job"] for t in targets if t["health"] == "up"} >= {
            "clinisynth",
            "triton",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
