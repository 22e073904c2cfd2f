"""Sharded data sets: plain tar shards of images plus one JSON index, read member by member.

A sharded data set under a prefix is ``index.json`` (written last by ``clinisynth data upload``),
``shards/<nnnnnn>-<sha16>.tar`` and the layout's own small files (``manifest.jsonl``,
``labels.jsonl``) stored as they are. A shard holds only image files (PNG / JPEG / DICOM), each
under its path relative to the data set (``neutrophil/0001.png``), so a sharded set reads exactly
like the folder it was made from; annotations stay in the layout's files. The index lists, per
shard, its stored sha256 and its members with the image shape the uploader read from the header.

Tar members are untrusted: :func:`members` refuses anything but regular files with clean
relative names (no absolute path, ``..``, backslash, NUL, empty or hidden segment), an image
suffix and a bounded size, before a byte of them is read. Nothing is unpickled; the index is JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from clinisynth_server.errors import InvalidArgument

INDEX_NAME = "index.json"
SHARDS_DIR = "shards/"
FORMAT = "clinisynth-shards"
VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: Largest image member a shard may hold (a 4096² 16-bit DICOM is 32 MiB).
MAX_MEMBER_BYTES = 256 * 1024**2
MAX_MEMBERS = 100_000


class ShardError(InvalidArgument):
    """A shard or index that breaks the format (hostile or corrupt); names the member."""


def is_shard_key(key: str) -> bool:
    """A store key of a shard (``.../shards/<name>.tar``)."""
    head, _, name = key.rpartition("/")
    return head.endswith("shards") and name.endswith(".tar")


def check_member_name(name: str) -> str:
    """A member name as a clean relative image path, else :class:`ShardError`."""
    bad = (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/"))
    )
    if bad:
        raise ShardError.for_field("data", f"shard member {name!r}: not a clean relative path")
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise ShardError.for_field(
            "data",
            f"shard member {name!r}: only {', '.join(IMAGE_SUFFIXES)} files may be in a shard",
        )
    return name


def _check_member(info: tarfile.TarInfo, max_bytes: int) -> None:
    check_member_name(info.name)
    if not info.isreg():
        raise ShardError.for_field(
            "data", f"shard member {info.name!r}: not a regular file (links and devices refused)"
        )
    if info.size > max_bytes:
        raise ShardError.for_field(
            "data", f"shard member {info.name!r}: {info.size} bytes, at most {max_bytes}"
        )


def members(
    fileobj: IO[bytes], *, max_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """Every member of a shard, checked before it is read: (info, stream of its bytes)."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for count, info in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise ShardError.for_field("data", f"more than {MAX_MEMBERS} shard members")
                _check_member(info, max_bytes)
                stream = tar.extractfile(info)
                assert stream is not None  # a regular file always has one
                yield info, stream
    except tarfile.TarError as exc:
        raise ShardError.for_field("data", f"not a readable tar shard ({exc})") from None


def offsets(path: pathlib.Path, *, max_bytes: int = MAX_MEMBER_BYTES) -> dict[str, tuple[int, int]]:
    """Member name → (data offset, size) of a local shard, every member checked."""
    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as fh:
        for info, _stream in members(fh, max_bytes=max_bytes):
            if info.name in out:
                raise ShardError.for_field("data", f"shard member {info.name!r} appears twice")
            out[info.name] = (info.offset_data, info.size)
    return out


def sanitize(
    spool: IO[bytes],
    deidentify: Callable[[str, bytes], bytes],
    *,
    max_bytes: int = MAX_MEMBER_BYTES,
) -> IO[bytes]:
    """An uploaded shard, checked member by member, rewritten with every DICOM de-identified.

    Returns a temporary file (positioned at 0) holding the shard the store keeps: plain
    ``ustar`` headers with no owner names, times or modes carried over.
    """
    out = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    spool.seek(0)
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for info, stream in members(spool, max_bytes=max_bytes):
            if info.name in seen:
                raise ShardError.for_field("data", f"shard member {info.name!r} appears twice")
            seen.add(info.name)
            data = stream.read()
            if info.name.lower().endswith(DICOM_SUFFIXES) or data[128:132] == b"DICM":
                data = deidentify(info.name, data)
            clean = tarfile.TarInfo(info.name)
            clean.size, clean.mode = len(data), 0o644
            tar.addfile(clean, _bytes_io(data))
    out.seek(0)
    return out


def _bytes_io(data: bytes) -> IO[bytes]:
    import io

    return io.BytesIO(data)


# ---------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the data set prefix: "shards/000000-<sha16>.tar"
    sha256: str
    size_bytes: int
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, int, int] | None, ...] = ()


@dataclass(frozen=True)
class Index:
    layout: str
    shards: tuple[ShardInfo, ...]
    where: dict[str, int] = field(default_factory=dict)  # member path → shard number

    @property
    def samples(self) -> int:
        return sum(len(s.paths) for s in self.shards)


def parse_index(data: bytes) -> Index:
    """``index.json`` → :class:`Index`; a malformed index is INVALID_ARGUMENT on ``dataset``."""

    def bad(text: str) -> InvalidArgument:
        return ShardError.for_field("dataset", f"{INDEX_NAME}: {text}")

    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} index")
    if obj.get("version") != VERSION:
        raise bad(f"version {obj.get('version')!r}; this service reads {VERSION}")
    shards, where = [], {}
    for n, raw in enumerate(obj.get("shards") or []):
        if not isinstance(raw, dict):
            raise bad(f"shard {n} is not an object")
        name = raw.get("name")
        if not isinstance(name, str) or not is_shard_key(name) or ".." in name.split("/"):
            raise bad(f"shard {n}: name {name!r} is not shards/<name>.tar")
        paths = raw.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise bad(f"shard {name}: 'paths' must be a list of member paths")
        shapes_raw = raw.get("shapes") or [None] * len(paths)
        shapes: list[tuple[int, int, int] | None] = []
        for s in shapes_raw:
            ok = isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) for v in s)
            shapes.append((s[0], s[1], s[2]) if ok else None)
        for p in paths:
            check_member_name(p)
            if p in where:
                raise bad(f"{p} is listed in two shards")
            where[p] = n
        shards.append(
            ShardInfo(
                name=name,
                sha256=str(raw.get("sha256", "")),
                size_bytes=int(raw.get("size_bytes", 0)),
                paths=tuple(paths),
                shapes=tuple(shapes),
            )
        )
    return Index(layout=str(obj.get("layout", "")), shards=tuple(shards), where=where)


# ---------------------------------------------------------------------------------------------
# the bounded local cache
# ---------------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What the cache did; ``max_held`` never exceeds the cache's ``max_shards``."""

    downloads: int = 0
    hits: int = 0
    max_held: int = 0


class ShardCache:
    """At most ``max_shards`` downloaded shards on local disk (LRU), each verified by sha256.

    Reading a member opens the cached file and seeks to it: memory holds one member, never a
    shard. One cache per process (DataLoader workers each get their own folder).
    """

    def __init__(
        self,
        fetch: Callable[[str, pathlib.Path], None],
        folder: pathlib.Path,
        *,
        max_shards: int = 2,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ) -> None:
        self.fetch, self.folder = fetch, pathlib.Path(folder)
        self.max_shards = max(1, max_shards)
        self.max_member_bytes = max_member_bytes
        self._held: OrderedDict[str, tuple[pathlib.Path, dict[str, tuple[int, int]]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def _entry(self, shard: ShardInfo) -> tuple[pathlib.Path, dict[str, tuple[int, int]]]:
        held = self._held.get(shard.name)
        if held is not None:
            self._held.move_to_end(shard.name)
            self.stats.hits += 1
            return held
        while len(self._held) >= self.max_shards:
            _old, (path, _) = self._held.popitem(last=False)
            path.unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / shard.name.replace("/", "_")
        self.fetch(shard.name, path)
        if shard.sha256:
            from clinisynth_server.store.base import sha256_file

            digest, _size = sha256_file(path)
            if digest != shard.sha256:
                path.unlink(missing_ok=True)
                raise ShardError.for_field(
                    "dataset", f"{shard.name}: sha256 {digest} is not the index's {shard.sha256}"
                )
        entry = (path, offsets(path, max_bytes=self.max_member_bytes))
        self._held[shard.name] = entry
        self.stats.downloads += 1
        self.stats.max_held = max(self.stats.max_held, len(self._held))
        return entry

    def read(self, shard: ShardInfo, member: str) -> bytes:
        with self._lock:
            path, where = self._entry(shard)
        if member not in where:
            raise ShardError.for_field("dataset", f"{member} is not in {shard.name}")
        offset, size = where[member]
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            shutil.rmtree(self.folder, ignore_errors=True)


def store_fetch(store_url: str, prefix: str) -> Callable[[str, pathlib.Path], None]:
    """A fetch for :class:`ShardCache` that opens its own store connection per process.

    DataLoader workers are forked; a store client (S3 connection pool) must not be shared
    across a fork, so each process opens one from the store's URL on first use.
    """
    state: dict[str, Any] = {}

    def fetch(name: str, dest: pathlib.Path) -> None:
        from clinisynth_server.store import open_store

        if state.get("pid") != os.getpid():
            state["store"], state["pid"] = open_store(store_url), os.getpid()
        state["store"].get_file(prefix + name, dest)

    return fetch
