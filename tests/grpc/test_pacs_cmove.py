"""PACS in by C-MOVE against a real Orthanc (issue #19 item 2): the service opens its Storage SCP
(``move_ae_title`` / ``move_port``), asks Orthanc to move the instance there, and the result is
the same de-identified input WADO-RS and C-GET give — through the running reward service (real
Triton, real store) and at the fetch level for the outcomes a PACS can answer.

Orthanc only moves to a DICOM node it knows: the test Orthanc lists ``CSMOVE`` at the move port.
The same AE title is our calling AE, as a PACS usually has one entry per peer.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pydicom
import pytest
from pacs_peers import OrthancPeer, free_port, require_peers

from clinisynth.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from tests.unit.test_deid_profile import identified_dicom

pytestmark = pytest.mark.stack

CLASS = "neutrophil"
MOVE_AE = "CSMOVE"
MISSING_UID = "1.2.826.0.1.3680043.8.498.2"  # well formed, never uploaded


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, move_port: int) -> Iterator[OrthancPeer]:
    plugin = require_peers()
    peer = OrthancPeer(tmp_path_factory.mktemp("pacs-cmove") / "orthanc", plugin)
    config = json.loads(peer.config.read_text())
    config["DicomModalities"] = {"clinisynth": [MOVE_AE, "127.0.0.1", move_port]}
    peer.config.write_text(json.dumps(config))
    peer.start()
    yield peer
    peer.stop()


def _table(orthanc: OrthancPeer, move_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_ae": "ORTHANC",
        "ae_title": MOVE_AE,
        "retrieve": "c-move",
        "move_ae_title": MOVE_AE,
        "move_port": move_port,
        "move_host": "127.0.0.1",
        "timeout_s": 10,
        **extra,
    }


def _uploaded(orthanc: OrthancPeer, size: int = 32) -> tuple[bytes, dict[str, str]]:
    data, _ = identified_dicom(size=size)
    orthanc.upload(data)
    ds = pydicom.dcmread(io.BytesIO(data))
    uids = {
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "sop_uid": str(ds.SOPInstanceUID),
    }
    return data, uids


@pytest.fixture(scope="module")
def cell(orthanc: OrthancPeer) -> tuple[bytes, dict[str, str]]:
    return _uploaded(orthanc)


def _dest(orthanc: OrthancPeer, move_port: int, **extra: Any) -> Any:
    from clinisynth_server.pacs.config import parse_destination

    return parse_destination("o", _table(orthanc, move_port, **extra))


def test_c_move_returns_the_instance_c_get_returns(orthanc, move_port, cell):
    from clinisynth_server.pacs.config import parse_destination
    from clinisynth_server.pacs.fetch import PacsRef, c_get, c_move, retriever

    data, uids = cell
    dest = _dest(orthanc, move_port)
    assert retriever(dest) is c_move
    ref = PacsRef("o", **uids)
    moved = c_move(dest, ref, field="x", max_bytes=len(data) + 1024)
    got = c_get(
        parse_destination(
            "o", {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": "ORTHANC"}
        ),
        ref,
        field="x",
        max_bytes=len(data) + 1024,
    )
    as_moved, as_got = (pydicom.dcmread(io.BytesIO(b)) for b in (moved, got))
    assert as_moved.SOPInstanceUID == uids["sop_uid"]
    assert as_moved.PixelData == as_got.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData


def test_c_move_outcomes_name_the_field(orthanc, move_port, cell):
    from clinisynth_server.errors import FailedPrecondition, InvalidArgument, NotFound
    from clinisynth_server.pacs.fetch import PacsRef, c_move

    _, uids = cell
    dest = _dest(orthanc, move_port)
    with pytest.raises(NotFound) as missing:
        c_move(dest, PacsRef("o", **{**uids, "sop_uid": MISSING_UID}), field="x", max_bytes=1 << 20)
    assert missing.value.metadata["field"] == "x.sop_uid"
    unknown = _dest(orthanc, move_port, move_ae_title="NOTLISTED")
    with pytest.raises(FailedPrecondition, match="NOTLISTED") as refused:
        c_move(unknown, PacsRef("o", **uids), field="x", max_bytes=1 << 20)
    assert refused.value.reason == "PACS_MOVE_DESTINATION_UNKNOWN"
    with pytest.raises(InvalidArgument, match="over the limit of 1000 bytes"):
        c_move(dest, PacsRef("o", **uids), field="x", max_bytes=1000)


def test_concurrent_moves_share_the_scp_and_get_their_own_instance(orthanc, move_port):
    from clinisynth_server.pacs.fetch import MoveScp, PacsRef, c_move

    dest = _dest(orthanc, move_port)
    uploads = [_uploaded(orthanc, 16) for _ in range(3)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            results[i] = c_move(dest, PacsRef("o", **uploads[i][1]), field="x", max_bytes=1 << 20)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(uploads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, (_, uids) in enumerate(uploads):
        assert pydicom.dcmread(io.BytesIO(results[i])).SOPInstanceUID == uids["sop_uid"]
    assert not MoveScp._live  # the last fetch stopped the SCP: nothing listens between fetches


def test_the_move_scp_refuses_instances_no_fetch_asked_for(orthanc, move_port):
    from clinisynth_server.pacs.config import parse_destination
    from clinisynth_server.pacs.cstore import cstore
    from clinisynth_server.pacs.fetch import MoveScp

    dest = _dest(orthanc, move_port)
    pusher = parse_destination(
        "scp", {"host": "127.0.0.1", "port": move_port, "called_ae": MOVE_AE, "timeout_s": 10}
    )
    data, _ = identified_dicom(size=16)
    sop_uid = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    scp = MoveScp.acquire(dest, "x")
    try:
        assert cstore(pusher, [(sop_uid, data)]) == set()  # refused: nobody waits for it
        wait = scp.expect(sop_uid, 1 << 20)
        assert cstore(pusher, [(sop_uid, data)]) == {sop_uid}  # awaited: taken
        assert wait.received and pydicom.dcmread(io.BytesIO(wait.received[0])).SOPInstanceUID
        scp.forget(sop_uid, wait)
    finally:
        scp.release()


@pytest.fixture(scope="module")
def reward(
    orthanc: OrthancPeer,
    move_port: int,
    triton_server: Any,
    store_url: str,
    session_dir: Any,
    reward_model: Any,
) -> Iterator[reward_pb2_grpc.RewardServiceStub]:
    from tests.conftest import start_service

    home = session_dir / "pacs-cmove"
    home.mkdir(parents=True, exist_ok=True)
    table = _table(orthanc, move_port)
    lines = [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    config = home / "clinisynth.toml"
    config.write_text("[pacs.orthanc-move]\n" + "\n".join(lines) + "\n")
    server = start_service(
        "reward", triton_server.grpc_url, store_url, home / "reward", config_file=str(config)
    )
    channel = grpc.insecure_channel(server.address)
    yield reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()
    server.stop(0)


def _score(image: common_pb2.Image) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        images=[image], condition=common_pb2.Condition(class_name=CLASS), resize=True
    )


def test_score_by_c_move_equals_score_of_the_upload(reward, cell):
    data, uids = cell
    by_move = reward.Score(
        _score(common_pb2.Image(pacs=common_pb2.PacsRef(pacs="orthanc-move", **uids))), timeout=60
    )
    inline = reward.Score(_score(common_pb2.Image(dicom=data)), timeout=60)
    assert by_move.scores[0].p_aligned == pytest.approx(inline.scores[0].p_aligned, abs=1e-6)
    with pytest.raises(grpc.RpcError) as info:
        reward.Score(
            _score(
                common_pb2.Image(
                    pacs=common_pb2.PacsRef(pacs="orthanc-move", **{**uids, "sop_uid": MISSING_UID})
                )
            ),
            timeout=60,
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "images[0].pacs.sop_uid" in info.value.details()
