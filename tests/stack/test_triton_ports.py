"""A second Triton on ports another server holds must fail to start, not borrow its readiness."""

from __future__ import annotations

import pytest

from clinisynth_server.errors import Unavailable
from clinisynth_server.triton.launcher import TritonServer

pytestmark = pytest.mark.stack


def test_start_refuses_when_another_server_owns_the_ports(tmp_path):
    (tmp_path / "repo").mkdir()
    first = TritonServer(tmp_path / "repo", log_path=tmp_path / "a.log", strict=False).start()
    try:
        second = TritonServer(
            tmp_path / "repo",
            grpc_port=first.ports.grpc,
            http_port=first.ports.http,
            log_path=tmp_path / "b.log",
            strict=False,
        )
        with pytest.raises(Unavailable):
            second.start()
        assert not second.is_running()
        assert first.is_ready()
    finally:
        first.stop()
