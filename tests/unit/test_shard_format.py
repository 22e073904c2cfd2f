"""Sharded data sets without servers: the SDK's writer and the service's reader agree, ranks split
every sample once, memory stays bounded by the cache and one batch, corrupt images fail or are
skipped, hostile tar members are refused, and the archive layout (DICOM tree + CSV) is read."""

from __future__ import annotations

import io
import json
import pathlib
import tarfile

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from clinisynth import _shards
from clinisynth._finetune import shard_plan
from clinisynth_lab.phantoms.datasets import encode_png
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.finetune import datasets, shards
from clinisynth_server.finetune.shards_loader import (
    ShardStream,
    StreamConfig,
    cache_factory,
    epoch_order,
    rank_range,
    worker_range,
)
from clinisynth_server.store import LocalStore


def write_dicom(path: pathlib.Path, value: int, *, patient: str = "DOE^JANE") -> None:
    """A tiny 8-bit MONOCHROME2 DICOM with an identifying patient name."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName, ds.PatientID, ds.Modality = patient, "MRN123", "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 12
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    pixels = np.full((12, 12), value, np.uint8)
    pixels[:6] = 255 - value  # not constant, so min-max windowing keeps a picture
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def image_folder(root: pathlib.Path, per_class: int = 6) -> pathlib.Path:
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((10, 14), 20 * i + 100 * c, np.uint8)
            (root / cls / f"{i:02d}.png").write_bytes(encode_png(img))
    return root


def store_plan(store: LocalStore, prefix: str, plan: object) -> None:
    """What ``upload_dataset(shards=True)`` stores, written straight into a local store."""
    entries = []
    for shard in plan.shards:  # type: ignore[attr-defined]
        data = shard.bytes()
        name, digest = _shards.shard_name(shard.number, data)
        store.put_bytes(f"{prefix}/{name}", data)
        entries.append(
            {
                "name": name,
                "sha256": digest,
                "size_bytes": len(data),
                "paths": [m.name for m in shard.members],
                "shapes": [_shards.shape_of(m.path) for m in shard.members],
            }
        )
    for rel, body in plan.plain:  # type: ignore[attr-defined]
        store.put_bytes(f"{prefix}/{rel}", body)
    layout = plan.layout  # type: ignore[attr-defined]
    store.put_bytes(f"{prefix}/{_shards.INDEX_NAME}", _shards.index_json(layout, entries))


@pytest.fixture()
def store(tmp_path: pathlib.Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_sdk_writer_and_service_reader_share_the_format() -> None:
    for name in ("INDEX_NAME", "SHARDS_DIR", "FORMAT", "VERSION"):
        assert getattr(_shards, name) == getattr(shards, name), name


def test_round_trip_reads_like_the_folder(tmp_path: pathlib.Path, store: LocalStore) -> None:
    root = image_folder(tmp_path / "local")
    write_dicom(root / "b" / "scan.dcm", 40)
    plan = shard_plan(root, None, shard_bytes=600)  # several shards of a few images
    assert not plan.problems and len(plan.shards) >= 3
    store_plan(store, "datasets/rt", plan)
    source = datasets.StoreSource(store, "datasets/rt")
    reader = datasets.sharded(source)
    assert reader is not None
    local = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert source.names() == local
    for name in local:  # byte for byte what was on disk
        assert source.read(name) == (root / name).read_bytes()
    # Job creation reads the index only: shapes come from it, nothing is decoded ...
    report = datasets.validate(source, "datasets/rt", "image_folder")
    assert report.ok and report.images == 13 and report.per_class == {"a": 6, "b": 7}
    assert report.shapes == {(10, 14, 1): 12, (12, 12, 1): 1}
    # ... and ValidateDataset decodes every member the same way as a plain folder.
    full = datasets.validate(source, "datasets/rt", "image_folder", decode_shards=True)
    plain = datasets.validate(datasets.FolderSource(root), "x", "image_folder")
    assert full.ok and full.shapes == plain.shapes
    assert reader.cache.stats.max_held <= reader.cache.max_shards
    # Reading the members loaded the set as load_images reads the folder, value for value.
    paths = [e.path for e in report.entries]
    assert np.array_equal(
        datasets.load_images(source, paths, size=8, channels=1),
        datasets.load_images(datasets.FolderSource(root), paths, size=8, channels=1),
    )


def test_shapes_missing_from_the_index_come_from_headers(
    tmp_path: pathlib.Path, store: LocalStore
) -> None:
    root = image_folder(tmp_path / "local")
    write_dicom(root / "b" / "scan.dcm", 40)
    store_plan(store, "datasets/nosh", shard_plan(root, None, shard_bytes=600))
    index = json.loads(store.get_bytes("datasets/nosh/index.json"))
    for shard in index["shards"]:
        shard.pop("shapes")  # as an uploader without pydicom / an older writer leaves it
    store.put_bytes("datasets/nosh/index.json", json.dumps(index).encode())
    report = datasets.validate(datasets.StoreSource(store, "datasets/nosh"), "x", "image_folder")
    assert report.ok and report.shapes == {(10, 14, 1): 12, (12, 12, 1): 1}


def _index(sizes: list[int]) -> shards.Index:
    infos = tuple(
        shards.ShardInfo(f"shards/{s:06d}.tar", "", 0, tuple(f"c/{s}-{i}.png" for i in range(per)))
        for s, per in enumerate(sizes)
    )
    where = {p: n for n, info in enumerate(infos) for p in info.paths}
    return shards.Index("image_folder", infos, where)


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 3), (3, 2)])
def test_distributed_split_covers_every_sample_once(world: int, workers: int) -> None:
    index = _index([5, 6, 7, 5, 6, 7, 6])  # 42 samples in uneven shards
    for epoch in range(2):
        order = epoch_order(index, seed=3, epoch=epoch, exclude=frozenset())
        assert sorted(order) == sorted(index.where)  # a permutation of the set
        seen = [
            p
            for rank in range(world)
            for w in range(workers)
            for p in worker_range(rank_range(order, rank, world), w, workers)
        ]
        assert sorted(seen) == sorted(index.where)  # 42 divides by 2 and 3: no padding
    # A set that does not divide: ranks get equal counts, padded from the epoch's start.
    odd = epoch_order(_index([4, 3]), 0, 0, frozenset())
    parts = [rank_range(odd, r, 2) for r in range(2)]
    assert [len(x) for x in parts] == [4, 4] and set(parts[0]) | set(parts[1]) == set(odd)
    # Deterministic per (seed, epoch); another epoch is another order.
    assert epoch_order(index, 3, 1, frozenset()) == epoch_order(index, 3, 1, frozenset())
    assert epoch_order(index, 3, 0, frozenset()) != epoch_order(index, 3, 1, frozenset())
    # Ranks read mostly different shards: at most 2 shards are shared per boundary.
    order = epoch_order(index, 3, 0, frozenset())
    r0 = {index.where[p] for p in rank_range(order, 0, 2)}
    r1 = {index.where[p] for p in rank_range(order, 1, 2)}
    assert len(r0 & r1) <= 1


def _stream(store: LocalStore, prefix: str, tmp: pathlib.Path, **cfg: object) -> ShardStream:
    reader = datasets.sharded(datasets.StoreSource(store, prefix))
    assert reader is not None
    config = StreamConfig(**{"size": 8, "channels": 1, "batch_size": 4, "seed": 0, **cfg})  # type: ignore[arg-type]
    labels = {p: int(p.startswith("b/")) for p in reader.index.where}
    make = cache_factory(reader.fetch, tmp / "cache", config.cache_shards)
    return ShardStream(reader.index, config, make, labels)


def test_two_ranks_stream_every_sample_once_with_bounded_memory(
    tmp_path: pathlib.Path, store: LocalStore
) -> None:
    root = image_folder(tmp_path / "local", per_class=8)  # 16 images
    plan = shard_plan(root, None, shard_bytes=150)  # 2 images a shard
    assert len(plan.shards) == 8
    store_plan(store, "datasets/mem", plan)
    seen: list[str] = []
    for rank in range(2):
        stream = _stream(store, "datasets/mem", tmp_path / f"r{rank}", rank=rank, world=2)
        it = iter(stream)
        for _ in range(2):  # one epoch of this rank: 8 samples in batches of 4
            batch = next(it)
            assert batch["x"].shape == (4, 1, 8, 8)
            assert [int(v) for v in batch["y"]] == [int(p.startswith("b/")) for p in batch["paths"]]
            seen += batch["paths"]
        for _ in range(6):  # three more epochs: shards cycle through the 2-shard cache
            next(it)
        assert stream.cache is not None
        # Memory: never more than one batch decoded, never more than 2 shards on disk.
        assert stream.stats.max_held <= 4
        assert stream.cache.stats.max_held <= 2
        assert stream.cache.stats.downloads > len(plan.shards)  # it did evict and re-fetch
        assert len(list((tmp_path / f"r{rank}" / "cache" / "worker-0").iterdir())) <= 2
    assert sorted(seen) == sorted(p for s in plan.shards for p in (m.name for m in s.members))


def test_resume_continues_the_same_stream(tmp_path: pathlib.Path, store: LocalStore) -> None:
    store_plan(
        store, "datasets/res", shard_plan(image_folder(tmp_path / "l"), None, shard_bytes=400)
    )
    it = iter(_stream(store, "datasets/res", tmp_path / "a", augment="hflip"))
    batches = [next(it) for _ in range(5)]
    resumed = iter(_stream(store, "datasets/res", tmp_path / "b", augment="hflip", start_batch=3))
    for want in batches[3:]:
        got = next(resumed)
        assert got["paths"] == want["paths"] and np.array_equal(got["x"], want["x"])


def test_dataloader_workers_split_and_repeat(tmp_path: pathlib.Path, store: LocalStore) -> None:
    from clinisynth_server.finetune.shards_loader import Batches

    store_plan(
        store, "datasets/dl", shard_plan(image_folder(tmp_path / "l"), None, shard_bytes=400)
    )

    def run(folder: str) -> list[list[str]]:
        batches = Batches(
            lambda start: _stream(store, "datasets/dl", tmp_path / folder, num_workers=2),
            num_workers=2,
        )
        out = []
        for _ in range(4):
            batches.next()
            out.append(batches.last_paths)
        return out

    first, again = run("x"), run("y")
    assert first == again  # worker processes do not change the order
    # Batches alternate between the workers, which read disjoint halves of the epoch.
    assert not set(first[0]) & set(first[1]) and len(set(first[0]) | set(first[1])) == 8


def test_corrupt_image_fails_or_is_skipped(tmp_path: pathlib.Path, store: LocalStore) -> None:
    root = image_folder(tmp_path / "local")
    (root / "a" / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    plan = shard_plan(root, None, shard_bytes=10_000)
    store_plan(store, "datasets/bad", plan)
    with pytest.raises(InvalidArgument, match=r"a/03\.png: unreadable image"):
        it = iter(_stream(store, "datasets/bad", tmp_path / "f", batch_size=12))
        next(it)
    stream = _stream(store, "datasets/bad", tmp_path / "s", batch_size=11, on_bad_image="skip")
    batch = next(iter(stream))
    assert batch["skipped"] == ["a/03.png"] and "a/03.png" not in batch["paths"]
    assert len(batch["paths"]) == 11 and stream.stats.skipped == ["a/03.png"]


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member,why",
    [
        (_member("../escape.png"), "clean relative path"),
        (_member("/etc/evil.png"), "clean relative path"),
        (_member("a/.hidden.png"), "clean relative path"),
        (_member("a\\b.png"), "clean relative path"),
        (_member("a/model.pkl"), "only .png"),
        (_member("a/x.pyd"), "only .png"),
        (_member("a/link.png", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
        (_member("a/hard.png", tarfile.LNKTYPE, "a/0.png"), "not a regular file"),
        (_member("a/dev.png", tarfile.CHRTYPE), "not a regular file"),
    ],
)
def test_hostile_member_is_refused(member: tarfile.TarInfo, why: str) -> None:
    good = (_member("a/0.png"), encode_png(np.zeros((4, 4), np.uint8)))
    for consume in (
        lambda f: list(shards.members(f)),
        lambda f: shards.sanitize(f, lambda name, data: data),
    ):
        with pytest.raises(InvalidArgument, match=why):
            consume(_tar(good, (member, b"x")))


def test_oversized_member_and_duplicates_are_refused(tmp_path: pathlib.Path) -> None:
    big = _tar((_member("a/big.png"), b"x" * 2048))
    with pytest.raises(InvalidArgument, match="at most 1024"):
        list(shards.members(big, max_bytes=1024))
    twice = _tar((_member("a/0.png"), b"x"), (_member("a/0.png"), b"y"))
    with pytest.raises(InvalidArgument, match="appears twice"):
        shards.sanitize(twice, lambda name, data: data)
    with pytest.raises(InvalidArgument, match="not a clean relative path"):
        shards.parse_index(
            json.dumps(
                {
                    "format": shards.FORMAT,
                    "version": 1,
                    "shards": [{"name": "shards/0.tar", "paths": ["../../etc/x.png"]}],
                }
            ).encode()
        )


def test_archive_layout_dicom_tree_and_reports(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "archive"
    write_dicom(root / "p10" / "p1001" / "s501" / "img1.dcm", 30)
    write_dicom(root / "p10" / "p1001" / "s501" / "img2.dcm", 60)
    write_dicom(root / "p10" / "p1002" / "s502" / "img3.dcm", 90)
    write_dicom(root / "p10" / "p1003" / "s503" / "img4.dcm", 90)  # its report has no impression
    write_dicom(root / "p10" / "p1004" / "s504" / "img5.dcm", 90)  # no report at all
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text(
        "study_id,finding,report\n"
        's501,effusion,"FINDINGS: Blunted left angle.\nIMPRESSION:  Small left\n effusion. "\n'
        's502,normal,"EXAMINATION: CHEST\nIMPRESSION: No acute disease.\nRECOMMENDATION(S): none"\n'
        's503,normal,"FINDINGS: Clear lungs."\n'
    )
    plan = shard_plan(
        root, "dicom_archive", shard_bytes=10**6, reports_csv=csv_path, class_column="finding"
    )
    assert not plan.problems and plan.layout == "image_text_manifest"
    manifest = [json.loads(line) for line in plan.plain[0][1].decode().splitlines()]
    assert manifest == [
        {"class_name": "effusion", "image": "effusion/p10/p1001/s501/img1.dcm",
         "prompt": "Small left effusion."},
        {"class_name": "effusion", "image": "effusion/p10/p1001/s501/img2.dcm",
         "prompt": "Small left effusion."},
        {"class_name": "normal", "image": "normal/p10/p1002/s502/img3.dcm",
         "prompt": "No acute disease."},
    ]  # fmt: skip
    assert plan.left_out == [
        "p10/p1003/s503/img4.dcm: report has no IMPRESSION section",
        "p10/p1004/s504/img5.dcm: no report row",
    ]
    assert _shards.report_section("FINDINGS: a\nb.\nIMPRESSION: c", "findings") == "a b."
    bad = shard_plan(root, "dicom_archive", shard_bytes=10**6, reports_csv=csv_path,
                     report_key="dicom_id")  # fmt: skip
    assert any("no column 'dicom_id'" in p for p in bad.problems)


def test_sanitize_deidentifies_dicom_members(tmp_path: pathlib.Path) -> None:
    write_dicom(tmp_path / "x.dcm", 50)
    raw = (tmp_path / "x.dcm").read_bytes()
    shard = _tar(
        (_member("a/x.dcm"), raw), (_member("a/y.png"), encode_png(np.zeros((4, 4), np.uint8)))
    )
    calls: list[str] = []

    def deid(name: str, data: bytes) -> bytes:
        calls.append(name)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PatientName = "ANON"
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    clean = shards.sanitize(shard, deid)
    names = {info.name: stream.read() for info, stream in shards.members(clean)}
    assert calls == ["a/x.dcm"] and set(names) == {"a/x.dcm", "a/y.png"}
    assert pydicom.dcmread(io.BytesIO(names["a/x.dcm"])).PatientName == "ANON"
