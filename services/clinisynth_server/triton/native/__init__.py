"""The ``argv_key`` preload library: Triton's key reaches it without touching its command line.

Triton 2.51 takes its restricted-protocol keys only from argv, which every local user can read
in ``/proc/<pid>/cmdline``. ``argv_key.c`` (see its header) is preloaded into ``tritonserver``
and completes those options with the key from a 0600 file while Triton parses them, so the
key is never in argv. It is compiled from source with the system C compiler on first use and
cached by the source's digest; where no compiler is found (or the build fails) the launcher
falls back to the key on the command line and says so (:func:`unavailable_reason`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("argv_key.c")
# The variable naming the key file for the library; it removes it (and LD_PRELOAD) at once.
KEY_FILE_ENV = "CLINISYNTH_TRITON_ARGV_KEY_FILE"
# What Triton prints when the option arrives without its ``=<key>`` (the library was not
# active): the launcher then knows to fall back rather than report a vague start failure.
UNPATCHED_OPTION_MARKER = "option format is '<config name>:<setting>=<value>'"

log = logging.getLogger(__name__)
_failure: str | None = None  # why the library cannot be used in this process, once known


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc`` / ``gcc`` on ``PATH``."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (found := shutil.which(name)):
            return found
    return None


def library_path(cache_root: Path) -> Path:
    """Where the library for this source and machine lives (a new source, a new file)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return cache_root / "native" / f"argv_key-{platform.machine()}-{digest}.so"


def build(cache_root: Path) -> Path:
    """Compile the library into the cache unless it is there; its path.

    Built to a temp file and renamed into place, so concurrent launchers never load half a
    file. Raises :class:`RuntimeError` (with the compiler's output) when it cannot be built."""
    target = library_path(cache_root)
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".argv_key-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"]
        proc = subprocess.run(
            [*cmd, "-o", tmp, str(SOURCE), "-ldl"], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def shim_library(cache_root: Path) -> Path | None:
    """The built library, or ``None`` (with one warning per process) where it cannot be had."""
    global _failure
    if _failure is not None:
        return None
    try:
        return build(cache_root)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        disable(str(err))
        return None


def disable(reason: str) -> None:
    """Stop using the library in this process (it failed to build or to take effect)."""
    global _failure
    if _failure is None:
        log.warning(
            "Triton's key goes on its command line (/proc/<pid>/cmdline, readable by local "
            "users unless /proc is mounted hidepid=2): the argv_key library is unavailable: %s",
            reason,
        )
    _failure = reason


def unavailable_reason() -> str | None:
    """Why the library is not in use in this process (``None`` while it is, or is untried)."""
    return _failure
