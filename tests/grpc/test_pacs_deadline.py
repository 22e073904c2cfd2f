"""Every PACS fetch is bounded by the calling RPC's deadline (issue #19 item 2): against a PACS
that accepts the connection and never answers (a plain socket server that reads nothing), the
running reward and counterfactual services answer DEADLINE_EXCEEDED themselves — the
``PACS_DEADLINE_EXCEEDED`` ErrorInfo proves the answer came from the service before the caller's
own deadline, not from the client giving up — by every retrieve method. When the destination's
own ``timeout_s`` is the shorter limit, the PACS counts as down: UNAVAILABLE.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from pacs_peers import free_port

from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

pytestmark = pytest.mark.stack

CLASS = "neutrophil"
UIDS = {"study_uid": "1.2.3.1", "series_uid": "1.2.3.2", "sop_uid": "1.2.3.3"}
DEADLINE_S = 5.0  # the caller's deadline (a tenth, 0.5 s, is kept back); timeout_s is 120 s


class WedgedPeer:
    """Accepts every connection and never reads or writes: a hung PACS."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted += 1

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def wedged() -> Iterator[WedgedPeer]:
    peer = WedgedPeer()
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def servers(
    wedged: WedgedPeer,
    triton_server: Any,
    store_url: str,
    session_dir: Any,
    model_repository: Any,
    reward_model: Any,
    cf_models: Any,
) -> Iterator[dict[str, Any]]:
    from tests.conftest import start_service

    home = session_dir / "pacs-deadline"
    home.mkdir(parents=True, exist_ok=True)
    dimse = f'host = "127.0.0.1"\nport = {wedged.port}\ncalled_ae = "WEDGED"\n'
    config = home / "clinisynth.toml"
    config.write_text(
        f'[pacs.web]\ndicomweb_url = "http://127.0.0.1:{wedged.port}/dicom-web"\n'
        "timeout_s = 120\n\n"
        f"[pacs.get]\n{dimse}timeout_s = 120\n\n"
        f'[pacs.move]\n{dimse}retrieve = "c-move"\nmove_ae_title = "CSMOVE"\n'
        f'move_port = {free_port()}\nmove_host = "127.0.0.1"\ntimeout_s = 120\n\n'
        f"[pacs.short]\n{dimse}timeout_s = 1\n"
    )
    reward = start_service(
        "reward", triton_server.grpc_url, store_url, home / "reward", config_file=str(config)
    )
    cf = start_service(
        "counterfactual",
        triton_server.grpc_url,
        store_url,
        home / "cf",
        model_repository=str(model_repository),
        config_file=str(config),
    )
    yield {"reward": reward, "counterfactual": cf}
    reward.stop(0)
    cf.stop(0)


@pytest.fixture(scope="module")
def reward(servers: dict[str, Any]) -> Iterator[reward_pb2_grpc.RewardServiceStub]:
    channel = grpc.insecure_channel(servers["reward"].address)
    yield reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()


def _pacs(name: str) -> common_pb2.Image:
    return common_pb2.Image(pacs=common_pb2.PacsRef(pacs=name, **UIDS))


def _score(name: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        images=[_pacs(name)], condition=common_pb2.Condition(class_name=CLASS), resize=True
    )


def _refusal(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """Code, details and the ErrorInfo reason of a failed call ("" when the service sent none,
    as when the client's own deadline fired)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)
    reason = ""
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error = error_details_pb2.ErrorInfo()
                detail.Unpack(error)
                reason = error.reason
    return info.value.code(), info.value.details(), reason


@pytest.mark.parametrize("name", ["web", "get", "move"])
def test_a_wedged_pacs_fails_score_within_the_deadline(reward, wedged, name):
    before = wedged.accepted
    code, details, reason = _refusal(lambda: reward.Score(_score(name), timeout=DEADLINE_S))
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "PACS_DEADLINE_EXCEEDED"), details
    assert "images[0].pacs" in details and repr(name) in details
    assert wedged.accepted > before  # the service did reach the PACS and waited on it


def test_a_wedged_pacs_fails_a_score_stream_within_the_deadline(reward):
    stream = [
        reward_pb2.ScoreStreamRequest(
            config=reward_pb2.ScoreStreamConfig(
                condition=common_pb2.Condition(class_name=CLASS), resize=True
            )
        ),
        reward_pb2.ScoreStreamRequest(image=reward_pb2.NamedImage(name="a", image=_pacs("get"))),
    ]
    code, details, reason = _refusal(
        lambda: list(reward.ScoreStream(iter(stream), timeout=DEADLINE_S))
    )
    assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "PACS_DEADLINE_EXCEEDED"), details


def test_a_wedged_pacs_fails_a_counterfactual_within_the_deadline(servers):
    from tests.grpc.test_pacs_in import _cf

    channel = grpc.insecure_channel(servers["counterfactual"].address)
    try:
        cf = counterfactual_pb2_grpc.CounterfactualServiceStub(channel)
        for name in ("web", "move"):
            code, details, reason = _refusal(
                lambda: cf.CreateCounterfactual(_cf(_pacs(name)), timeout=DEADLINE_S)  # noqa: B023
            )
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
            assert reason == "PACS_DEADLINE_EXCEEDED" and "image.pacs" in details
    finally:
        channel.close()


def test_the_destinations_shorter_timeout_is_unavailable(reward):
    code, details, reason = _refusal(lambda: reward.Score(_score("short"), timeout=60))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PACS_UNAVAILABLE"), details
    assert "timeout_s" in details and "images[0].pacs" in details
