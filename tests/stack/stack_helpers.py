"""What the stack tests share: the CLI as a user runs it, the stack's logs for a failure
message, and /proc reads that tell which processes are left (a zombie counts as gone)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``clinisynth <args>`` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "clinisynth.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stack_logs(home: Path, tail: int = 2500) -> str:
    """The last ``tail`` characters of every log under ``home/logs``: a failure's evidence."""
    logs = home / "logs"
    if not logs.exists():
        return ""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(logs.iterdir())
    )


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def processes_of(home: Path) -> list[tuple[int, str]]:
    """Live processes whose command line or environment names ``home`` (what `up` started)."""
    mark = str(home).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in cmdline or mark in environ:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode()[:200]))
    return found


def no_process_left(home: Path, within_s: float = 30.0) -> list[tuple[int, str]]:
    """The processes of ``home`` still alive after ``within_s`` (empty: all gone)."""
    deadline = time.monotonic() + within_s
    left = processes_of(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = processes_of(home)
    return left
