"""The artifact-store contract shared by the local-folder and S3 backends.

Every service keeps its datasets, expert feedback, checkpoints, job records, the Triton
model repository and outputs behind :class:`ArtifactStore`, so the embedded default (a
folder) and production (MinIO / any S3 endpoint) behave the same. Errors are the domain
tree of :mod:`clinisynth_server.errors` only: ``InvalidArgument`` (bad key, naming
``key``), ``NotFound`` (missing key), ``Unavailable`` (backend down, naming the
endpoint), ``Internal`` (stored bytes fail their digest).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import mimetypes
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from clinisynth_server.errors import Internal, InvalidArgument, NotFound

#: Names starting with this are the store's own bookkeeping (temp files, digest sidecars);
#: they are never listed and no key segment may start with it.
RESERVED_PREFIX = ".clinisynth"
#: Metadata key under which the SHA-256 hex digest is kept (``x-amz-meta-sha256`` on S3).
SHA256_METADATA_KEY = "sha256"
#: Read / copy granularity: big enough for throughput, small enough to keep memory flat.
CHUNK_SIZE = 1024 * 1024

_METADATA_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")
_MAX_KEY_BYTES = 1024  # the S3 limit, enforced for both backends so keys port between them


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object (or, from a non-recursive list, one prefix).

    ``sha256`` is always set by :meth:`ArtifactStore.stat` and by writes; a listing fills
    it only where it is cheap (S3 listings carry no user metadata), so it may be ``None``
    there. ``is_prefix`` entries (``key`` ends with ``/``) come only from
    ``list(..., recursive=False)`` and stand for a "directory" of further keys.
    """

    key: str
    size: int
    sha256: str | None
    modified: datetime | None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    is_prefix: bool = False


def validate_key(key: object, field_name: str = "key") -> str:
    """Return ``key`` if it is a clean relative POSIX path, else raise ``InvalidArgument``.

    Rejected: non-strings, empty keys, absolute paths, backslashes, empty / ``.`` / ``..``
    segments, NUL and control characters, reserved ``.clinisynth*`` segments, keys over
    1024 UTF-8 bytes. Keys are the same on disk and in S3, so nothing can escape the root.
    """
    if not isinstance(key, str):
        raise InvalidArgument.for_field(field_name, f"must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidArgument.for_field(field_name, "must not be empty")
    if "\\" in key:
        raise InvalidArgument.for_field(field_name, f"{key!r}: use '/' not backslashes")
    if key.startswith("/"):
        raise InvalidArgument.for_field(field_name, f"{key!r}: must be relative, not absolute")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidArgument.for_field(field_name, f"{key!r}: control characters not allowed")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise InvalidArgument.for_field(field_name, f"longer than {_MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument.for_field(
                field_name, f"{key!r}: empty, '.' or '..' path segments are not allowed"
            )
        if segment.startswith(RESERVED_PREFIX):
            raise InvalidArgument.for_field(
                field_name, f"{key!r}: segments starting with {RESERVED_PREFIX!r} are reserved"
            )
    return key


def validate_prefix(prefix: object, field_name: str = "prefix") -> str:
    """Validate a listing prefix: ``""`` (everything), a partial key, or a key ending in ``/``."""
    if not isinstance(prefix, str):
        raise InvalidArgument.for_field(
            field_name, f"must be a string, got {type(prefix).__name__}"
        )
    if prefix == "":
        return prefix
    validate_key(prefix.removesuffix("/"), field_name)
    return prefix


#: The data-set namespace: the only part of the store a caller's upload may write.
DATASETS_NAMESPACE = "datasets/"
#: Model folders uploaded for import (``imports/<upload id>/...``): written only by the finetune
#: service's model upload RPC, so it is a service namespace for every other caller-chosen key.
IMPORTS_NAMESPACE = "imports/"
#: Namespaces written only by the service that owns them (model records, expert feedback and
#: review items, job records / events / checkpoints, guidance records, a model repository kept in
#: the store). No caller-chosen key or prefix, read or written, may point into one.
SERVICE_NAMESPACES: tuple[str, ...] = (
    "catalog/",
    "feedback/",
    "review/",
    "finetune/",
    "counterfactual/",
    "jobs/",
    "checkpoints/",
    "triton-models/",
    "model-repository/",
    "pacs-outbox/",
    "audit/",
    IMPORTS_NAMESPACE,
)


def confine_key(key: object, namespace: str, field_name: str = "key") -> str:
    """Return ``key`` if it is a clean key strictly under ``namespace``, else ``InvalidArgument``.

    The caller's key is taken as is (never re-rooted), so what a client names is what lands
    in the store and what it later passes as a data-set prefix.
    """
    clean = validate_key(key, field_name)
    if not clean.startswith(namespace) or clean == namespace:
        raise InvalidArgument.for_field(
            field_name,
            f"{clean!r}: must lie under {namespace!r} (e.g. {namespace}<name>/<file>); "
            "other parts of the store are written only by the services that own them",
        )
    return clean


def outside_service_namespaces(prefix: object, field_name: str = "prefix") -> str:
    """Return a caller-chosen prefix (or key) if it is clean and outside every service namespace."""
    clean = validate_prefix(prefix, field_name)
    head = clean.split("/", 1)[0] + "/"
    if head in SERVICE_NAMESPACES:
        raise InvalidArgument.for_field(
            field_name,
            f"{clean!r}: {head!r} is owned by a service; use a prefix outside "
            f"{', '.join(SERVICE_NAMESPACES)}",
        )
    return clean


#: Read-only openings in a service namespace: objects a service hands to callers as references.
#: The reward service's content-addressed, de-identified images come back as ``image_ref`` on
#: every Feedback / ReviewItem and leave in any export, so naming one again reads nothing new.
CALLER_READABLE_PREFIXES: tuple[str, ...] = ("feedback/images/",)


def readable_key(key: object, field_name: str = "key") -> str:
    """Return a caller-chosen key to *read* if a caller may read it, else ``InvalidArgument``.

    Callers may read what they may write (``datasets/`` and the outputs written under their
    prefixes, anywhere outside :data:`SERVICE_NAMESPACES`) plus :data:`CALLER_READABLE_PREFIXES`;
    never records, jobs, checkpoints, secrets or a model repository. Checked before any store
    call, so a refused key is never read and its existence is not revealed.
    """
    clean = validate_key(key, field_name)
    if any(clean.startswith(p) and clean != p for p in CALLER_READABLE_PREFIXES):
        return clean
    return outside_service_namespaces(clean, field_name)


def dir_prefix(prefix: str, field_name: str = "prefix") -> str:
    """Turn a "directory" prefix (``"a/b"`` or ``"a/b/"``) into ``"a/b/"``; ``""`` stays."""
    validate_prefix(prefix, field_name)
    return prefix if prefix == "" or prefix.endswith("/") else prefix + "/"


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Return user metadata normalised to lowercase keys; both backends accept the same set.

    S3 carries metadata as HTTP headers, so keys are ``[a-z0-9_-]`` and values printable
    ASCII; ``sha256`` is reserved for the store's own digest.
    """
    out: dict[str, str] = {}
    for raw_key, value in (metadata or {}).items():
        key = str(raw_key).lower()
        if not _METADATA_KEY_RE.match(key):
            raise InvalidArgument.for_field(
                f"metadata[{raw_key!r}]", "keys must match [a-z0-9][a-z0-9_-]* (max 128)"
            )
        if key == SHA256_METADATA_KEY:
            raise InvalidArgument.for_field(
                f"metadata[{raw_key!r}]", "'sha256' is reserved for the store's digest"
            )
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise InvalidArgument.for_field(
                f"metadata[{raw_key!r}]", "values must be printable ASCII strings"
            )
        out[key] = value
    return out


def guess_content_type(key: str, content_type: str | None) -> str:
    """Explicit type wins; else guess from the key's suffix; else ``application/octet-stream``."""
    if content_type:
        return content_type
    guessed, _ = mimetypes.guess_type(key, strict=False)
    return guessed or "application/octet-stream"


def as_bytes(data: object) -> bytes:
    """Accept ``bytes``, ``bytearray`` and ``memoryview`` payloads; reject others clearly."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise InvalidArgument.for_field("data", f"must be bytes-like, got {type(data).__name__}")


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_stream(dest: Path, chunks: Iterator[bytes]) -> tuple[str, int]:
    """Write ``chunks`` to ``dest`` via a same-directory temp file + fsync + ``os.replace``.

    Returns the digest and size of what was written. On any error the temp file is
    removed and ``dest`` keeps its old content, so readers never see half a file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=RESERVED_PREFIX + "-tmp-", dir=dest.parent)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)
    return digest.hexdigest(), size


def iter_stream(stream: IO[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a binary stream's content in chunks."""
    while chunk := stream.read(chunk_size):
        yield chunk


class ArtifactStore(ABC):
    """One interface over a local folder and S3 / MinIO.

    Keys are relative POSIX paths (see :func:`validate_key`). Writes are atomic: a reader
    sees the old object or the whole new one. Listings are sorted by key (UTF-8 byte
    order, as S3). Use as a context manager, or call :meth:`close`, to release connections.
    """

    # ---- abstract primitives -------------------------------------------------------

    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Write ``data`` to ``key`` atomically, replacing any old object."""

    @abstractmethod
    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Write everything read from ``stream`` (until EOF) to ``key`` atomically.

        If reading the stream fails midway, nothing is written and the old object stays.
        """

    @abstractmethod
    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Upload a local file to ``key`` atomically (multipart on S3 for large files)."""

    @abstractmethod
    def put_if_absent(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Write ``data`` only if ``key`` does not exist; ``True`` if this call wrote it.

        For idempotent writes (job records, feedback ids): of concurrent callers exactly
        one wins where the backend supports it (see each backend's notes).
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Whole object in memory; ``NotFound`` if missing. Use :meth:`open_stream` for big ones."""

    @abstractmethod
    def open_stream(self, key: str) -> IO[bytes]:
        """A readable binary stream of the object (a context manager; close it).

        The stream sees one consistent version even if the key is overwritten meanwhile.
        """

    @abstractmethod
    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> ObjectInfo:
        """Download to ``dest_path`` atomically (temp file + rename), creating parent dirs."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, digest, mtime, content type and metadata of ``key``; ``NotFound`` if missing."""

    @abstractmethod
    def list(
        self,
        prefix: str = "",
        *,
        recursive: bool = True,
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), sorted by key.

        ``recursive=False`` stops at the next ``/`` after ``prefix`` and yields
        ``is_prefix`` entries for deeper "directories". Page with ``start_after`` (the last
        key of the previous page, exclusive) and ``limit``.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error (idempotent, as S3)."""

    @abstractmethod
    def presign_get(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited plain-HTTP GET URL for ``key``, or ``None`` if the backend can't."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Where ``key`` lives, for logs and provenance (``file:///...`` or ``s3://...``)."""

    @abstractmethod
    def ping(self) -> None:
        """Health check: return if usable, else raise ``Unavailable`` naming the backend."""

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release connections; the local backend holds none."""

    # ---- conveniences shared by both backends -------------------------------------

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def put_json(
        self, key: str, obj: Any, *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Store ``obj`` as UTF-8 JSON (sorted keys, so equal objects give equal digests)."""
        return self.put_bytes(
            key, encode_json(obj), content_type="application/json", metadata=metadata
        )

    def get_json(self, key: str) -> Any:
        """Load a JSON object; ``Internal`` if the stored bytes aren't JSON."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Internal(f"object {self.uri(key)} is not valid JSON: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object (a prefix with objects under it is not one)."""
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the object in chunks of at most ``chunk_size`` bytes (for gRPC streaming)."""
        if chunk_size <= 0:
            raise InvalidArgument.for_field("chunk_size", f"must be positive, got {chunk_size}")
        with self.open_stream(key) as stream:
            yield from iter_stream(stream, chunk_size)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the "directory" ``prefix``; returns how many.

        ``"runs/7"`` means ``runs/7/...`` (never ``runs/70``). The empty prefix is refused
        so a bug can't wipe the whole store.
        """
        if prefix in ("", "/"):
            raise InvalidArgument.for_field("prefix", "refusing to delete the whole store")
        keys = [info.key for info in self.list(dir_prefix(prefix))]
        for key in keys:
            self.delete(key)
        return len(keys)

    def upload_dir(
        self, local_dir: str | os.PathLike[str], prefix: str
    ) -> builtins.list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``.

        Symlinked files are followed; names the store can't hold (reserved or odd) raise
        ``InvalidArgument`` before anything is uploaded.
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise InvalidArgument.for_field("local_dir", f"{str(root)!r} is not a directory")
        base = dir_prefix(prefix)
        plan: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not path.is_file():
                    continue
                rel = path.relative_to(root).as_posix()
                plan.append((validate_key(base + rel), path))
        return [self.put_file(key, path) for key, path in plan]

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[Path]:
        """Download every object under the "directory" ``prefix`` into ``local_dir``."""
        base = dir_prefix(prefix)
        dest_root = Path(local_dir)
        written: list[Path] = []
        for info in self.list(base):
            rel = info.key[len(base) :]
            dest = dest_root.joinpath(*rel.split("/"))
            self.get_file(info.key, dest)
            written.append(dest)
        return written


def encode_json(obj: Any) -> bytes:
    """Deterministic JSON bytes for records (sorted keys, UTF-8, no NaN)."""
    try:
        text = json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=1)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument.for_field("obj", f"not JSON-serialisable: {exc}") from exc
    return text.encode("utf-8") + b"\n"


def check_limit(limit: int | None) -> None:
    """``limit`` must be ``None`` or a non-negative int."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InvalidArgument.for_field("limit", f"must be a non-negative integer, got {limit!r}")


def check_expires(expires_s: int) -> None:
    """Presigned URLs live between 1 s and 7 days (the S3 SigV4 limit)."""
    if not isinstance(expires_s, int) or not 1 <= expires_s <= 7 * 24 * 3600:
        raise InvalidArgument.for_field(
            "expires_s", f"must be 1..604800 seconds, got {expires_s!r}"
        )
