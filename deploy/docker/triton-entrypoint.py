"""Entrypoint of the Triton image: start ``tritonserver`` locked down like the local stack does.

Triton's ports take model load / unload, logging changes and inference from anything that can
reach them, so in compose and Kubernetes, as under ``clinisynth up``, every protocol group but
``health`` needs the key header the services send. This wrapper:

- reads the key from a mounted secret file (``--restricted-key-file``; never an environment
  variable) and appends ``--grpc-restricted-protocol`` / ``--http-restricted-api`` for the
  groups and header the local launcher uses. They are read from the installed
  ``clinisynth_server`` sources (``triton/launcher.py``, ``triton/client.py``), not copied:
  the Triton image has no ``tritonclient``, so the modules are parsed, not imported.
  Without a readable, non-empty key file it refuses to start (fail closed);
- optionally turns the store's access / secret key *files* into Triton's cloud credential
  file (``TRITON_CLOUD_CREDENTIAL_PATH``, 0600 in ``$TMPDIR``), for an ``s3://`` model
  repository, so no credential is in Triton's environment;
- execs ``tritonserver`` (it keeps this process's pid, signals and exit code) with umask 077
  and an environment without any variable whose name looks like a secret (the launcher's
  pattern), so a python-backend stub inherits none; and with the launcher's short OpenMP
  spin (``GOMP_SPINCOUNT`` / ``KMP_BLOCKTIME``, unless the operator set them), so idle stub
  threads sleep instead of spinning against the other stubs on a shared host.

Triton 2.51 reads the key only from its command line, so the key is in ``/proc/<pid>/cmdline``
of the server. In a container that is visible only inside Triton's own pid namespace (its
container; Kubernetes pods do not share it unless ``shareProcessNamespace`` is set), and to the
host's root.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

LAUNCHER_MODULE = "clinisynth_server.triton.launcher"
CLIENT_MODULE = "clinisynth_server.triton.client"
# Triton's own flags for the restricted protocols: this wrapper owns them.
OWNED_FLAGS = ("--grpc-restricted-protocol", "--http-restricted-api")
DEFAULT_TRITONSERVER = "/opt/tritonserver/bin/tritonserver"


class EntrypointError(Exception):
    """A configuration problem that must stop the container before Triton starts."""


def _module_source(module: str) -> str:
    """Source of an installed module, found without executing it (its imports may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise EntrypointError(f"{module} is not installed: the image needs the clinisynth wheel")
    return Path(spec.origin).read_text(encoding="utf-8")


def _assignment(source: str, name: str) -> ast.expr:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return node.value
        elif (
            isinstance(node, ast.AnnAssign)
            and node.value is not None
            and isinstance(node.target, ast.Name)
            and node.target.id == name
        ):
            return node.value
    raise EntrypointError(f"no top-level {name} found")


def restricted_groups(launcher_source: str | None = None) -> tuple[str, ...]:
    """``RESTRICTED_GROUPS`` of the launcher: every protocol group that needs the key."""
    source = launcher_source if launcher_source is not None else _module_source(LAUNCHER_MODULE)
    groups = ast.literal_eval(_assignment(source, "RESTRICTED_GROUPS"))
    if not groups or not all(isinstance(g, str) and g for g in groups):
        raise EntrypointError("RESTRICTED_GROUPS is not a non-empty sequence of names")
    return tuple(groups)


def key_header(client_source: str | None = None) -> str:
    """``KEY_HEADER`` of the Triton client: the header name on Triton's command line."""
    source = client_source if client_source is not None else _module_source(CLIENT_MODULE)
    header = ast.literal_eval(_assignment(source, "KEY_HEADER"))
    if not isinstance(header, str) or not header:
        raise EntrypointError("KEY_HEADER is not a non-empty string")
    return header


def secret_name_pattern(launcher_source: str | None = None) -> re.Pattern[str]:
    """The launcher's ``_ENV_SECRET``: environment names that never reach Triton."""
    source = launcher_source if launcher_source is not None else _module_source(LAUNCHER_MODULE)
    node = _assignment(source, "_ENV_SECRET")
    if not (isinstance(node, ast.Call) and node.args):
        raise EntrypointError("_ENV_SECRET is not a re.compile(...) call")
    pattern = ast.literal_eval(node.args[0])
    flags = re.IGNORECASE if "IGNORECASE" in ast.unparse(node) else 0
    return re.compile(pattern, flags)


def omp_spin_env(launcher_source: str | None = None) -> dict[str, str]:
    """The launcher's OpenMP spin limits for the stubs (OMP_SPIN_COUNT, KMP_BLOCKTIME_MS)."""
    source = launcher_source if launcher_source is not None else _module_source(LAUNCHER_MODULE)
    values = {}
    for env_name, constant in (
        ("GOMP_SPINCOUNT", "OMP_SPIN_COUNT"),
        ("KMP_BLOCKTIME", "KMP_BLOCKTIME_MS"),
    ):
        value = ast.literal_eval(_assignment(source, constant))
        if not isinstance(value, int):
            raise EntrypointError(f"{constant} is not an integer literal")
        values[env_name] = str(value)
    return values


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise EntrypointError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if not value:
        raise EntrypointError(f"the {what} file {path} is empty")
    if any(c.isspace() or c in ",:=" for c in value) or not value.isprintable():
        # Triton's flag syntax is <groups>:<header>=<key>; such characters would break it.
        raise EntrypointError(f"the {what} file {path} holds whitespace, ',', ':' or '='")
    return value


def restriction_args(key: str, groups: Sequence[str], header: str) -> list[str]:
    """The two flags, exactly as the local launcher builds them."""
    spec = f"{','.join(groups)}:{header}={key}"
    return [f"{OWNED_FLAGS[0]}={spec}", f"{OWNED_FLAGS[1]}={spec}"]


def _write_cloud_credentials(access_key: str, secret_key: str, region: str) -> Path:
    """Triton's credential file for every ``s3://`` path, readable by this user only."""
    doc = {
        "s3": {
            "": {
                "key_id": access_key,
                "secret_key": secret_key,
                "region": region,
                "session_token": "",
                "profile": "",
            }
        }
    }
    fd, name = tempfile.mkstemp(prefix="triton-cloud-credentials-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp makes it 0600
        json.dump(doc, out)
    return Path(name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Start tritonserver with clinisynth's restricted protocols; every "
        "argument this wrapper does not know goes to tritonserver.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--restricted-key-file",
        type=Path,
        required=True,
        help="mounted secret file holding the restricted-protocol key",
    )
    parser.add_argument("--s3-access-key-file", type=Path, default=None)
    parser.add_argument("--s3-secret-key-file", type=Path, default=None)
    parser.add_argument("--s3-region", default="us-east-1")
    return parser


def build(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(tritonserver argv, its environment) for this wrapper's ``argv`` (without argv[0])."""
    args, passthrough = _parser().parse_known_args(list(argv))
    for arg in passthrough:
        if arg.split("=", 1)[0] in OWNED_FLAGS:
            raise EntrypointError(f"{arg.split('=', 1)[0]} is set by this entrypoint; drop it")
    key = _read_secret(args.restricted_key_file, "restricted-protocol key")
    launcher = _module_source(LAUNCHER_MODULE)
    secret = secret_name_pattern(launcher)
    env = {name: value for name, value in environ.items() if not secret.search(name)}
    if (args.s3_access_key_file is None) != (args.s3_secret_key_file is None):
        raise EntrypointError("--s3-access-key-file and --s3-secret-key-file go together")
    if args.s3_access_key_file is not None and args.s3_secret_key_file is not None:
        path = _write_cloud_credentials(
            _read_secret(args.s3_access_key_file, "S3 access key"),
            _read_secret(args.s3_secret_key_file, "S3 secret key"),
            args.s3_region,
        )
        env["TRITON_CLOUD_CREDENTIAL_PATH"] = str(path)  # a path; Triton reads the file
    for name, value in omp_spin_env(launcher).items():
        env.setdefault(name, value)
    binary = shutil.which("tritonserver", path=env.get("PATH")) or DEFAULT_TRITONSERVER
    command = [
        binary,
        *passthrough,
        *restriction_args(key, restricted_groups(launcher), key_header()),
    ]
    return command, env


def main(argv: Sequence[str] | None = None) -> int:
    """Build the command and exec it; exit 2 with a one-line reason when misconfigured."""
    try:
        command, env = build(sys.argv[1:] if argv is None else argv, os.environ)
    except EntrypointError as exc:
        print(f"clinisynth-triton-entrypoint: {exc}", file=sys.stderr)
        return 2
    os.umask(0o077)
    os.execve(command[0], command, env)
    return 127  # not reached: execve replaces this process or raises


if __name__ == "__main__":
    raise SystemExit(main())
