"""CPU sharing of Triton's stubs: the caller's session, brief OpenMP spinning, per-instance threads.

No Triton here: the launcher's environment and process grouping are checked as the values it
hands to ``Popen``, and the grouping by starting a real (tiny) child with them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from clinisynth_server.triton import launcher
from clinisynth_server.triton.backends._base import configure_torch_threads


def test_stubs_spin_briefly_unless_the_operator_says_otherwise() -> None:
    env = launcher.server_environment(base={"PATH": "/usr/bin"})
    assert env["GOMP_SPINCOUNT"] == str(launcher.OMP_SPIN_COUNT)
    assert int(env["GOMP_SPINCOUNT"]) < 300_000  # libgomp's own default spins far longer
    assert env["KMP_BLOCKTIME"] == str(launcher.KMP_BLOCKTIME_MS)
    chosen = launcher.server_environment(
        base={"PATH": "/usr/bin", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}
    )
    assert (chosen["GOMP_SPINCOUNT"], chosen["KMP_BLOCKTIME"]) == ("0", "0")
    # GOMP_ variables pass the allow-list; names that look like secrets still do not.
    passed = launcher.server_environment(
        base={"PATH": "/usr/bin", "GOMP_CPU_AFFINITY": "0-1", "GOMP_API_KEY": "x"}
    )
    assert passed["GOMP_CPU_AFFINITY"] == "0-1" and "GOMP_API_KEY" not in passed


def _child_ids(**kwargs: object) -> tuple[int, int, int]:
    """(pid, process group, session) of a child started with ``kwargs``."""
    code = "import os; print(os.getpid(), os.getpgrp(), os.getsid(0))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, **kwargs
    ).stdout
    pid, pgrp, sid = (int(v) for v in out.split())
    return pid, pgrp, sid


def test_triton_runs_in_its_own_group_inside_the_callers_session() -> None:
    pid, pgrp, sid = _child_ids(**launcher.grouping())
    assert pgrp == pid  # stop() can signal the whole group, stubs included
    assert pgrp != os.getpgrp()  # the terminal's Ctrl-C does not reach it
    assert sid == os.getsid(0)  # same session: same CPU-share group under autogroup

    pid, pgrp, sid = _child_ids(**launcher.grouping(own_session=True))
    assert sid == pid == pgrp  # the old behaviour, on request: a session of its own


def test_the_server_is_started_with_that_grouping() -> None:
    assert launcher.TritonServer("/nonexistent").own_session is False
    assert launcher.TritonServer("/nonexistent", own_session=True).own_session is True


@pytest.fixture()
def restore_threads() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_intra_op_threads_per_instance_and_by_parameter() -> None:
    import torch

    cores = os.cpu_count() or 1
    configure_torch_threads({}, instance_count=1)
    assert torch.get_num_threads() == cores
    configure_torch_threads({}, instance_count=cores * 2)
    assert torch.get_num_threads() == 1  # never zero
    configure_torch_threads({"torch_threads": "3"}, instance_count=cores)
    assert torch.get_num_threads() == 3  # the model's parameter wins
