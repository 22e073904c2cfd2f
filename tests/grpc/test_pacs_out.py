"""PACS out against real peers: Orthanc (+ DICOMweb plugin) for STOW-RS, dcmtk's storescp for
C-STORE, both on loopback. Generate → outbox → PACS → fetch back and compare; an outage delays
delivery, loses nothing and sends nothing twice."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pydicom
import pytest
from pacs_peers import OrthancPeer, StoreScp, require_peers

import clinisynth

pytestmark = pytest.mark.stack


def _until(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``check`` until truthy; the timeout only bounds a hang, nothing is timed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancPeer, StoreScp]]:
    plugin = require_peers()
    root = tmp_path_factory.mktemp("pacs")
    orthanc = OrthancPeer(root / "orthanc", plugin)
    orthanc.start()
    scp = StoreScp(root / "scp" / "in")
    yield orthanc, scp
    scp.stop()
    orthanc.stop()


@pytest.fixture(scope="module")
def pacs_generator(
    peers: tuple[OrthancPeer, StoreScp],
    triton_server: Any,
    store_url: str,
    registered_models: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """A generator configured with both destinations; quick retries so an outage test is short."""
    from conftest import start_service

    orthanc, scp = peers
    home = tmp_path_factory.mktemp("pacs-generator")
    config = home / "clinisynth.toml"
    config.write_text(
        f'[pacs.orthanc]\ndicomweb_url = "{orthanc.dicomweb_url}"\n\n'
        f'[pacs.scp]\nhost = "127.0.0.1"\nport = {scp.port}\ncalled_ae = "{scp.ae_title}"\n'
    )
    running = start_service(
        "generator",
        triton_server.grpc_url,
        store_url,
        home,
        config_file=str(config),
        pacs_retry_base_s="0.2",
        pacs_retry_max_s="0.5",
        pacs_poll_s="0.1",
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def pacs_client(pacs_generator: Any) -> Iterator[clinisynth.Client]:
    with clinisynth.Client(endpoints={"generator": pacs_generator.address}, timeout=120) as client:
        yield client


def _delivered(client: clinisynth.Client, uids: set[str]) -> list[clinisynth.PacsItem]:
    items = [i for i in client.pacs_outbox(limit=1000) if i.sop_instance_uid in uids]
    return items if len(items) == len(uids) and all(i.status == "delivered" for i in items) else []


def _orthanc_instance(orthanc: OrthancPeer, sop_uid: str) -> list[str]:
    import urllib.request

    req = urllib.request.Request(
        orthanc.url + "/tools/find",
        data=json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return list(json.loads(resp.read()))


def test_stow_round_trip_to_orthanc(pacs_client, peers):
    orthanc, _ = peers
    res = pacs_client.generate(
        "chest-tiny", prompt="small effusion", n=2, seed=5, steps=2, format="dicom",
        to_pacs="orthanc",
    )  # fmt: skip
    sent = {pydicom.dcmread(io.BytesIO(i.data)).SOPInstanceUID: i for i in res.images}
    assert {p.sop_instance_uid for p in res.pacs} == set(sent)
    assert all(p.destination == "orthanc" for p in res.pacs)
    items = _until(lambda: _delivered(pacs_client, set(sent)), "STOW-RS delivery")
    assert all(i.attempts == 1 and i.delivered_at for i in items)
    for uid, image in sent.items():
        ids = _orthanc_instance(orthanc, uid)
        assert len(ids) == 1
        back = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{ids[0]}/file")))
        mine = pydicom.dcmread(io.BytesIO(image.data))
        assert back.SOPInstanceUID == uid
        assert back.SeriesInstanceUID == mine.SeriesInstanceUID == res.pacs[0].series_instance_uid
        assert back.StudyInstanceUID == mine.StudyInstanceUID
        assert back.PatientID == mine.PatientID and back.PatientID.startswith("SYN-")
        np.testing.assert_array_equal(back.pixel_array, mine.pixel_array)  # lossless: exact


def test_cstore_round_trip_to_storescp(pacs_client, peers):
    _, scp = peers
    res = pacs_client.generate(
        "cells-tiny", class_name="neutrophil", n=2, seed=3, steps=2, format="png",
        to_pacs="scp",
    )  # fmt: skip
    uids = {p.sop_instance_uid for p in res.pacs}
    assert len(uids) == 2
    _until(lambda: _delivered(pacs_client, uids), "C-STORE delivery")
    landed = {}
    for path in scp.folder.iterdir():
        ds = pydicom.dcmread(path)
        landed[str(ds.SOPInstanceUID)] = ds
    assert uids <= set(landed)
    datasets = [landed[p.sop_instance_uid] for p in res.pacs]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == [1, 2]
    for image, ds in zip(res.images, datasets, strict=True):
        assert ds.ImageType[0] == "DERIVED" and ds.BurnedInAnnotation == "NO"
        png = np.asarray(image.to_pil(), dtype=np.float64) / 255.0
        dcm = ds.pixel_array.astype(np.float64) / 65535.0
        # The PNG is 8-bit and the DICOM 16-bit quantisation of the same floats: they agree to
        # half an 8-bit step plus half a 16-bit step.
        assert np.abs(png - dcm).max() <= 0.5 / 255 + 0.5 / 65535 + 1e-9


def test_outage_delays_delivery_loses_nothing(pacs_client, pacs_generator, peers):
    orthanc, _ = peers
    registry = pacs_generator.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"service": "generator", **labels}) or 0.0

    dest = {"destination": "orthanc"}
    retried = sample("clinisynth_pacs_deliveries_total", **dest, outcome="retried")
    delivered = sample("clinisynth_pacs_deliveries_total", **dest, outcome="delivered")
    orthanc.stop()
    try:
        res = pacs_client.generate(
            "cells-tiny", class_name="monocyte", n=2, seed=9, steps=2, format="dicom",
            to_pacs="orthanc",
        )  # fmt: skip
        uids = {p.sop_instance_uid for p in res.pacs}
        assert all(p.status == "pending" for p in res.pacs)

        def failed_once() -> bool:
            items = [
                i for i in pacs_client.pacs_outbox(status="pending") if i.sop_instance_uid in uids
            ]
            return len(items) == 2 and all(i.attempts >= 1 and i.last_error for i in items)

        _until(failed_once, "a failed attempt while Orthanc is down")
        # The outbox's metrics: retries counted, both instances waiting.
        assert sample("clinisynth_pacs_deliveries_total", **dest, outcome="retried") >= retried + 2
        assert sample("clinisynth_pacs_outbox_pending", **dest) >= 2
    finally:
        orthanc.start()
    _until(lambda: _delivered(pacs_client, uids), "delivery after Orthanc is back")
    for uid in uids:
        assert len(_orthanc_instance(orthanc, uid)) == 1
    assert sample("clinisynth_pacs_deliveries_total", **dest, outcome="delivered") == delivered + 2
    _until(lambda: sample("clinisynth_pacs_outbox_pending", **dest) == 0, "nothing left waiting")


def test_unknown_destination_is_invalid_argument(pacs_client):
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        pacs_client.generate("cells-tiny", class_name="monocyte", steps=1, to_pacs="nowhere")
    assert info.value.fields == ["to_pacs"]
    assert "orthanc" in str(info.value)  # the configured names are listed


def test_outbox_sends_each_instance_once_across_outage_and_restart(peers, tmp_path):
    """The outbox itself, passes driven by hand: the PACS is down for the first pass, the
    service "restarts" (a new Outbox over the same store), and every instance is stored once."""
    from clinisynth_server.imaging import encode
    from clinisynth_server.imaging.provenance import Provenance
    from clinisynth_server.pacs.config import parse_destination
    from clinisynth_server.pacs.outbox import Backoff, Outbox, deliver
    from clinisynth_server.store import open_store

    orthanc, _ = peers
    store = open_store(str(tmp_path / "store"))
    dest = {"o": parse_destination("o", {"dicomweb_url": orthanc.dicomweb_url})}
    stored: Counter[str] = Counter()

    def counting(d: Any, instances: Sequence[tuple[str, bytes]]) -> set[str]:
        ok = deliver(d, instances)  # the real STOW-RS; only counted
        stored.update(ok)
        return ok

    prov = Provenance(
        model_name="m", model_version="1", model_digest="sha256:0", seed=1, sampler="ddim",
        steps=1, guidance_scale=1.0, size=(16, 16), request_id="outage",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    blobs = encode.encode_dicom_series([rng.random((16, 16)) for _ in range(3)], [prov] * 3)
    first = Outbox(store, dest, origin="t", backoff=Backoff(base_s=0.0), deliver_fn=counting)
    orthanc.stop()
    try:
        items = first.enqueue("o", "outage", blobs)
        assert (
            first.enqueue("o", "outage", blobs[:1])[0].sop_instance_uid == items[0].sop_instance_uid
        )
        assert first.deliver_due() == 0
        pending = first.list(status="pending")
        assert len(pending) == 3 and all(i.attempts == 1 and i.last_error for i in pending)
    finally:
        orthanc.start()
    second = Outbox(store, dest, origin="t", backoff=Backoff(base_s=0.0), deliver_fn=counting)
    assert second.deliver_due() == 3
    assert second.deliver_due() == 0 and first.deliver_due() == 0
    assert stored == Counter({i.sop_instance_uid: 1 for i in items})
    assert {i.status for i in second.list()} == {"delivered"}
    for item in items:
        assert len(_orthanc_instance(orthanc, item.sop_instance_uid)) == 1
        assert not store.exists(item.prefix + "instance.dcm")  # kept only until delivered
    # Queuing the same instances again (a client retry) sends nothing new.
    assert {i.status for i in second.enqueue("o", "outage", blobs)} == {"delivered"}
    assert second.deliver_due() == 0
    assert stored == Counter({i.sop_instance_uid: 1 for i in items})


def test_cli_generate_to_pacs_then_outbox_lists_it(
    pacs_generator, pacs_client, tmp_path, capsys, monkeypatch
):
    from clinisynth.cli import main

    monkeypatch.setenv("CLINISYNTH_GENERATOR_ADDRESS", pacs_generator.address)
    argv = ["generate", "-m", "cells-tiny", "--class", "eosinophil", "--steps", "1", "--seed", "2"]
    assert main([*argv, "--to-pacs", "scp", "-q", "--out", str(tmp_path)]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("pacs ")]
    assert len(lines) == 1 and lines[0][1] == "scp:"
    uid = lines[0][2]
    _until(lambda: _delivered(pacs_client, {uid}), "C-STORE delivery")
    assert main(["pacs", "outbox", "--destination", "scp", "--status", "delivered", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert uid in {row["sop_instance_uid"] for row in listed}
    assert {row["destination"] for row in listed} == {"scp"}
