"""The CLI acts like a Unix tool when its reader leaves (``clinisynth status --json | head``)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys


def test_closed_pipe_exits_quietly(tmp_path: pathlib.Path) -> None:
    # A recorded stack whose services are gone: `status --json` still prints its JSON (health
    # UNKNOWN / unreachable), which is what a reader like `head` cuts short.
    closed = "127.0.0.1:1"
    stack = {name: closed for name in ("generator", "reward", "counterfactual", "finetune")}
    (tmp_path / "stack.json").write_text(json.dumps({**stack, "triton": closed, "pid": 1}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinisynth", "status", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CLINISYNTH_HOME": str(tmp_path)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader left before anything was written
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, what a shell reports for a cut pipe
