"""Behavioural contract every :class:`ArtifactStore` backend must pass.

Backend test modules subclass :class:`StoreContract` and provide a ``store`` fixture that
yields a fresh, empty store (plus ``supports_presign``), so the local folder and S3 are
held to one suite. Kept in the package (like ``fsspec.tests.abstract``) so a new backend
gets the suite by import. Needs pytest; nothing else imports this module.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

from clinisynth_server.errors import InvalidArgument, NotFound
from clinisynth_server.store.base import ArtifactStore, ObjectInfo


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(seed: int, size: int) -> bytes:
    """Deterministic bytes that differ per seed everywhere (a torn mix is detectable)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


class _FailingReader(io.RawIOBase):
    """A source that dies after ``fail_after`` bytes (a client that drops mid-upload)."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__()
        self._data = data
        self._pos = 0
        self._fail_after = fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._fail_after:
            raise ConnectionResetError("source went away")
        n = min(len(buffer), self._fail_after - self._pos, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


BAD_KEYS = [
    "",
    "/abs",
    "a//b",
    "a/../b",
    "..",
    "./a",
    "a/",
    "a\\b",
    "a/.clinisynth-x",
    "nul\x00byte",
]


class StoreContract:
    """Subclass with a ``store`` fixture; ``big_size`` exceeds the backend's part size."""

    supports_presign: ClassVar[bool] = False
    big_size: ClassVar[int] = 6 * 1024 * 1024 + 123
    #: Threads writing one key at once (readers always run alongside).
    concurrent_writers: ClassVar[int] = 6

    # ---- round trips -------------------------------------------------------------

    def test_bytes_round_trip_digest_and_metadata(self, store: ArtifactStore) -> None:
        data = b"\x00\x01binary\xff" * 100
        info = store.put_bytes("ds/a.bin", data, metadata={"Origin": "test", "n": "3"})
        assert (info.key, info.size, info.sha256) == ("ds/a.bin", len(data), sha(data))
        assert store.get_bytes("ds/a.bin") == data
        st = store.stat("ds/a.bin")
        assert (st.size, st.sha256) == (len(data), sha(data))
        assert st.metadata == {"origin": "test", "n": "3"}
        assert st.content_type == "application/octet-stream"
        assert st.modified is not None
        assert store.exists("ds/a.bin") and not store.exists("ds/a")
        new = b"second version"
        assert store.put_bytes("ds/a.bin", new).sha256 == sha(new)
        assert store.get_bytes("ds/a.bin") == new
        assert store.stat("ds/a.bin").sha256 == sha(new)
        assert store.stat("ds/a.bin").metadata == {}

    def test_empty_object(self, store: ArtifactStore) -> None:
        assert store.put_bytes("empty", b"").sha256 == sha(b"")
        assert store.get_bytes("empty") == b""
        assert store.stat("empty").size == 0

    def test_json_round_trip(self, store: ArtifactStore) -> None:
        record = {"job": "ft-1", "state": "RUNNING", "loss": [0.5, 0.25], "note": "Größe"}
        info = store.put_json("jobs/ft-1.json", record)
        assert store.get_json("jobs/ft-1.json") == record
        assert store.stat("jobs/ft-1.json").content_type == "application/json"
        # sorted keys: equal records give equal digests, whatever the dict order
        again = store.put_json("jobs/ft-1b.json", dict(reversed(list(record.items()))))
        assert again.sha256 == info.sha256

    def test_file_round_trip_large_and_chunked_read(
        self, store: ArtifactStore, tmp_path: Path
    ) -> None:
        data = payload(7, self.big_size)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        info = store.put_file("ckpt/model.safetensors", src, metadata={"step": "100"})
        assert (info.size, info.sha256) == (len(data), sha(data))
        st = store.stat("ckpt/model.safetensors")
        assert (st.size, st.sha256, st.metadata) == (len(data), sha(data), {"step": "100"})
        dest = tmp_path / "out" / "deep" / "model.safetensors"
        got = store.get_file("ckpt/model.safetensors", dest)
        assert dest.read_bytes() == data and got.sha256 == sha(data)
        assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]  # no temp
        chunks = list(store.iter_chunks("ckpt/model.safetensors", chunk_size=1024 * 1024))
        assert all(len(c) <= 1024 * 1024 for c in chunks) and len(chunks) >= 6
        assert b"".join(chunks) == data
        with store.open_stream("ckpt/model.safetensors") as stream:
            assert stream.read(10) == data[:10]
            assert stream.read() == data[10:]

    def test_put_stream_and_failed_stream_leaves_old_object(self, store: ArtifactStore) -> None:
        old = b"old version"
        store.put_bytes("up/x", old)
        data = payload(3, 300_000)
        assert store.put_stream("up/y", io.BytesIO(data)).sha256 == sha(data)
        assert store.get_bytes("up/y") == data
        with pytest.raises(ConnectionResetError):
            store.put_stream("up/x", io.BufferedReader(_FailingReader(data, 200_000)))
        with pytest.raises(ConnectionResetError):
            store.put_stream("up/z", io.BufferedReader(_FailingReader(data, 200_000)))
        assert store.get_bytes("up/x") == old
        assert store.stat("up/x").sha256 == sha(old)
        assert [i.key for i in store.list("up/")] == ["up/x", "up/y"]

    # ---- listing -----------------------------------------------------------------

    KEYS: ClassVar[list[str]] = [
        "a-c",
        "a/b",
        "a/b/c",
        "a/bc",
        "a/b0",
        "a/x/y/z",
        "b",
        "ü/1",
        "runs/7/m",
        "runs/70/m",
    ]

    def _fill(self, store: ArtifactStore) -> list[str]:
        keys = [k for k in self.KEYS if k != "a/b"]  # "a/b" is a prefix of "a/b/c"
        for k in keys:
            store.put_bytes(k, k.encode())
        return sorted(keys, key=lambda k: k.encode())

    def test_list_sorted_by_key_and_by_string_prefix(self, store: ArtifactStore) -> None:
        keys = self._fill(store)
        listed = list(store.list())
        assert [i.key for i in listed] == keys
        assert all(i.size == len(i.key.encode()) and not i.is_prefix for i in listed)
        assert all(i.sha256 in (None, sha(i.key.encode())) for i in listed)
        assert [i.key for i in store.list("a/b")] == ["a/b/c", "a/b0", "a/bc"]
        assert [i.key for i in store.list("a/b/")] == ["a/b/c"]
        assert [i.key for i in store.list("runs/7")] == ["runs/7/m", "runs/70/m"]
        assert [i.key for i in store.list("nothing/")] == []

    def test_list_non_recursive_shows_prefixes(self, store: ArtifactStore) -> None:
        self._fill(store)
        top = list(store.list("", recursive=False))
        assert [(i.key, i.is_prefix) for i in top] == [
            ("a-c", False),
            ("a/", True),
            ("b", False),
            ("runs/", True),
            ("ü/", True),
        ]
        assert [i.key for i in store.list("a/", recursive=False)] == [
            "a/b/",
            "a/b0",
            "a/bc",
            "a/x/",
        ]

    def test_list_paging(self, store: ArtifactStore) -> None:
        keys = self._fill(store)
        pages: list[list[str]] = []
        last: str | None = None
        while True:
            page = [i.key for i in store.list(start_after=last, limit=3)]
            if not page:
                break
            pages.append(page)
            last = page[-1]
        assert [len(p) for p in pages] == [3, 3, 3]
        assert [k for p in pages for k in p] == keys
        assert [i.key for i in store.list("a/", start_after="a/b/c", limit=2)] == ["a/b0", "a/bc"]
        assert list(store.list(limit=0)) == []
        with pytest.raises(InvalidArgument) as err:
            list(store.list(limit=-1))
        assert err.value.violations[0].field == "limit"

    # ---- idempotent writes ---------------------------------------------------------

    def test_put_if_absent(self, store: ArtifactStore) -> None:
        assert store.put_if_absent("fb/1.json", b'{"r": 1}', content_type="application/json")
        assert not store.put_if_absent("fb/1.json", b'{"r": 2}')
        assert store.get_bytes("fb/1.json") == b'{"r": 1}'
        st = store.stat("fb/1.json")
        assert (st.sha256, st.content_type) == (sha(b'{"r": 1}'), "application/json")

    # ---- directories -----------------------------------------------------------------

    def test_upload_and_download_dir(self, store: ArtifactStore, tmp_path: Path) -> None:
        src = tmp_path / "repo"
        files = {
            "denoiser/config.pbtxt": b"name: 'd'",
            "denoiser/1/model.py": b"print(1)",
            "vae/1/weights.bin": payload(1, 70_000),
            "README": b"hi",
        }
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        store.put_bytes("models2/other", b"must not be downloaded")
        infos = store.upload_dir(src, "models/")
        assert sorted(i.key for i in infos) == sorted("models/" + k for k in files)
        assert {i.key: i.sha256 for i in infos} == {"models/" + k: sha(v) for k, v in files.items()}
        out = tmp_path / "out"
        written = store.download_dir("models", out)
        assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(files)
        for rel, data in files.items():
            assert (out / rel).read_bytes() == data
        assert sorted(
            p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
        ) == sorted(files)
        with pytest.raises(InvalidArgument):
            store.upload_dir(tmp_path / "missing", "x")

    def test_delete_and_delete_prefix(self, store: ArtifactStore) -> None:
        self._fill(store)
        store.delete("b")
        store.delete("b")  # idempotent
        assert not store.exists("b")
        assert store.delete_prefix("runs/7") == 1
        assert [i.key for i in store.list("runs/")] == ["runs/70/m"]
        assert store.delete_prefix("a/") == 4
        assert [i.key for i in store.list()] == ["a-c", "runs/70/m", "ü/1"]
        with pytest.raises(InvalidArgument):
            store.delete_prefix("")

    # ---- errors --------------------------------------------------------------------

    @pytest.mark.parametrize("bad", BAD_KEYS)
    def test_bad_keys_are_invalid_argument_naming_key(
        self, store: ArtifactStore, bad: str, tmp_path: Path
    ) -> None:
        calls = [
            lambda: store.put_bytes(bad, b"x"),
            lambda: store.put_if_absent(bad, b"x"),
            lambda: store.get_bytes(bad),
            lambda: store.stat(bad),
            lambda: store.exists(bad),
            lambda: store.delete(bad),
            lambda: store.open_stream(bad),
            lambda: store.get_file(bad, tmp_path / "f"),
            lambda: store.presign_get(bad, 60),
        ]
        for call in calls:
            with pytest.raises(InvalidArgument) as err:
                call()
            assert err.value.violations[0].field == "key"
        assert list(store.list()) == []

    def test_bad_prefix_and_metadata(self, store: ArtifactStore) -> None:
        with pytest.raises(InvalidArgument) as err:
            list(store.list("../x"))
        assert err.value.violations[0].field == "prefix"
        for meta in ({"bad key": "v"}, {"k": "nön-ascii"}, {"sha256": "x"}):
            with pytest.raises(InvalidArgument) as err:
                store.put_bytes("m", b"x", metadata=meta)
            assert err.value.violations[0].field.startswith("metadata[")
        assert not store.exists("m")

    def test_missing_key_is_not_found(self, store: ArtifactStore, tmp_path: Path) -> None:
        store.put_bytes("dir/present", b"x")
        for call in (
            lambda: store.get_bytes("dir/absent"),
            lambda: store.stat("dir/absent"),
            lambda: store.open_stream("dir/absent"),
            lambda: store.get_file("dir/absent", tmp_path / "f"),
            lambda: store.stat("dir"),  # a prefix is not an object
            lambda: store.get_bytes("dir/present/deeper"),
        ):
            with pytest.raises(NotFound):
                call()
        assert not (tmp_path / "f").exists()

    # ---- concurrency -----------------------------------------------------------------

    def test_concurrent_writers_never_tear(self, store: ArtifactStore) -> None:
        versions = {sha(p): p for p in (payload(i, 256 * 1024 + i) for i in range(6))}
        stop = threading.Event()
        seen: list[str] = []
        failures: list[BaseException] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    data = store.get_bytes("shared/blob")
                except NotFound:
                    continue
                except BaseException as exc:  # reported by the main thread
                    failures.append(exc)
                    return
                seen.append(sha(data))

        def writer(data: bytes) -> None:
            for _ in range(4):
                store.put_bytes("shared/blob", data)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            with ThreadPoolExecutor(self.concurrent_writers) as pool:
                list(pool.map(writer, versions.values()))
        finally:
            stop.set()
            for t in readers:
                t.join()
        assert not failures, failures
        assert seen and set(seen) <= set(versions)
        final = store.get_bytes("shared/blob")
        assert sha(final) in versions
        assert store.stat("shared/blob").sha256 == sha(final)
        assert [i.key for i in store.list()] == ["shared/blob"]

    # ---- misc ------------------------------------------------------------------------

    def test_presign_get(self, store: ArtifactStore) -> None:
        data = payload(5, 10_000)
        store.put_bytes("out/img.png", data, content_type="image/png")
        url = store.presign_get("out/img.png", expires_s=120)
        if not self.supports_presign:
            assert url is None
            return
        assert url is not None and url.startswith("http")
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == data
        with pytest.raises(InvalidArgument) as err:
            store.presign_get("out/img.png", expires_s=0)
        assert err.value.violations[0].field == "expires_s"

    def test_uri_ping_and_info_type(self, store: ArtifactStore) -> None:
        store.ping()
        info = store.put_bytes("k/v", b"1")
        assert isinstance(info, ObjectInfo)
        assert store.uri("k/v").endswith("/k/v")
        assert store.uri("k/v").split("://")[0] in ("file", "s3")
        assert os.path.basename(store.uri("k/v")) == "v"
