"""Local-folder artifact store: the embedded default, and what tests and the demo use.

Layout under ``root``::

    root/<key>                         the object's bytes, exactly (so tools can read them)
    root/.clinisynth/meta/<key>.json   sidecar: sha256, content type, metadata and the
                                       fingerprint (inode, size, mtime_ns) of the file it
                                       describes
    root/.clinisynth/lock              flock'ed while a write commits
    <dir>/.clinisynth-tmp-*            in-flight writes (same directory, then os.replace)

Why a sidecar with a fingerprint: ``stat`` must not rehash multi-GB checkpoints each time,
yet a file copied in by hand, or a crash between the two renames, must never yield a stale
digest. A sidecar is trusted only while the data file still has the inode, size and
mtime it recorded; otherwise the digest is recomputed once and cached again.

Atomicity: each write goes to a temp file in the target directory, is fsync'ed, and is
renamed over the key. The sidecar rename and the data rename happen together under an
exclusive ``flock`` (works across threads and processes on one host), so concurrent
writers to one key leave matching data and sidecar, and readers that catch the pair
mid-commit retry under the lock. Readers of data never take the lock: an open file
keeps its inode, so a stream stays on one version while the key is replaced.

The lock is held only for those renames (data and sidecar are staged and fsync'ed before it),
and it is taken with a bounded wait (``lock_timeout_s``): a writer frozen mid-commit (SIGSTOP,
a debugger, a cgroup freezer) makes other writers fail with ``Unavailable`` naming the store
(UNAVAILABLE with a retry hint over gRPC; background loops retry on their next tick) instead
of blocking every writer of the host forever.

Differences from S3, by nature of a file system: a key can't be both an object and a
"directory" (``a`` and ``a/b``); such a write raises ``FailedPrecondition``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat as stat_mod
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from clinisynth_server.errors import (
    ClinisynthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from clinisynth_server.store.base import (
    CHUNK_SIZE,
    RESERVED_PREFIX,
    ArtifactStore,
    ObjectInfo,
    as_bytes,
    atomic_write_stream,
    check_expires,
    check_limit,
    fsync_dir,
    guess_content_type,
    iter_stream,
    validate_key,
    validate_metadata,
    validate_prefix,
)

try:  # POSIX; elsewhere fall back to an in-process lock (one process per store root)
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]  # the module name, None where there is none

_Fingerprint = tuple[int, int, int]  # (inode, size, mtime_ns)
_COMMIT_RETRIES = 5
#: Default bound on waiting for the commit lock; a commit holds it for two renames.
DEFAULT_LOCK_TIMEOUT_S = 30.0
_LOCK_POLL_MAX_S = 0.05
#: Retry hint sent with a lock timeout (google.rpc.RetryInfo over gRPC).
LOCK_RETRY_AFTER_S = 1.0


def _discard(tmp: str) -> None:
    """Remove a temp file, best effort: the folder may have become unwritable since it was
    made (then it stays behind, a ``.clinisynth-tmp-*`` name no listing shows), and a cleanup
    must never replace the outcome it cleans up after — the write's own error, or its success
    (a ``link`` that already published the object)."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _make_temp(directory: Path) -> tuple[int, str]:
    """Create the parent dirs and a reserved temp file in ``directory``.

    A concurrent delete may prune an empty parent between mkdir and mkstemp (or while
    mkdir checks it); retry then. Once the temp file exists the dir can't be pruned.
    """
    for attempt in range(_COMMIT_RETRIES):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(prefix=RESERVED_PREFIX + "-tmp-", dir=directory)
        except (FileNotFoundError, FileExistsError):
            if attempt == _COMMIT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


class _SourceFailed(Exception):
    """The caller's data source failed (not the store): re-raised as the original error."""


def _guard_source(chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    except Exception as exc:
        raise _SourceFailed() from exc


def _fingerprint(st: os.stat_result) -> _Fingerprint:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)


def _sort_name(entry: os.DirEntry[str]) -> str:
    """Sort a directory so that walking it yields keys in global key order.

    Every key under directory ``d`` starts with ``d/``, so ``d`` must sort as ``d/`` among
    its siblings (``a-c`` < ``a/b`` because ``-`` < ``/``).
    """
    return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name


class LocalStore(ArtifactStore):
    """Artifact store in a local directory (see the module docstring for the layout)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = True,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        timeout = float(lock_timeout_s)
        if not (timeout > 0 and timeout < float("inf")):
            raise InvalidArgument.for_field(
                "lock_timeout_s", f"must be a positive number of seconds, got {lock_timeout_s!r}"
            )
        self.lock_timeout_s = timeout
        self.root = Path(root).expanduser().resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FailedPrecondition(f"local store root {self.root} does not exist")
        self._meta_root = self.root / RESERVED_PREFIX / "meta"
        self._lock_path = self.root / RESERVED_PREFIX / "lock"
        self._thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ---- paths, locking, sidecars --------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _meta_path(self, key: str) -> Path:
        parts = key.split("/")
        return self._meta_root.joinpath(*parts[:-1], parts[-1] + ".json")

    @contextlib.contextmanager
    def _commit_lock(self) -> Iterator[None]:
        """Exclusive lock around (sidecar rename, data rename) pairs and deletes."""
        if fcntl is None:  # pragma: no cover - non-POSIX: one process per root
            if not self._thread_lock.acquire(timeout=self.lock_timeout_s):
                raise self._lock_timeout()
            try:
                yield
            finally:
                self._thread_lock.release()
            return
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+b") as fh:
            self._flock(fh.fileno())  # per open file: threads exclude too
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _flock(self, fd: int) -> None:
        """Take the exclusive lock within ``lock_timeout_s`` (non-blocking tries, backing off).

        Why polling: ``flock`` has no timeout of its own, and a blocking one waits forever
        behind a holder that is frozen rather than dead (a dead one's lock is released).
        """
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except InterruptedError:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._lock_timeout()
            time.sleep(min(delay, left))
            delay = min(delay * 2, _LOCK_POLL_MAX_S)

    def _lock_timeout(self) -> Unavailable:
        return Unavailable(
            f"local store {self.root} is busy: its commit lock ({self._lock_path}) has been held "
            f"by another writer for over {self.lock_timeout_s:g} s (a stalled or frozen "
            f"process?); retry in {LOCK_RETRY_AFTER_S:g} s",
            reason="STORE_LOCK_TIMEOUT",
            metadata={
                "store": str(self.root),
                "lock_timeout_s": f"{self.lock_timeout_s:g}",
                "retry_after_s": f"{LOCK_RETRY_AFTER_S:g}",
            },
        )

    def _read_sidecar(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self._meta_path(key), "rb") as fh:
                side = json.load(fh)
        except (OSError, ValueError):
            return None
        return side if isinstance(side, dict) else None

    def _stage_sidecar(self, key: str, side: dict[str, Any]) -> str:
        """Write the sidecar to a temp file beside its place (outside the lock: commits stay
        two renames; a directory holding a temp file is never pruned)."""
        fd, tmp = _make_temp(self._meta_path(key).parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(side, sort_keys=True).encode())
        except BaseException:
            _discard(tmp)
            raise
        return tmp

    def _write_sidecar(self, key: str, side: dict[str, Any]) -> None:
        tmp = self._stage_sidecar(key, side)
        try:
            os.replace(tmp, self._meta_path(key))
        except BaseException:
            _discard(tmp)
            raise

    @staticmethod
    def _matches(side: dict[str, Any] | None, st: os.stat_result) -> bool:
        return side is not None and tuple(side.get("fingerprint", ())) == _fingerprint(st)

    def _info(self, key: str, st: os.stat_result, side: dict[str, Any] | None) -> ObjectInfo:
        """ObjectInfo from a data stat and a sidecar (trusted only if its fingerprint matches)."""
        if side is None or not self._matches(side, st):
            return ObjectInfo(key=key, size=st.st_size, sha256=None, modified=_mtime(st))
        return ObjectInfo(
            key=key,
            size=st.st_size,
            sha256=side["sha256"],
            modified=_mtime(st),
            content_type=side.get("content_type"),
            metadata=dict(side.get("metadata", {})),
        )

    def _os_error(self, exc: OSError, key: str) -> ClinisynthError:
        """Map a file-system failure on ``key`` to the domain error tree."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhausted(f"local store {self.root} is full writing {key!r}: {exc}")
        if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
            return FailedPrecondition(
                f"key {key!r} clashes with a directory or file in local store {self.root}"
                " (a key can't be both an object and a prefix here)"
            )
        return Unavailable(f"local store {self.root} failed on {key!r}: {exc}")

    # ---- writes -----------------------------------------------------------------

    def _write(
        self,
        key: str,
        chunks: Iterator[bytes],
        *,
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        only_if_absent: bool = False,
    ) -> ObjectInfo | None:
        """Stage chunks in a temp file next to the key, then commit data + sidecar together."""
        dest = self._path(key)
        meta = validate_metadata(metadata)
        ctype = guess_content_type(key, content_type)
        if dest.is_dir():
            raise self._os_error(OSError(errno.EISDIR, "is a directory"), key)
        tmp: str | None = None
        side_tmp: str | None = None
        try:
            fd, tmp = _make_temp(dest.parent)
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as fh:
                for chunk in _guard_source(chunks):
                    fh.write(chunk)
                    digest.update(chunk)
                fh.flush()
                os.fsync(fh.fileno())
                st = os.fstat(fh.fileno())
            side = {
                "sha256": digest.hexdigest(),
                "fingerprint": list(_fingerprint(st)),
                "content_type": ctype,
                "metadata": meta,
            }
            side_tmp = self._stage_sidecar(key, side)
            with self._commit_lock():  # two renames (or a rename and a link), nothing more
                if only_if_absent:
                    if os.path.lexists(dest):
                        return None
                    os.replace(side_tmp, self._meta_path(key))
                    side_tmp = None
                    try:
                        os.link(tmp, dest)  # never overwrites, even a writer without the lock
                    except FileExistsError:
                        return None
                else:
                    os.replace(side_tmp, self._meta_path(key))
                    side_tmp = None
                    os.replace(tmp, dest)
                    tmp = None
            fsync_dir(dest.parent)
            return self._info(key, st, side)
        except _SourceFailed as exc:
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
        except OSError as exc:
            raise self._os_error(exc, key) from exc
        finally:
            for leftover in (tmp, side_tmp):
                if leftover is not None:
                    _discard(leftover)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        payload = as_bytes(data)
        info = self._write(key, iter([payload]), content_type=content_type, metadata=metadata)
        assert info is not None
        return info

    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        info = self._write(key, iter_stream(stream), content_type=content_type, metadata=metadata)
        assert info is not None
        return info

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below; open errors mapped first
        except OSError as exc:
            raise NotFound(f"local file {os.fspath(path)!r} can't be read: {exc}") from exc
        with fh:
            return self.put_stream(key, fh, content_type=content_type, metadata=metadata)

    def put_if_absent(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Exactly one of concurrent callers wins (flock + ``os.link``, which never overwrites)."""
        payload = as_bytes(data)
        if os.path.lexists(self._path(key)):
            return False  # cheap early out; the commit re-checks under the lock
        info = self._write(
            key,
            iter([payload]),
            content_type=content_type,
            metadata=metadata,
            only_if_absent=True,
        )
        return info is not None

    # ---- reads ------------------------------------------------------------------

    def _open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"no object {key!r} in {self.uri()}") from exc
        except OSError as exc:
            raise self._os_error(exc, key) from exc
        if stat_mod.S_ISDIR(os.fstat(fh.fileno()).st_mode):
            fh.close()
            raise NotFound(f"no object {key!r} in {self.uri()} (it is a prefix)")
        return fh

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as fh:
            return fh.read()

    def open_stream(self, key: str) -> IO[bytes]:
        return self._open(key)

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> ObjectInfo:
        with self._open(key) as fh:
            st = os.fstat(fh.fileno())
            digest, _ = atomic_write_stream(Path(dest_path), iter_stream(fh, CHUNK_SIZE))
        info = self._info(key, st, self._read_sidecar(key))
        return ObjectInfo(
            key=key,
            size=st.st_size,
            sha256=digest,
            modified=info.modified,
            content_type=info.content_type,
            metadata=info.metadata,
        )

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"no object {key!r} in {self.uri()}") from exc
        if stat_mod.S_ISDIR(st.st_mode):
            raise NotFound(f"no object {key!r} in {self.uri()} (it is a prefix)")
        side = self._read_sidecar(key)
        if self._matches(side, st):
            return self._info(key, st, side)
        return self._rehash(key)

    def _rehash(self, key: str) -> ObjectInfo:
        """Digest a file whose sidecar is missing or stale, then cache it.

        First re-check under the lock (a writer may have been between its two renames);
        hash outside the lock so a big file doesn't stall writers; cache the result only
        if the file is still the one hashed.
        """
        path = self._path(key)
        with self._commit_lock():
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise NotFound(f"no object {key!r} in {self.uri()}") from exc
            side = self._read_sidecar(key)
            if self._matches(side, st):
                return self._info(key, st, side)
        with self._open(key) as fh:
            st = os.fstat(fh.fileno())
            digest = hashlib.sha256()
            for chunk in iter_stream(fh):
                digest.update(chunk)
        side = {
            "sha256": digest.hexdigest(),
            "fingerprint": list(_fingerprint(st)),
            "content_type": guess_content_type(key, None),
            "metadata": {},
        }
        try:  # caching is best effort: a busy lock only means the next stat hashes again
            with self._commit_lock(), contextlib.suppress(OSError):
                if _fingerprint(os.stat(path)) == _fingerprint(st):
                    self._write_sidecar(key, side)
        except Unavailable:
            pass
        return self._info(key, st, side)

    def list(
        self,
        prefix: str = "",
        *,
        recursive: bool = True,
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        check_limit(limit)
        if start_after is not None and not isinstance(start_after, str):
            raise InvalidArgument.for_field("start_after", "must be a string key")
        return self._list(prefix, recursive, start_after or "", limit)

    def _list(
        self, prefix: str, recursive: bool, start_after: str, limit: int | None
    ) -> Iterator[ObjectInfo]:
        if limit == 0:
            return
        head, _, name_prefix = prefix.rpartition("/")
        start_dir = self.root.joinpath(*head.split("/")) if head else self.root
        walk = self._walk(
            start_dir, head + "/" if head else "", name_prefix, recursive, start_after
        )
        for count, info in enumerate(walk, start=1):
            yield info
            if limit is not None and count >= limit:
                return

    def _walk(
        self,
        directory: Path,
        dir_key: str,
        name_prefix: str,
        recursive: bool,
        start_after: str,
    ) -> Iterator[ObjectInfo]:
        """Depth-first walk in key order, pruning subtrees entirely at or before start_after."""
        try:
            with os.scandir(directory) as it:
                entries = [
                    e
                    for e in it
                    if not e.name.startswith(RESERVED_PREFIX) and e.name.startswith(name_prefix)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        entries.sort(key=_sort_name)
        for entry in entries:
            key = dir_key + entry.name
            if entry.is_dir(follow_symlinks=False):
                sub = key + "/"
                if sub <= start_after and not start_after.startswith(sub):
                    continue
                if recursive:
                    yield from self._walk(Path(entry.path), sub, "", True, start_after)
                elif sub > start_after and self._has_objects(Path(entry.path)):
                    yield ObjectInfo(key=sub, size=0, sha256=None, modified=None, is_prefix=True)
                continue
            if key <= start_after:
                continue
            try:
                st = os.stat(entry.path)
            except OSError:
                continue  # deleted while listing
            if not stat_mod.S_ISREG(st.st_mode):
                continue
            yield self._info(key, st, self._read_sidecar(key))

    @staticmethod
    def _has_objects(directory: Path) -> bool:
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            if any(not f.startswith(RESERVED_PREFIX) for f in filenames):
                return True
            del dirpath
        return False

    # ---- deletes ----------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self._path(key)
        meta = self._meta_path(key)
        with self._commit_lock():
            try:
                if path.is_dir() and not path.is_symlink():
                    return  # a prefix, not an object: nothing to delete (as S3)
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                raise self._os_error(exc, key) from exc
            with contextlib.suppress(OSError):
                meta.unlink()
            self._prune_empty(path.parent, self.root)
            self._prune_empty(meta.parent, self._meta_root)

    @staticmethod
    def _prune_empty(directory: Path, stop: Path) -> None:
        """Remove now-empty parent dirs up to (not including) ``stop``.

        Runs under the commit lock; writers staging a temp file outside it retry if their
        fresh directory is pruned (see ``_make_temp``), and a dir holding a temp file is
        never empty.
        """
        while directory != stop and stop in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    # ---- misc -------------------------------------------------------------------

    def presign_get(self, key: str, expires_s: int = 3600) -> str | None:
        """A folder can't serve HTTP: always ``None`` (callers fall back to streaming)."""
        validate_key(key)
        check_expires(expires_s)
        return None

    def uri(self, key: str = "") -> str:
        return self._path(key).as_uri() if key else self.root.as_uri()

    def ping(self) -> None:
        if not self.root.is_dir():
            raise Unavailable(f"local store {self.root} is missing")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise Unavailable(f"local store {self.root} is not writable")
