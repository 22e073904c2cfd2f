"""Local-folder artifact store: the shared contract plus what only a folder has.

Run: ``pytest tests/unit/test_store_local.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# The shared contract lives in the package: let pytest explain its failed asserts too.
pytest.register_assert_rewrite("clinisynth_server.store.testing")
from clinisynth_server.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from clinisynth_server.store import LocalStore, open_store  # noqa: E402
from clinisynth_server.store.base import RESERVED_PREFIX, ArtifactStore  # noqa: E402
from clinisynth_server.store.testing import StoreContract, payload, sha  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    with LocalStore(tmp_path / "store") as s:
        yield s


class TestLocalContract(StoreContract):
    """Every behaviour both backends share."""


def test_bookkeeping_is_hidden(store: LocalStore) -> None:
    store.put_bytes("a/b", b"1")
    # a crashed writer's temp file and the sidecar tree exist on disk...
    (store.root / "a" / f"{RESERVED_PREFIX}-tmp-crashed").write_bytes(b"half")
    assert (store.root / RESERVED_PREFIX / "meta" / "a" / "b.json").is_file()
    # ...but never in listings or as prefixes
    assert [i.key for i in store.list()] == ["a/b"]
    assert [i.key for i in store.list("", recursive=False)] == ["a/"]
    assert (store.root / "a" / "b").read_bytes() == b"1"  # the object is the plain file


def test_sidecar_digest_is_cached_and_revalidated(store: LocalStore) -> None:
    store.put_bytes("ckpt", b"v1")
    meta = store.root / RESERVED_PREFIX / "meta" / "ckpt.json"
    side = json.loads(meta.read_text())
    assert side["sha256"] == sha(b"v1")
    # stat trusts the sidecar while the file is unchanged: it does not rehash
    side["sha256"] = "0" * 64
    meta.write_text(json.dumps(side))
    assert store.stat("ckpt").sha256 == "0" * 64
    # a file replaced behind the store's back (new inode/size/mtime) is rehashed and recached
    (store.root / "ckpt").write_bytes(b"edited by hand")
    assert store.stat("ckpt").sha256 == sha(b"edited by hand")
    assert json.loads(meta.read_text())["sha256"] == sha(b"edited by hand")


def test_files_dropped_in_by_hand_get_digests(store: LocalStore) -> None:
    (store.root / "models" / "1").mkdir(parents=True)
    (store.root / "models" / "1" / "model.py").write_bytes(b"print()")
    [listed] = store.list("models/")
    assert (listed.key, listed.sha256) == ("models/1/model.py", None)  # listing never hashes
    st = store.stat("models/1/model.py")
    assert st.sha256 == sha(b"print()") and st.content_type == "text/x-python"
    assert next(store.list("models/")).sha256 == sha(b"print()")  # cached now


def test_open_stream_keeps_its_version_while_overwritten(store: LocalStore) -> None:
    old, new = payload(1, 3 * 1024 * 1024), payload(2, 3 * 1024 * 1024)
    store.put_bytes("big", old)
    with store.open_stream("big") as stream:
        first = stream.read(1000)
        store.put_bytes("big", new)
        assert first + stream.read() == old
    assert store.get_bytes("big") == new


def test_concurrent_put_if_absent_has_one_winner(store: LocalStore) -> None:
    barrier = threading.Barrier(8)

    def attempt(i: int) -> bool:
        barrier.wait()
        return store.put_if_absent("jobs/one.json", f'{{"writer": {i}}}'.encode())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert store.get_json("jobs/one.json") == {"writer": winner}
    assert store.stat("jobs/one.json").sha256 == sha(f'{{"writer": {winner}}}'.encode())


def _race_in_process(root: str, i: int) -> bool:
    return LocalStore(root).put_if_absent("jobs/proc.json", str(i).encode())


def test_put_if_absent_across_processes(store: LocalStore) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_race_in_process, [(str(store.root), i) for i in range(8)])
    assert results.count(True) == 1
    assert store.get_bytes("jobs/proc.json") == str(results.index(True)).encode()


def test_concurrent_writers_and_deleters_leave_no_debris(store: LocalStore) -> None:
    def churn(i: int) -> None:
        for n in range(20):
            store.put_bytes(f"tmp/{i % 2}/obj", payload(i * 100 + n, 1000))
            store.delete(f"tmp/{i % 2}/obj")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(churn, range(4)))
    assert list(store.list()) == []
    leftovers = [p for p in store.root.rglob("*") if RESERVED_PREFIX not in p.as_posix()]
    assert leftovers == []  # empty dirs pruned, no temp files


def test_key_and_prefix_clash_is_failed_precondition(store: LocalStore) -> None:
    store.put_bytes("a/b", b"1")
    with pytest.raises(FailedPrecondition):
        store.put_bytes("a", b"2")  # "a" is a directory here
    with pytest.raises(FailedPrecondition):
        store.put_bytes("a/b/c", b"3")  # "a/b" is a file here
    assert store.get_bytes("a/b") == b"1"


def test_presign_is_none_and_uri_is_file_url(store: LocalStore) -> None:
    store.put_bytes("x/y", b"1")
    assert store.presign_get("x/y", 60) is None
    assert store.uri("x/y") == (store.root / "x" / "y").as_uri()


def test_ping_fails_when_root_disappears(tmp_path: Path) -> None:
    from clinisynth_server.errors import Unavailable

    s = LocalStore(tmp_path / "gone")
    s.ping()
    os.rmdir(tmp_path / "gone")
    with pytest.raises(Unavailable, match="gone"):
        s.ping()


# ---- open_store -------------------------------------------------------------------


def test_open_store_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for url in (str(tmp_path / "p"), (tmp_path / "p").as_uri(), f"file://localhost{tmp_path}/p"):
        s = open_store(url, endpoint="ignored-for-local")
        assert isinstance(s, LocalStore) and s.root == tmp_path / "p"
    monkeypatch.chdir(tmp_path)
    assert open_store("rel/store").root == tmp_path / "rel" / "store"  # type: ignore[attr-defined]
    with pytest.raises(FailedPrecondition):
        open_store(str(tmp_path / "absent"), create=False)


def test_open_store_s3_from_env_without_network() -> None:
    from clinisynth_server.store.s3 import S3Store

    env = {
        "CLINISYNTH_STORE_ENDPOINT": "minio.internal:9000",
        "CLINISYNTH_STORE_ACCESS_KEY": "ak",
        "CLINISYNTH_STORE_SECRET_KEY": "sk",
        "CLINISYNTH_STORE_SECURE": "false",
    }
    s = open_store("s3://artifacts/team/a", env=env)
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix, s.endpoint) == (
        "artifacts",
        "team/a/",
        "http://minio.internal:9000",
    )
    assert s.uri("x/y") == "s3://artifacts/team/a/x/y"
    # explicit options beat env; a scheme in the endpoint sets TLS
    s2 = open_store("s3://artifacts", env=env, endpoint="https://s3.example.org")
    assert s2.endpoint == "https://s3.example.org"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "options", "field"),
    [
        ("s3://bucket", {}, "endpoint"),
        ("s3://", {"endpoint": "h:1"}, "url"),
        ("s3://Bad_Bucket", {"endpoint": "h:1"}, "url"),
        ("s3://bucket/../x", {"endpoint": "h:1"}, "url"),
        ("s3://bucket", {"endpoint": "ftp://h"}, "endpoint"),
        ("gs://bucket", {}, "url"),
        ("file://host/x", {}, "url"),
        ("", {}, "url"),
        ("/tmp/x", {"endpiont": "typo"}, "endpiont"),
    ],
)
def test_open_store_rejects_bad_config(url: str, options: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        open_store(url, env={}, **options)
    assert err.value.violations[0].field == field


def test_env_secure_must_be_boolean() -> None:
    with pytest.raises(InvalidArgument) as err:
        open_store(
            "s3://b", env={"CLINISYNTH_STORE_ENDPOINT": "h:1", "CLINISYNTH_STORE_SECURE": "maybe"}
        )
    assert err.value.violations[0].field == "CLINISYNTH_STORE_SECURE"


def test_is_an_artifact_store(store: LocalStore) -> None:
    assert isinstance(store, ArtifactStore)
