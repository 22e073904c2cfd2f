"""What a benchmark needs of the host: background CPU load, memory high-water marks, GPU memory.

- :class:`BackgroundLoad`: N niced busy processes, started from the benchmark's own session (as a
  ``nice`` job from the same shell is), for both sides of a comparison alike.
- :class:`HostMemory`: the host's peak memory in use (``MemTotal - MemAvailable``) above what was
  in use when sampling started, read every ``interval_s`` on a thread.
- :func:`peak_rss_mb` / :func:`process_tree`: a process's ``VmHWM`` and its descendants (Triton's
  python-backend stubs are children of ``tritonserver``).
- :func:`gpu_memory_mb`: memory ``nvidia-smi`` reports per process (empty without a GPU).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import shutil
import subprocess
import sys
import threading
from types import TracebackType

PROC = pathlib.Path("/proc")
# Lowers its own priority first, then a busy loop that never allocates: pure CPU load.
_BUSY = "import os, sys\nos.nice(int(sys.argv[1]))\nwhile True:\n    pass\n"


class BackgroundLoad:
    """``count`` CPU-bound processes at ``nice`` (19: the lowest priority) while in the block."""

    def __init__(self, count: int, nice: int = 19) -> None:
        if count < 0:
            raise ValueError(f"background load must be >= 0 processes, got {count}")
        self.count = count
        self.nice = nice
        self.procs: list[subprocess.Popen[bytes]] = []

    def command(self) -> list[str]:
        return [sys.executable, "-c", _BUSY, str(self.nice)]

    def start(self) -> BackgroundLoad:
        for _ in range(self.count):
            self.procs.append(
                subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return self

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []

    def __enter__(self) -> BackgroundLoad:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _meminfo_kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def host_used_mb(meminfo: str | None = None) -> float:
    """Memory in use on the host: ``MemTotal - MemAvailable`` (page cache not counted)."""
    text = meminfo if meminfo is not None else (PROC / "meminfo").read_text()
    return (_meminfo_kb(text, "MemTotal") - _meminfo_kb(text, "MemAvailable")) / 1024


class HostMemory:
    """Peak host memory in use while in the block, above the level when it started."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_above_baseline_mb(self) -> float:
        return max(0.0, self.peak_mb - self.baseline_mb)

    def sample(self) -> None:
        self.peak_mb = max(self.peak_mb, host_used_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> HostMemory:
        self.baseline_mb = self.peak_mb = host_used_mb()
        self._thread = threading.Thread(target=self._run, daemon=True, name="host-memory")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def peak_rss_mb(pid: int) -> float:
    """``VmHWM`` (the process's peak resident set) in MB; NaN once it is gone."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return float("nan")
    try:
        return _meminfo_kb(text, "VmHWM") / 1024
    except KeyError:
        return float("nan")


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and every live descendant, each with its command line (short)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[-1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        names[int(entry.name)] = cmdline.strip()
    tree, todo = {}, [pid]
    while todo:
        current = todo.pop()
        tree[current] = names.get(current, "")
        todo.extend(children.get(current, []))
    return tree


def gpu_memory_mb() -> dict[int, float]:
    """GPU memory per process id as ``nvidia-smi`` reports it; empty without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run(
            [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage: dict[int, float] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            with contextlib.suppress(ValueError):
                usage[int(parts[0])] = usage.get(int(parts[0]), 0.0) + float(parts[1])
    return usage


def gpu_used_total_mb() -> float:
    """Memory in use on every GPU together (``nvidia-smi``); NaN without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return float("nan")
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
    return sum(values) if values else float("nan")


class GpuMemory:
    """Peak GPU memory in use (all processes, ``nvidia-smi``) while in the block; NaN without."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> float:
        used = gpu_used_total_mb()
        if not math.isnan(used) and (math.isnan(self.peak_mb) or used > self.peak_mb):
            self.peak_mb = used
        return used

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi") is not None:
            self.sample()
            self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-memory")
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.sample()
