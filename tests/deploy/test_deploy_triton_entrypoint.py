"""The Triton image's entrypoint (deploy/docker/triton-entrypoint.py): it takes the protected
groups and header from the local launcher (not a copy), fails closed without a key, keeps
secrets out of Triton's environment, and really locks the shipped tritonserver down.

The last test starts the real tritonserver (an empty repository: no python-backend stubs);
run it under the stack lock like every test that starts Triton.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from triton_lockdown import ENTRYPOINT, assert_locked_down, entrypoint, triton_protocol_groups
from tritonclient.utils import InferenceServerException

from clinisynth_server.triton import client, launcher

CANARIES = {
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret",
    "AWS_ACCESS_KEY_ID": "canary-aws-id",
    "CLINISYNTH_AUTH_TOKENS": "canary-token",
    "CLINISYNTH_STORE_SECRET_KEY": "canary-store-secret",
    "HF_TOKEN": "canary-hf",
}


def test_an_operators_openmp_setting_wins(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k")
    environ = {"PATH": "/usr/bin", "GOMP_SPINCOUNT": "0"}
    _, env = entrypoint().build([f"--restricted-key-file={tmp_path / 'key'}"], environ)
    assert env["GOMP_SPINCOUNT"] == "0"
    assert env["KMP_BLOCKTIME"] == str(launcher.KMP_BLOCKTIME_MS)


def test_groups_header_and_secret_names_come_from_the_launcher() -> None:
    ep = entrypoint()
    assert ep.restricted_groups() == launcher.RESTRICTED_GROUPS
    assert ep.key_header() == client.KEY_HEADER
    pattern = ep.secret_name_pattern()
    assert (pattern.pattern, pattern.flags) == (
        launcher._ENV_SECRET.pattern,
        launcher._ENV_SECRET.flags,
    )
    # and that list is every group the shipped Triton has, but health
    assert set(launcher.RESTRICTED_GROUPS) == triton_protocol_groups() - {"health"}


def test_command_restricts_every_group_but_health(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cr3t-Key_value\n")
    command, _ = entrypoint().build(
        [f"--restricted-key-file={key_file}", "--model-repository=/models", "--log-verbose", "1"],
        {"PATH": "/usr/bin"},
    )
    assert command[1:4] == ["--model-repository=/models", "--log-verbose", "1"]
    assert_locked_down(command, "s3cr3t-Key_value")


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "cannot read"), ("", "is empty"), ("a:b=c", "holds"), ("two words", "holds")],
)
def test_fails_closed_without_a_usable_key(
    tmp_path: Path, content: str | None, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    code = entrypoint().main([f"--restricted-key-file={key_file}", "--model-repository=/m"])
    assert code == 2 and why in capsys.readouterr().err


def test_refuses_a_start_without_key_file_or_with_its_own_restriction_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        entrypoint().main(["--model-repository=/models"])
    assert exc.value.code == 2 and "--restricted-key-file" in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text("k")
    open_flag = "--http-restricted-api=health:x=y"
    assert entrypoint().main([f"--restricted-key-file={key_file}", open_flag]) == 2
    assert "set by this entrypoint" in capsys.readouterr().err


def test_environment_has_no_secret_and_store_keys_go_to_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = {"key": "k", "access": "ro-user", "secret": "ro-secret"}
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    environ = {**CANARIES, "PATH": "/usr/bin", "LD_LIBRARY_PATH": "/lib", "OMP_NUM_THREADS": "2"}
    _, env = entrypoint().build(
        [
            f"--restricted-key-file={tmp_path / 'key'}",
            f"--s3-access-key-file={tmp_path / 'access'}",
            f"--s3-secret-key-file={tmp_path / 'secret'}",
            "--s3-region=eu-west-1",
        ],
        environ,
    )
    assert not set(CANARIES) & set(env)
    assert {k: env[k] for k in ("PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS")} == {
        "PATH": "/usr/bin",
        "LD_LIBRARY_PATH": "/lib",
        "OMP_NUM_THREADS": "2",
    }
    assert not any(v in value for v in files.values() for value in env.values() if v != "k")
    # The launcher's short OpenMP spin, as the local stack gives its stubs.
    assert env["GOMP_SPINCOUNT"] == str(launcher.OMP_SPIN_COUNT)
    assert env["KMP_BLOCKTIME"] == str(launcher.KMP_BLOCKTIME_MS)
    creds = Path(env["TRITON_CLOUD_CREDENTIAL_PATH"])
    assert creds.parent == tmp_path and stat.S_IMODE(creds.stat().st_mode) == 0o600
    s3 = json.loads(creds.read_text())["s3"][""]
    assert (s3["key_id"], s3["secret_key"], s3["region"]) == ("ro-user", "ro-secret", "eu-west-1")
    with pytest.raises(entrypoint().EntrypointError, match="go together"):
        entrypoint().build(
            [f"--restricted-key-file={tmp_path / 'key'}", f"--s3-access-key-file={tmp_path}/a"],
            environ,
        )


def _http(url: str, headers: dict[str, str], body: bytes | None = b"{}") -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0  # not listening (yet)


def test_real_tritonserver_started_by_the_entrypoint_is_locked_down(tmp_path: Path) -> None:
    """exec'd in place (same pid), umask 077, no canary in its environ, and every restricted
    endpoint refuses a caller without the key over HTTP and gRPC while health stays open."""
    (tmp_path / "repo").mkdir()
    key = "k3y-" + os.urandom(8).hex()
    (tmp_path / "key").write_text(key)
    grpc_port, http_port, metrics_port = launcher.free_ports(3)
    env = {**launcher.server_environment(), **CANARIES}
    env["PATH"] = f"{launcher.pytriton_dir() / 'bin'}{os.pathsep}{env['PATH']}"
    args = [
        f"--restricted-key-file={tmp_path / 'key'}",
        f"--model-repository={tmp_path / 'repo'}",
        "--model-control-mode=explicit",
        "--allow-gpu-metrics=false",
    ]
    for proto, port in (("grpc", grpc_port), ("http", http_port), ("metrics", metrics_port)):
        args += [f"--{proto}-address=127.0.0.1", f"--{proto}-port={port}"]
    log = (tmp_path / "triton.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while _http(f"{base}/v2/health/ready", {}, None) != 200:
            assert proc.poll() is None, (tmp_path / "triton.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "tritonserver not ready in 60 s"
            time.sleep(0.2)
        proc_dir = Path(f"/proc/{proc.pid}")
        assert Path(os.readlink(proc_dir / "exe")).name == "tritonserver"  # exec'd, same pid
        assert "Umask:\t0077" in (proc_dir / "status").read_text()
        environ = (proc_dir / "environ").read_bytes().decode()
        assert not any(value in environ for value in CANARIES.values())
        assert_locked_down((proc_dir / "cmdline").read_bytes().decode().split("\0"), key)

        with_key = {client.KEY_HEADER: key}
        for path in ("/v2/repository/index", "/v2/logging"):
            assert _http(base + path, {}) == 403, path
            assert _http(base + path, with_key) == 200, path
        assert _http(f"{base}/v2", {}, None) == 403  # server metadata
        assert _http(f"{base}/v2/models/none/infer", {}) == 403
        assert _http(f"{base}/v2/health/live", {}, None) == 200

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            assert grpc.is_server_live()
            with pytest.raises(InferenceServerException, match="restricted"):
                grpc.get_model_repository_index()
            with pytest.raises(InferenceServerException, match="restricted"):
                grpc.get_model_repository_index(headers={client.GRPC_KEY_HEADER: "wrong"})
            index = grpc.get_model_repository_index(headers={client.GRPC_KEY_HEADER: key})
            assert list(index.models) == []
        finally:
            grpc.close()
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
