"""The one-command stack: `clinisynth up --detach`, status, a real Prometheus scraping it, down.

Runs the CLI as a user would (subprocesses, CLINISYNTH_HOME in a temp folder)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.stack
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clinisynth.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(v) for v in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "CLINISYNTH_HOME": str(home)}
    up = _cli(env, "up", "--detach", "--wait", "400")
    assert up.returncode == 0, up.stdout + up.stderr + _logs(home)
    info = json.loads(up.stdout)
    processes = _descendants(info["pid"]) | {info["pid"]}
    yield env, info, home
    down = _cli(env, "down")
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.5)
    left = [p for p in processes if _alive(p)]
    assert not left, f"orphan processes after `clinisynth down`: {left}"


def _logs(home) -> str:
    logs = home / "logs"
    if not logs.exists():
        return ""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.iterdir())
    )


def test_status_json_maps_every_service_and_metrics(stack):
    env, _info, _home = stack
    status = _cli(env, "status", "--json", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    data = json.loads(status.stdout)
    for key in ("generator", "reward", "counterfactual", "finetune", "triton"):
        host, _, port = data[key].rpartition(":")
        assert host and int(port) > 0, (key, data[key])
    assert set(data["metrics"]) == {"generator", "reward", "counterfactual", "finetune"}
    review = urllib.request.urlopen(data["review_url"], timeout=10)
    assert review.status == 200 and b"<html" in review.read().lower()
    assert data["health"] == dict.fromkeys(
        ("generator", "reward", "counterfactual", "finetune"), "SERVING"
    )


def test_triton_ready_and_sample_model_answers(stack):
    from clinisynth_server.triton.client import TritonClient

    _, info, _ = stack
    with TritonClient(info["triton"], key_file=info["triton_key_file"]) as triton:
        assert triton.is_ready()
        assert triton.model_ready("sample_denoiser")
        x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
        out = triton.infer(
            "sample_denoiser",
            {
                "sample": x,
                "timestep": np.array([10.0, 500.0], np.float32),
                "class_labels": np.array([0, 1], np.int64),
            },
            ["noise_pred"],
        )
    assert out["noise_pred"].shape == (2, 1, 16, 16)
    assert np.isfinite(out["noise_pred"]).all()


def test_sdk_finds_the_stack_without_flags(stack):
    env, _, _ = stack
    code = "import clinisynth; c = clinisynth.Client(); print(c.health()); c.close()"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("SERVING") == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exported_names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_real_prometheus_scrapes_the_stack_and_the_catalogue_is_live(stack, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus missing: install Debian's prometheus package (make system-deps)")
    _, info, _ = stack
    targets = {svc: urllib.parse.urlsplit(url).netloc for svc, url in info["metrics"].items()}
    targets["triton"] = urllib.parse.urlsplit(info["triton_metrics"]).netloc
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [addr]}]}
            for name, addr in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query?query="
        deadline = time.monotonic() + 90
        result: list = []
        while time.monotonic() < deadline:
            try:
                body = json.loads(urllib.request.urlopen(api + "up", timeout=5).read())
                result = body["data"]["result"]
                if len(result) == len(targets) and all(r["value"][1] == "1" for r in result):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert {r["metric"]["job"] for r in result if r["value"][1] == "1"} == set(targets)
        query = urllib.parse.quote("count(clinisynth_build_info)")
        body = json.loads(urllib.request.urlopen(api + query, timeout=5).read())
        assert body["data"]["result"][0]["value"][1] == "4"
    finally:
        proc.terminate()
        proc.wait(30)

    # Every metric in the catalogue is really exported by the target it names.
    with open(os.path.join(ROOT, "deploy/prometheus/metrics.yaml")) as f:
        catalogue = yaml.safe_load(f)
    exported: dict[str, set[str]] = {}
    for name, addr in targets.items():
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
        exported[name] = _exported_names(text)
    everything = set().union(*exported.values())
    missing = []
    for metric in catalogue["metrics"]:
        source, name = metric["source"], metric["name"]
        if source == "prometheus":
            continue
        where = (
            set().union(
                *(exported[s] for s in ("generator", "reward", "counterfactual", "finetune"))
            )
            if source == "all-services"
            else exported.get(source, everything)
        )
        base = name.removesuffix("_total")
        if name not in where and base not in where:
            missing.append(f"{name} ({source})")
    assert not missing, f"catalogued but not exported: {missing}"


def test_demo_runs_through_the_stack_with_the_shipped_models(stack, tmp_path):
    """The README's main job (`make demo` = `clinisynth demo`) against the running stack."""
    import pydicom
    from PIL import Image

    env, _, _ = stack
    out = tmp_path / "out"
    demo = _cli(env, "demo", "--out", str(out), "--seed", "1", timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "skipped" not in summary, summary.get("skipped")
    shipped = sorted(
        p.name
        for p in (pathlib.Path(ROOT) / "deploy" / "models").iterdir()
        if (p / "clinisynth.json").is_file()
    )
    assert {m.split("@")[0] for m in summary["models"]} >= set(shipped)
    # Cells: four images per class, each scored by the reward model, scores that differ.
    classes = sorted(p.name for p in (out / "cells").iterdir() if p.is_dir())
    assert classes == sorted(summary["cells"]) and len(classes) >= 4
    for cls in classes:
        assert len(list((out / "cells" / cls).glob("*.png"))) == 4
    rewards = [r for scores in summary["cells"].values() for r in scores]
    assert all(0.0 <= r <= 1.0 for r in rewards) and len(set(rewards)) > 1
    # Chest: one DICOM per prompt, marked synthetic and valid for a real validator.
    dicoms = sorted((out / "chest").glob("*.dcm"))
    assert len(dicoms) == len(summary["chest"]["prompts"]) == 5
    for path in dicoms:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "DX" and ds.ConversionType == "SYN"
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [ln for ln in (check.stdout + check.stderr).splitlines() if "Error" in ln]
            assert not errors, "\n".join(errors)
    # The counterfactual moves the robust classifier to the asked class.
    cf = summary["counterfactual"]
    assert cf["p_before"] < 0.5 < cf["p_after"], cf
    assert any((out / "counterfactual").iterdir())
    # A contact sheet a person can look at: cells, cells, chest, counterfactual rows.
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height == 4 * (96 + 18) and sheet.width > 96 * 5
        assert np.asarray(sheet.convert("L")).std() > 10  # not a blank page
