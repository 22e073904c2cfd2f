"""S3 artifact store against a real S3-protocol server on loopback (moto's ThreadedMotoServer).

The shared contract runs here too; then what only a network store has: multipart, digest
metadata, presigned URLs, a dead or hanging endpoint, a connection cut mid-upload.
Run: ``pytest tests/stack/test_store_s3.py``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared contract lives in the package: let pytest explain its failed asserts too.
pytest.register_assert_rewrite("clinisynth_server.store.testing")
from minio import Minio  # noqa: E402
from s3_peers import CREDS, Moto, Proxy  # noqa: E402

from clinisynth_server.errors import FailedPrecondition, Internal, NotFound, Unavailable  # noqa: E402
from clinisynth_server.store import open_store  # noqa: E402
from clinisynth_server.store.s3 import S3Store  # noqa: E402
from clinisynth_server.store.testing import StoreContract, payload, sha  # noqa: E402

pytestmark = [pytest.mark.stack, pytest.mark.timeout(120)]

PART = 5 * 1024 * 1024  # the S3 minimum part size; moto enforces it too


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Moto()
    server.start()
    yield server
    server.stop()


def _open(endpoint: str, bucket: str | None = None, **options: object) -> S3Store:
    bucket = bucket or f"t-{uuid.uuid4().hex[:16]}"
    store = open_store(
        f"s3://{bucket}/base",
        env={},
        endpoint=endpoint,
        part_size=PART,
        create_bucket=True,
        **CREDS,
        **options,
    )
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def store(moto: Moto) -> Iterator[S3Store]:
    with _open(moto.endpoint) as s:
        yield s


class TestS3Contract(StoreContract):
    """Every behaviour both backends share; big_size > PART forces a multipart upload."""

    supports_presign = True
    # moto 5.2.5 itself breaks under concurrent PUTs of one key: a later PUT disposes the
    # earlier FakeKey's buffer while that request still computes its ETag ("I/O operation
    # on closed file", HTTP 500; moto/s3/models.py FakeKey.etag). Real S3 / MinIO publish
    # each PUT atomically, so here one writer overwrites while readers race it.
    concurrent_writers = 1


def _raw(endpoint: str) -> Minio:
    return Minio(endpoint.removeprefix("http://"), secure=False, region="us-east-1", **CREDS)


def test_digest_is_object_metadata_and_multipart_is_used(
    store: S3Store, tmp_path: Path, moto: Moto
) -> None:
    data = payload(9, 2 * PART + 17)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    store.put_file("ckpt/f.bin", src)
    head = _raw(moto.endpoint).stat_object(store.bucket, "base/ckpt/f.bin")
    assert head.metadata["x-amz-meta-sha256"] == sha(data)  # type: ignore[index]
    assert "-3" in (head.etag or "")  # a multipart ETag names its part count


def test_objects_from_other_tools_and_corruption(
    store: S3Store, moto: Moto, tmp_path: Path
) -> None:
    import io

    raw = _raw(moto.endpoint)
    raw.put_object(store.bucket, "base/foreign", io.BytesIO(b"no digest"), 9)
    assert store.stat("foreign").sha256 == sha(b"no digest")  # hashed by streaming
    raw.put_object(
        store.bucket, "base/bad", io.BytesIO(b"tampered"), 8, metadata={"sha256": sha(b"original")}
    )
    with pytest.raises(Internal, match="sha256"):
        store.get_bytes("bad")
    with pytest.raises(Internal):
        store.get_file("bad", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # a corrupt download never lands


def test_put_if_absent_fallback_without_conditional_writes(moto: Moto) -> None:
    with _open(moto.endpoint, conditional_writes=False) as s:
        assert s.put_if_absent("r", b"1")
        assert not s.put_if_absent("r", b"2")
        assert s.get_bytes("r") == b"1"


def test_missing_bucket(moto: Moto) -> None:
    s = open_store(f"s3://absent-{uuid.uuid4().hex[:8]}", env={}, endpoint=moto.endpoint, **CREDS)
    with pytest.raises(FailedPrecondition, match="does not exist"):
        s.ping()
    with pytest.raises(FailedPrecondition):
        s.put_bytes("k", b"1")


@pytest.mark.timeout(30)
def test_server_down_is_unavailable_then_recovers(tmp_path: Path) -> None:
    server = Moto()
    server.start()
    try:
        s = _open(server.endpoint)
        s.put_bytes("kept", b"before outage")
        server.stop()
        for call in (
            lambda: s.ping(),
            lambda: s.get_bytes("kept"),
            lambda: s.stat("kept"),
            lambda: s.put_bytes("new", b"x"),
            lambda: list(s.list()),
            lambda: s.put_file("new", _write(tmp_path / "f", payload(1, 100))),
        ):
            with pytest.raises(Unavailable) as err:
                call()
            assert server.endpoint in str(err.value)
        server.start()  # same port
        s.ping()
        assert s.get_bytes("kept") == b"before outage"
        with pytest.raises(NotFound):
            s.stat("new")
        assert [i.key for i in s.list()] == ["kept"]
    finally:
        with contextlib.suppress(Exception):
            server.stop()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.timeout(60)
def test_connection_cut_mid_multipart_upload_leaves_old_object(moto: Moto, tmp_path: Path) -> None:
    proxy = Proxy(moto.port)
    s = _open(proxy.endpoint, parallel_uploads=1)
    old = payload(1, 1000)
    s.put_bytes("ckpt/latest", old)
    proxy.cut_after = PART + PART // 2  # dies inside the second part
    src = _write(tmp_path / "new.bin", payload(2, 3 * PART))
    with pytest.raises(Unavailable, match=proxy.endpoint):
        s.put_file("ckpt/latest", src)
    with pytest.raises(Unavailable):
        s.put_bytes("ckpt/other", b"while down")
    # the server comes back on the same address
    back = Proxy(moto.port, port=proxy.port)
    try:
        assert s.get_bytes("ckpt/latest") == old
        assert s.stat("ckpt/latest").sha256 == sha(old)
        assert [i.key for i in s.list()] == ["ckpt/latest"]
        assert s.put_file("ckpt/latest", src).sha256 == sha(src.read_bytes())  # retry works
    finally:
        back.close()


@pytest.mark.timeout(30)
def test_hanging_server_times_out_as_unavailable(moto: Moto) -> None:
    proxy = Proxy(moto.port)
    proxy.hang = True
    try:
        s = _open(moto.endpoint)  # bucket made directly, then talk through the wedged proxy
        wedged = open_store(
            f"s3://{s.bucket}",
            env={},
            endpoint=proxy.endpoint,
            retries=0,
            read_timeout_s=0.5,
            **CREDS,
        )
        with pytest.raises(Unavailable, match="timed out"):
            wedged.get_bytes("anything")
        with pytest.raises(Unavailable):
            wedged.put_bytes("k", b"v")
        assert not s.exists("k")
    finally:
        proxy.close()
