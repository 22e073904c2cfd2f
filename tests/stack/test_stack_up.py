"""The one-command stack: `clinisynth up --detach`, status, a real Prometheus scraping it, the
stack's supervision of Triton (kill -9 during a generation recovers), the demo, down.

Runs the CLI as a user would (subprocesses, CLINISYNTH_HOME in a temp folder); one stack for
the module."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml
from stack_helpers import alive, cli, comm, group_members, stack_logs

pytestmark = pytest.mark.stack
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    up = cli(env, "up", "--detach", "--wait", "500")
    assert up.returncode == 0, up.stdout + up.stderr + stack_logs(home)
    info = json.loads(up.stdout)
    processes = _descendants(info["pid"]) | {info["pid"]}
    yield env, info, home
    # Every process group the stack recorded by now (a restarted Triton's included).
    pids_file = home / "stack.pids"
    recorded = json.loads(pids_file.read_text())["groups"] if pids_file.exists() else []
    down = cli(env, "down")
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 60

    def left() -> list[int]:
        return [p for p in processes if alive(p)] + [m for g in recorded for m in group_members(g)]

    while time.monotonic() < deadline and left():
        time.sleep(0.5)
    assert not left(), f"orphan processes after `clinisynth down`: {left()}"


def test_status_json_maps_every_service_and_metrics(stack):
    env, _info, _home = stack
    status = cli(env, "status", "--json", timeout=60)
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


RECOVERY_S = 60.0  # the bound: generation works again within a minute


def _triton_pid(home: pathlib.Path) -> int:
    groups = json.loads((home / "stack.pids").read_text())["groups"]
    for pgid in groups:
        if comm(pgid) == "tritonserver" and alive(pgid):
            return int(pgid)
    raise AssertionError(f"no live tritonserver among the recorded groups {groups}")


# Before the demo (pytest keeps file order): Triton restarts with the shipped models alone, and
# the demo then shows the recovered stack does its main job.
@pytest.mark.timeout(900)
def test_kill_9_of_triton_during_generate_recovers(stack) -> None:  # type: ignore[no-untyped-def]
    """The stack supervises Triton: kill -9 of ``tritonserver`` during a generation ends that
    call UNAVAILABLE, the services answer NOT_SERVING while it is down, generation works again
    within 60 s with no manual step, and no python-backend stub of the dead server is left."""
    import clinisynth
    from clinisynth import ClinisynthError

    _env, info, home = stack
    old = _triton_pid(home)
    old_members = group_members(old)
    assert len(old_members) >= 3, old_members  # tritonserver + its python stubs
    endpoints = {k: info[k] for k in ("generator", "reward", "counterfactual", "finetune")}

    # A long generation, streaming (never retried); Triton dies after its first step.
    stepped = threading.Event()
    outcome: dict[str, object] = {}

    def generate() -> None:
        with clinisynth.Client(endpoints=endpoints, retries=0, timeout=300) as client:
            try:
                client.generate(
                    "cells",
                    class_name="neutrophil",
                    n=1,
                    steps=1000,
                    seed=3,
                    progress=lambda event: stepped.set(),
                )
                outcome["result"] = "completed"
            except ClinisynthError as err:
                outcome["result"] = err.code

    worker = threading.Thread(target=generate)
    worker.start()
    assert stepped.wait(240), "the generation never made a step" + stack_logs(home)
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    worker.join(120)
    assert not worker.is_alive()
    assert outcome["result"] == "UNAVAILABLE", outcome

    seen_not_serving = False
    recovered_after = None
    with clinisynth.Client(endpoints=endpoints, retries=0, timeout=30) as client:
        while time.monotonic() - killed_at < RECOVERY_S + 30:
            health = client.health(timeout=2)
            if "NOT_SERVING" in health.values():
                seen_not_serving = True
            if seen_not_serving and health.get("generator") == "SERVING":
                try:
                    result = client.generate("cells", class_name="neutrophil", n=1, steps=4, seed=1)
                except ClinisynthError as err:
                    assert err.code == "UNAVAILABLE", err  # still coming up: the only answer
                else:
                    assert len(result.images) == 1
                    recovered_after = time.monotonic() - killed_at
                    break
            time.sleep(0.25)
    assert seen_not_serving, "no service reported NOT_SERVING while Triton was down"
    assert recovered_after is not None and recovered_after <= RECOVERY_S, (
        f"no generation within {RECOVERY_S:.0f}s of the kill (took {recovered_after})"
        + stack_logs(home)
    )

    # The dead server's stubs are gone; a new server runs on the same port.
    assert [p for p in old_members if alive(p)] == []
    new = _triton_pid(home)
    assert new != old and len(group_members(new)) >= 3
    assert group_members(old) == [], "orphaned processes of the killed server's group"
    print(f"recovered {recovered_after:.1f}s after kill -9")


def test_demo_runs_through_the_stack_with_the_shipped_models(stack, tmp_path):
    """The README's main job (`make demo` = `clinisynth demo`) against the running stack."""
    import pydicom
    from PIL import Image

    env, _, _ = stack
    out = tmp_path / "out"
    demo = cli(env, "demo", "--out", str(out), "--seed", "1", timeout=900)
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
