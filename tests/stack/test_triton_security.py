"""Triton is locked down: without the per-start key every protocol but health is refused (gRPC
and HTTP), its environment holds no secret, and its shared-memory tensors are private.

One real ``tritonserver`` (the shipped sample model) started by the launcher, with secrets put in
the launching environment on purpose; the attacker is a plain tritonclient / urllib caller on
the same host that knows the ports but not the key."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stack_helpers import group_members as _group

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

from clinisynth_server.triton.client import (  # noqa: E402
    GRPC_KEY_HEADER,
    KEY_FILE_ENV,
    KEY_HEADER,
    TritonClient,
)
from clinisynth_server.triton.launcher import TritonServer  # noqa: E402

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_REPO = REPO_ROOT / "deploy" / "triton" / "models"
SAMPLE = "sample_denoiser"
SECRETS = {
    "CLINISYNTH_AUTH_TOKENS": "tok-services-bearer-1",
    "CLINISYNTH_STORE_SECRET_KEY": "s3-secret-value-2",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value-3",
    "AWS_ACCESS_KEY_ID": "aws-access-id-4",
    "MY_DB_PASSWORD": "db-password-5",
    "HF_TOKEN": "hf-token-6",
    "CLINISYNTH_TLS_KEY": "/etc/clinisynth/tls-key-7.pem",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    import shutil

    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(SAMPLE_REPO / SAMPLE, repo / SAMPLE)
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)  # what a service process would hold when it starts Triton
    try:
        srv = TritonServer(repo, key_file=tmp_path_factory.mktemp("k") / "triton.key")
        srv.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield srv
    srv.stop()


def _sample_inputs(client_module: object) -> list:
    x = np.zeros((1, 1, 8, 8), np.float32)
    inputs = [
        client_module.InferInput("sample", list(x.shape), "FP32"),  # type: ignore[attr-defined]
        client_module.InferInput("timestep", [1, 1], "FP32"),  # type: ignore[attr-defined]
        client_module.InferInput("class_labels", [1, 1], "INT64"),  # type: ignore[attr-defined]
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.array([[10.0]], np.float32))
    inputs[2].set_data_from_numpy(np.array([[0]], np.int64))
    return inputs


def _refused(fn: object) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn()  # type: ignore[operator]
    message = str(info.value).lower()
    assert "restricted" in message or "unauthenticated" in message or "permission" in message, (
        message
    )
    return message


def test_grpc_without_key_is_refused(server: TritonServer) -> None:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert c.is_server_ready()  # health stays open for probes
        _refused(lambda: c.load_model(SAMPLE))
        _refused(lambda: c.unload_model(SAMPLE))
        _refused(lambda: c.get_model_repository_index())
        _refused(lambda: c.get_model_config(SAMPLE))
        _refused(lambda: c.update_log_settings({"log_verbose_level": 1}))
        _refused(lambda: c.infer(SAMPLE, _sample_inputs(grpcclient)))
        _refused(lambda: c.get_system_shared_memory_status())
        wrong = {GRPC_KEY_HEADER: "not-the-key"}
        _refused(lambda: c.infer(SAMPLE, _sample_inputs(grpcclient), headers=wrong))
        _refused(lambda: c.unload_model(SAMPLE, headers=wrong))
    finally:
        c.close()


def _http(
    server: TritonServer,
    method: str,
    path: str,
    body: dict | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        server.http_url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_http_without_key_is_refused(server: TritonServer) -> None:
    infer = {
        "inputs": [
            {"name": "sample", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0.0] * 4},
            {"name": "timestep", "shape": [1, 1], "datatype": "FP32", "data": [10.0]},
            {"name": "class_labels", "shape": [1, 1], "datatype": "INT64", "data": [0]},
        ]
    }
    assert _http(server, "GET", "/v2/health/ready") == 200
    calls = [
        ("POST", f"/v2/repository/models/{SAMPLE}/load", {}),
        ("POST", f"/v2/repository/models/{SAMPLE}/unload", {}),
        ("POST", "/v2/repository/index", {}),
        ("GET", f"/v2/models/{SAMPLE}/config", None),
        ("POST", "/v2/logging", {"log_verbose_level": 1}),
        ("POST", f"/v2/models/{SAMPLE}/infer", infer),
    ]
    for method, path, body in calls:
        code = _http(server, method, path, body)
        assert code in (401, 403), (method, path, code)
    # the same calls with the key work (read-only ones; load of a loaded model is a no-op)
    key = {KEY_HEADER: server.key}
    assert _http(server, "POST", "/v2/repository/index", {}, key) == 200
    assert _http(server, "POST", f"/v2/models/{SAMPLE}/infer", infer, key) == 200


def test_clients_with_the_key_work(server: TritonServer) -> None:
    assert server.key_file is not None
    mode = stat.S_IMODE(server.key_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert server.key_file.read_text() == server.key
    # A service process gets only the key file's path (what the stack sets) ...
    with TritonClient(server.grpc_url, key_file=server.key_file, timeout_s=60) as client:
        assert client.model_ready(SAMPLE)
        out = client.infer(
            SAMPLE,
            {
                "sample": np.zeros((2, 1, 8, 8), np.float32),
                "timestep": np.array([10.0, 500.0], np.float32),
                "class_labels": np.array([0, 1], np.int64),
            },
            ["noise_pred"],
        )
        assert out["noise_pred"].shape == (2, 1, 8, 8)
        client.load_model(SAMPLE)
        assert SAMPLE in {e.name for e in client.repository_index()}
    # ... and that is all it needs: the env names the file, never the key.
    assert KEY_FILE_ENV == "CLINISYNTH_TRITON_KEY_FILE"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def test_triton_and_its_stubs_inherit_no_secret(server: TritonServer) -> None:
    assert server.pid is not None
    members = _group(server.pid)
    assert len(members) >= 2  # tritonserver + the sample model's python stub
    for pid in members:
        env = _environ(pid)
        blob = "\0".join(f"{k}={v}" for k, v in env.items())
        for name, value in SECRETS.items():
            assert name not in env and value not in blob, (pid, name)
        assert server.key not in blob, pid
        assert "PATH" in env and "LD_LIBRARY_PATH" in env  # what the stub does need


def test_shared_memory_tensors_are_private(server: TritonServer) -> None:
    with TritonClient(server.grpc_url, key_file=server.key_file, timeout_s=60) as client:
        client.infer(
            SAMPLE,
            {
                "sample": np.zeros((1, 1, 8, 8), np.float32),
                "timestep": np.array([10.0], np.float32),
                "class_labels": np.array([0], np.int64),
            },
            ["noise_pred"],
        )
    # The regions live on the server's private /dev/shm (its own mount namespace): none in the
    # host's /dev/shm, and the private one is a 0700 tmpfs no other user can enter. Root (the
    # test) looks inside through /proc/<pid>/root.
    assert server.pid is not None
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*")), "regions in shared /dev/shm"
    private = Path(f"/proc/{server.pid}/root/dev/shm")
    files = list(private.glob(f"{server.shm_prefix}*"))
    assert files, "the python backend made no shared-memory region"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert private.stat().st_dev != Path("/dev/shm").stat().st_dev  # a mount of its own
