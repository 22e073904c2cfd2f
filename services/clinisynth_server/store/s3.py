"""S3 / MinIO artifact store through the ``minio`` client.

Object ``key`` lives at ``s3://<bucket>/<base prefix><key>``. What each guarantee rests on:

* **Atomic writes.** An S3 PUT, or a multipart upload's Complete, publishes the whole object
  at once; a failed multipart upload is aborted (best effort) and was never visible. Parts
  left behind when even the abort can't reach the server are invisible too; a bucket
  lifecycle rule (``AbortIncompleteMultipartUpload``) reclaims them.
* **Digests.** The SHA-256 is computed before upload and stored as ``x-amz-meta-sha256``;
  downloads verify it and raise ``Internal`` on mismatch (nothing is written locally).
  Objects written by other tools have no digest: ``stat`` then hashes by streaming
  (correct, but a full read each time).
* **Fail fast.** Our own urllib3 pool has short connect / read timeouts and few retries, so
  a dead endpoint raises ``Unavailable`` naming the endpoint within seconds. A refused or
  reset connection is retried (``retries``, default once: a pooled keep-alive connection the
  server dropped looks the same); a read timeout is not — the server has the request and did
  not answer, waiting as long again would only push the caller past its deadline (the caller
  retries with its idempotency key, as after any UNAVAILABLE). So one request to a wedged
  endpoint fails after ``read_timeout_s`` (default 10 s), one to an unroutable one after
  ``(1 + retries) * connect_timeout_s``; both well inside an RPC's deadline.
* **put_if_absent** sends ``If-None-Match: *`` (AWS S3 since 2024-08, MinIO, moto). If the
  server answers NotImplemented, the store falls back to stat-then-put, which has a race:
  two concurrent callers may both "win", the later write replacing the earlier. A server
  that silently ignores the header gives the same race; pass ``conditional_writes=False``
  to say so explicitly.
* **Listings** carry no user metadata in S3, so ``list`` yields ``sha256=None`` and no
  content type; call ``stat`` for a key's full record.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import DictType, check_bucket_name

from clinisynth_server.errors import (
    ClinisynthError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from clinisynth_server.store.base import (
    CHUNK_SIZE,
    SHA256_METADATA_KEY,
    ArtifactStore,
    ObjectInfo,
    as_bytes,
    atomic_write_stream,
    check_expires,
    check_limit,
    dir_prefix,
    guess_content_type,
    iter_stream,
    sha256_file,
    validate_key,
    validate_metadata,
    validate_prefix,
)

_META_HEADER = "x-amz-meta-"
#: Seconds to wait for any byte of an answer (per socket read, not per transfer: a long upload
#: or download is fine as long as bytes keep flowing).
DEFAULT_READ_TIMEOUT_S = 10.0
_DEFAULT_PART_SIZE = 16 * 1024 * 1024  # S3 minimum is 5 MiB; 16 MiB keeps part counts low
_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchVersion"}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_UNSUPPORTED_CODES = {"NotImplemented", "MethodNotAllowed"}
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "XMinioServerNotInitialized",
    "ConditionalRequestConflict",
}


def _user_metadata(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """``x-amz-meta-*`` headers as a lowercase dict without the prefix."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        lower = str(name).lower()
        if lower.startswith(_META_HEADER):
            out[lower[len(_META_HEADER) :]] = str(value)
    return out


class _VerifyingReader(io.RawIOBase):
    """Wrap a source stream; hash what passes; check size and digest when it ends.

    Used both ways: on upload it stops minio from completing an object whose file changed
    while being sent (the error is raised while the last bytes are read, before the last
    request goes out); on download it stops a corrupt object from landing on disk.
    """

    def __init__(
        self,
        source: Any,
        *,
        size: int | None,
        sha256: str | None,
        what: str,
        on_error: Any = None,
        mismatch: type[ClinisynthError] = Internal,
    ) -> None:
        super().__init__()
        self._source = source
        self._size = size
        self._expected = sha256
        self._what = what
        self._hash = hashlib.sha256()
        self._count = 0
        self._on_error = on_error
        self._mismatch = mismatch
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if self._size is not None:
            want = min(want, self._size - self._count)
        if want <= 0:
            self._check()
            return 0
        try:
            chunk = self._source.read(want)
        except ClinisynthError:
            raise
        except Exception as exc:
            if self._on_error is None:
                raise
            raise self._on_error(exc) from exc
        n = len(chunk)
        view[:n] = chunk
        self._hash.update(chunk)
        self._count += n
        if n == 0 or (self._size is not None and self._count >= self._size):
            self._check()
        return n

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._size is not None and self._count != self._size:
            raise self._mismatch(f"{self._what}: expected {self._size} bytes, got {self._count}")
        if self._expected and self._hash.hexdigest() != self._expected:
            raise self._mismatch(
                f"{self._what}: sha256 {self._hash.hexdigest()} != recorded {self._expected}"
            )

    def close(self) -> None:
        try:
            close = getattr(self._source, "close", None)
            if close:
                close()
            release = getattr(self._source, "release_conn", None)
            if release:
                release()
        finally:
            super().close()


class _Retry(urllib3.Retry):
    """urllib3's retries, except that a read timeout is final (see "Fail fast" above)."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> _Retry:
        if isinstance(error, urllib3.exceptions.ReadTimeoutError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


class S3Store(ArtifactStore):
    """Artifact store in an S3 bucket (MinIO, AWS S3, or any S3-protocol server).

    No network call happens in the constructor unless ``create_bucket`` is set, so services
    can start before the store is up and report it through :meth:`ping`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        region: str = "us-east-1",
        secure: bool | None = None,
        cert_check: bool = True,
        create_bucket: bool = False,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        retries: int = 1,
        part_size: int = _DEFAULT_PART_SIZE,
        parallel_uploads: int = 2,
        max_connections: int = 16,
        conditional_writes: bool | None = None,
    ) -> None:
        host, secure = _parse_endpoint(endpoint, secure)
        self.bucket = bucket
        self.prefix = dir_prefix(prefix.strip("/"), "url") if prefix.strip("/") else ""
        self.endpoint = f"{'https' if secure else 'http'}://{host}"
        if part_size < 5 * 1024 * 1024:
            raise InvalidArgument.for_field("part_size", "S3 parts must be at least 5 MiB")
        self._part_size = part_size
        self._parallel = max(1, parallel_uploads)
        # None = try If-None-Match and learn; False = stat-then-put (racy, documented).
        self._conditional = conditional_writes
        self._conditional_lock = threading.Lock()
        self._read_timeout_s = read_timeout_s
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=max_connections,
            cert_reqs="CERT_REQUIRED" if cert_check else "CERT_NONE",
            ca_certs=_ca_bundle() if secure and cert_check else None,
            retries=_Retry(
                total=retries,
                connect=retries,
                read=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                respect_retry_after_header=False,
            ),
        )
        try:
            self._client = Minio(
                host,
                access_key=access_key,
                secret_key=secret_key,
                session_token=session_token,
                secure=secure,
                region=region,  # known region: no GetBucketLocation round trip, offline presign
                http_client=self._http,
                cert_check=cert_check,
            )
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise InvalidArgument.for_field("url", f"bad bucket or endpoint: {exc}") from exc
        if create_bucket:
            self._ensure_bucket(region)

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r}, endpoint={self.endpoint!r})"

    def close(self) -> None:
        self._http.clear()

    # ---- helpers ----------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _key(self, name: str) -> str:
        return name[len(self.prefix) :]

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate minio / urllib3 failures into the domain error tree, naming the endpoint."""
        try:
            yield
        except ClinisynthError:
            raise
        except S3Error as exc:
            raise self._s3_error(exc, op, key) from exc
        except (ServerError, InvalidResponseError) as exc:
            raise Unavailable(
                f"S3 endpoint {self.endpoint} failed during {op}: {exc}",
                metadata={"endpoint": self.endpoint},
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError, MinioException) as exc:
            raise self._unreachable(exc, op) from exc

    def _unreachable(self, exc: BaseException, op: str) -> Unavailable:
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            return Unavailable(
                f"S3 endpoint {self.endpoint} timed out during {op}: no answer within"
                f" {self._read_timeout_s:g} s ({exc})",
                metadata={"endpoint": self.endpoint},
            )
        return Unavailable(
            f"S3 endpoint {self.endpoint} unreachable during {op}: {exc}",
            metadata={"endpoint": self.endpoint},
        )

    def _s3_error(self, exc: S3Error, op: str, key: str | None) -> ClinisynthError:
        where = self.uri(key) if key else self.uri()
        if exc.code in _NOT_FOUND_CODES:
            return NotFound(f"no object {key!r} in {self.uri()}")
        if exc.code == "NoSuchBucket":
            return FailedPrecondition(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}"
                " (create it, or open the store with create_bucket=True)"
            )
        if exc.code in _DENIED_CODES:
            return PermissionDenied(f"{op} on {where} denied by {self.endpoint}: {exc.code}")
        if exc.code in _TRANSIENT_CODES:
            return Unavailable(
                f"S3 endpoint {self.endpoint} busy during {op}: {exc.code}",
                metadata={"endpoint": self.endpoint},
            )
        return Internal(f"{op} on {where} failed at {self.endpoint}: {exc.code}: {exc.message}")

    def _ensure_bucket(self, region: str) -> None:
        with self._errors("create bucket"):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=region)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @staticmethod
    def _user_meta(sha256: str, meta: Mapping[str, str]) -> DictType:
        return {SHA256_METADATA_KEY: sha256, **meta}

    def _info_from_stat(self, key: str, obj: Any) -> ObjectInfo:
        meta = _user_metadata(obj.metadata)
        sha = meta.pop(SHA256_METADATA_KEY, None)
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            sha256=sha,
            modified=obj.last_modified,
            content_type=obj.content_type,
            metadata=meta,
        )

    # ---- writes -----------------------------------------------------------------

    def _upload(
        self,
        key: str,
        source: IO[bytes],
        size: int,
        sha256: str,
        *,
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        verify_source: bool,
    ) -> ObjectInfo:
        """PUT (or multipart-upload) ``size`` bytes from ``source`` with digest metadata."""
        name = self._name(key)
        meta = validate_metadata(metadata)
        ctype = guess_content_type(key, content_type)
        data: IO[bytes] = source
        if verify_source:
            data = io.BufferedReader(
                _VerifyingReader(
                    source,
                    size=size,
                    sha256=sha256,
                    what=f"local file for {key!r} changed during upload",
                    mismatch=FailedPrecondition,
                )
            )
        with self._errors("put", key):
            self._client.put_object(
                self.bucket,
                name,
                cast(BinaryIO, data),  # minio only calls read(); IO[bytes] is all it needs
                size,
                content_type=ctype,
                metadata=self._user_meta(sha256, meta),
                part_size=self._part_size,
                num_parallel_uploads=self._parallel,
            )
        return self._written(key, size, sha256, ctype, meta)

    def _written(
        self, key: str, size: int, sha256: str, ctype: str, meta: Mapping[str, str]
    ) -> ObjectInfo:
        """Describe what we just wrote without another round trip (mtime: ask stat)."""
        return ObjectInfo(
            key=key,
            size=size,
            sha256=sha256,
            modified=None,
            content_type=ctype,
            metadata=dict(meta),
        )

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        payload = as_bytes(data)
        validate_key(key)
        return self._upload(
            key,
            io.BytesIO(payload),
            len(payload),
            hashlib.sha256(payload).hexdigest(),
            content_type=content_type,
            metadata=metadata,
            verify_source=False,
        )

    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Spool the stream (memory, then a temp file) so the digest is known up front.

        S3 metadata is fixed when an upload starts, and a stream that fails midway must not
        leave anything behind: spooling gives both at the cost of local temp space.
        """
        validate_key(key)
        validate_metadata(metadata)
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            digest = hashlib.sha256()
            size = 0
            for chunk in iter_stream(stream):
                spool.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            spool.seek(0)
            return self._upload(
                key,
                spool,
                size,
                digest.hexdigest(),
                content_type=content_type,
                metadata=metadata,
                verify_source=False,
            )

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Hash the file, then upload it (multipart above ``part_size``), re-hashing as sent."""
        validate_key(key)
        validate_metadata(metadata)
        try:
            sha256, size = sha256_file(path)
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise NotFound(f"local file {os.fspath(path)!r} can't be read: {exc}") from exc
        with fh:
            return self._upload(
                key,
                fh,
                size,
                sha256,
                content_type=content_type,
                metadata=metadata,
                verify_source=True,
            )

    def put_if_absent(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        payload = as_bytes(data)
        name = self._name(key)
        meta = validate_metadata(metadata)
        ctype = guess_content_type(key, content_type)
        sha256 = hashlib.sha256(payload).hexdigest()
        if self._conditional is not False:
            headers: DictType = {"Content-Type": ctype, "If-None-Match": "*"}
            for mkey, value in self._user_meta(sha256, meta).items():
                headers[_META_HEADER + mkey] = value
            with self._errors("put_if_absent", key):
                try:
                    # minio's public put_object can't send If-None-Match; its single-PUT
                    # primitive can (payloads here are records, far below the 5 GiB PUT cap).
                    self._client._put_object(self.bucket, name, payload, headers)
                except S3Error as exc:
                    if exc.code == "PreconditionFailed":
                        return False
                    if exc.code not in _UNSUPPORTED_CODES or self._conditional is True:
                        raise
                    with self._conditional_lock:
                        self._conditional = False  # server can't: fall back (racy) from now on
                else:
                    with self._conditional_lock:
                        self._conditional = True
                    return True
        if self.exists(key):
            return False
        self.put_bytes(key, payload, content_type=content_type, metadata=metadata)
        return True

    # ---- reads ------------------------------------------------------------------

    def _get(self, key: str) -> Any:
        name = self._name(key)
        with self._errors("get", key):
            return self._client.get_object(self.bucket, name)

    def _reader(self, key: str, response: Any) -> _VerifyingReader:
        length = response.headers.get("content-length")
        return _VerifyingReader(
            response,
            size=int(length) if length is not None else None,
            sha256=_user_metadata(response.headers).get(SHA256_METADATA_KEY),
            what=f"object {self.uri(key)} is corrupt",
            on_error=lambda exc: self._unreachable(exc, f"read of {key!r}"),
        )

    def get_bytes(self, key: str) -> bytes:
        with io.BufferedReader(self._reader(key, self._get(key)), CHUNK_SIZE) as fh:
            return fh.read()

    def open_stream(self, key: str) -> IO[bytes]:
        """Stream with digest check at EOF; connection errors mid-read raise ``Unavailable``."""
        return io.BufferedReader(self._reader(key, self._get(key)), CHUNK_SIZE)

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> ObjectInfo:
        response = self._get(key)
        headers = response.headers
        with io.BufferedReader(self._reader(key, response), CHUNK_SIZE) as fh:
            digest, size = atomic_write_stream(Path(dest_path), iter_stream(fh))
        meta = _user_metadata(headers)
        meta.pop(SHA256_METADATA_KEY, None)
        modified = headers.get("last-modified")
        return ObjectInfo(
            key=key,
            size=size,
            sha256=digest,
            modified=parsedate_to_datetime(modified) if modified else None,
            content_type=headers.get("content-type"),
            metadata=meta,
        )

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        with self._errors("stat", key):
            obj = self._client.stat_object(self.bucket, name)
        info = self._info_from_stat(key, obj)
        if info.sha256 is None:  # written by another tool: hash it (not cached, see module doc)
            digest = hashlib.sha256()
            for chunk in self.iter_chunks(key):
                digest.update(chunk)
            info = ObjectInfo(
                key=info.key,
                size=info.size,
                sha256=digest.hexdigest(),
                modified=info.modified,
                content_type=info.content_type,
                metadata=info.metadata,
            )
        return info

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
        return self._list(prefix, recursive, start_after, limit)

    def _list(
        self, prefix: str, recursive: bool, start_after: str | None, limit: int | None
    ) -> Iterator[ObjectInfo]:
        if limit == 0:
            return
        count = 0
        with self._errors("list", prefix or None):
            objects = self._client.list_objects(
                self.bucket,
                prefix=self.prefix + prefix,
                recursive=recursive,
                start_after=self.prefix + start_after if start_after else None,
            )
            for info in _merge_pages(self._info_from_listing(obj) for obj in objects):
                yield info
                count += 1
                if limit is not None and count >= limit:
                    return

    def _info_from_listing(self, obj: Any) -> ObjectInfo:
        key = self._key(obj.object_name or "")
        if obj.is_dir:
            return ObjectInfo(key=key, size=0, sha256=None, modified=None, is_prefix=True)
        return ObjectInfo(key=key, size=int(obj.size or 0), sha256=None, modified=obj.last_modified)

    # ---- deletes ----------------------------------------------------------------

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors("delete", key):
            self._client.remove_object(self.bucket, name)

    def delete_prefix(self, prefix: str) -> int:
        """Batch delete (up to 1000 keys per request) under the "directory" ``prefix``."""
        if prefix in ("", "/"):
            raise InvalidArgument.for_field("prefix", "refusing to delete the whole store")
        keys = [info.key for info in self.list(dir_prefix(prefix))]
        with self._errors("delete_prefix", prefix):
            errors = list(
                self._client.remove_objects(
                    self.bucket, (DeleteObject(self._name(k)) for k in keys)
                )
            )
        if errors:
            first = errors[0]
            raise Internal(
                f"delete_prefix {prefix!r}: {len(errors)} objects not deleted, "
                f"first {first.name}: {first.code} {first.message}"
            )
        return len(keys)

    # ---- misc -------------------------------------------------------------------

    def presign_get(self, key: str, expires_s: int = 3600) -> str | None:
        """SigV4 presigned GET; computed locally (no request), valid for ``expires_s``."""
        name = self._name(key)
        check_expires(expires_s)
        with self._errors("presign", key):
            return self._client.presigned_get_object(
                self.bucket, name, expires=timedelta(seconds=expires_s)
            )

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{validate_key(key) if key else ''}"

    def ping(self) -> None:
        with self._errors("ping"):
            found = self._client.bucket_exists(self.bucket)
        if not found:
            raise FailedPrecondition(f"bucket {self.bucket!r} does not exist at {self.endpoint}")


def _merge_pages(items: Iterator[ObjectInfo]) -> Iterator[ObjectInfo]:
    """Restore key order in a delimited listing.

    S3 (and minio-py) return each page as its sorted objects *then* its sorted common
    prefixes; pages themselves are in key order. An object arriving after a prefix starts
    a new page, so sorting page by page yields the global order in one page of memory.
    """
    page: list[ObjectInfo] = []
    seen_prefix = False
    for info in items:
        if not info.is_prefix and seen_prefix:
            yield from sorted(page, key=lambda i: i.key.encode())
            page, seen_prefix = [], False
        seen_prefix = seen_prefix or info.is_prefix
        page.append(info)
    yield from sorted(page, key=lambda i: i.key.encode())


def _parse_endpoint(endpoint: str, secure: bool | None) -> tuple[str, bool]:
    """``host:port`` or ``http(s)://host:port`` -> (host:port, secure); scheme wins if given."""
    if not endpoint:
        raise InvalidArgument.for_field(
            "endpoint", "an S3 store needs an endpoint (option or CLINISYNTH_STORE_ENDPOINT)"
        )
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidArgument.for_field("endpoint", f"{endpoint!r}: use http(s)://host:port")
        if parts.path.strip("/") or parts.query:
            raise InvalidArgument.for_field("endpoint", f"{endpoint!r}: no path allowed")
        return parts.netloc, parts.scheme == "https"
    if "/" in endpoint:
        raise InvalidArgument.for_field("endpoint", f"{endpoint!r}: use host:port")
    return endpoint, True if secure is None else secure


def _ca_bundle() -> str | None:
    """The CA file minio would use: ``SSL_CERT_FILE`` or certifi's bundle."""
    env = os.environ.get("SSL_CERT_FILE")
    if env:
        return env
    try:
        import certifi
    except ImportError:  # pragma: no cover
        return None
    return certifi.where()
