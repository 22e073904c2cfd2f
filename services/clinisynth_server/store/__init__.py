"""Artifact store: one interface (:class:`ArtifactStore`), a local-folder and an S3 backend.

``open_store(url)`` picks the backend from the URL, so a service's config is one string:

* ``/abs/path``, ``relative/path`` or ``file:///abs/path`` -> :class:`LocalStore`
* ``s3://bucket`` or ``s3://bucket/base/prefix`` -> :class:`S3Store`; endpoint and
  credentials from keyword options, else ``CLINISYNTH_STORE_ENDPOINT``,
  ``CLINISYNTH_STORE_ACCESS_KEY``, ``CLINISYNTH_STORE_SECRET_KEY``,
  ``CLINISYNTH_STORE_SESSION_TOKEN``, ``CLINISYNTH_STORE_REGION``, ``CLINISYNTH_STORE_SECURE``;
  how fast an unreachable endpoint fails from ``CLINISYNTH_STORE_CONNECT_TIMEOUT_S``,
  ``CLINISYNTH_STORE_READ_TIMEOUT_S`` and ``CLINISYNTH_STORE_RETRIES`` (see :mod:`.s3`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.store.base import (
    RESERVED_PREFIX,
    ArtifactStore,
    ObjectInfo,
    validate_key,
    validate_prefix,
)
from clinisynth_server.store.local import LocalStore

__all__ = [
    "RESERVED_PREFIX",
    "ArtifactStore",
    "LocalStore",
    "ObjectInfo",
    "open_store",
    "validate_key",
    "validate_prefix",
]

_ENV_PREFIX = "CLINISYNTH_STORE_"
_S3_OPTIONS = {
    "endpoint",
    "access_key",
    "secret_key",
    "session_token",
    "region",
    "secure",
    "cert_check",
    "create_bucket",
    "connect_timeout_s",
    "read_timeout_s",
    "retries",
    "part_size",
    "parallel_uploads",
    "max_connections",
    "conditional_writes",
}
_LOCAL_OPTIONS = {"create", "lock_timeout_s"}
_ENV_OPTIONS = (
    "endpoint",
    "access_key",
    "secret_key",
    "session_token",
    "region",
    "secure",
    "connect_timeout_s",
    "read_timeout_s",
    "retries",
)
NUMBER_OPTIONS = {"connect_timeout_s": float, "read_timeout_s": float, "retries": int}


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument.for_field(name, f"{value!r} is not a boolean (true/false)")


def parse_number(name: str, value: str, kind: type[float] | type[int]) -> float | int:
    try:
        number = kind(value.strip())
    except ValueError:
        number = -1
    if not number >= 0 or (kind is float and not 0 < number < float("inf")):
        what = "a whole number >= 0" if kind is int else "a number of seconds > 0"
        raise InvalidArgument.for_field(name, f"{what}, got {value!r}")
    return number


def open_store(url: str, *, env: Mapping[str, str] | None = None, **options: Any) -> ArtifactStore:
    """Open the store named by ``url`` (see the module docstring).

    Options not given fall back to ``CLINISYNTH_STORE_*`` in ``env`` (default
    ``os.environ``). Options of the other backend are ignored, so one config can carry
    both; unknown option names raise ``InvalidArgument``. S3 options: endpoint,
    access_key, secret_key, session_token, region, secure, cert_check, create_bucket,
    connect_timeout_s, read_timeout_s, retries, part_size, parallel_uploads,
    max_connections, conditional_writes. Local: create (default True), lock_timeout_s
    (``CLINISYNTH_STORE_LOCK_TIMEOUT_S``, default 30).
    """
    unknown = set(options) - _S3_OPTIONS - _LOCAL_OPTIONS
    if unknown:
        known = sorted(_S3_OPTIONS | _LOCAL_OPTIONS)
        raise InvalidArgument.for_field(sorted(unknown)[0], f"unknown store option ({known=})")
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument.for_field("url", "store URL must be a non-empty string")
    url = url.strip()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        return _open_s3(parts.netloc, unquote(parts.path), env, options)
    local = {k: v for k, v in options.items() if k in _LOCAL_OPTIONS}
    lock_env = (os.environ if env is None else env).get(_ENV_PREFIX + "LOCK_TIMEOUT_S", "")
    if local.get("lock_timeout_s") is None and lock_env:  # a frozen writer's bound (local.py)
        try:
            local["lock_timeout_s"] = float(lock_env)
        except ValueError:
            raise InvalidArgument.for_field(
                _ENV_PREFIX + "LOCK_TIMEOUT_S", f"a number of seconds, got {lock_env!r}"
            ) from None
    if local.get("lock_timeout_s") is None:
        local.pop("lock_timeout_s", None)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgument.for_field("url", f"{url!r}: file URLs must be file:///abs/path")
        return LocalStore(unquote(parts.path), **local)
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive
        raise InvalidArgument.for_field("url", f"{url!r}: unsupported scheme (file://, s3://)")
    return LocalStore(url, **local)


def _open_s3(
    bucket: str, path: str, env: Mapping[str, str] | None, options: dict[str, Any]
) -> ArtifactStore:
    from clinisynth_server.store.s3 import S3Store  # minio only needed for S3

    if not bucket:
        raise InvalidArgument.for_field("url", "s3 URLs look like s3://bucket[/prefix]")
    prefix = path.strip("/")
    if prefix:
        validate_key(prefix, "url")
    source = os.environ if env is None else env
    kwargs = {k: v for k, v in options.items() if k in _S3_OPTIONS}
    for name in _ENV_OPTIONS:
        env_name = _ENV_PREFIX + name.upper()
        if kwargs.get(name) is None and source.get(env_name):
            value: Any = source[env_name]
            if name == "secure":
                value = _parse_bool(env_name, value)
            elif name in NUMBER_OPTIONS:
                value = parse_number(env_name, value, NUMBER_OPTIONS[name])
            kwargs[name] = value
    kwargs.setdefault("endpoint", "")
    for name in [k for k, v in kwargs.items() if v is None]:
        del kwargs[name]
    return S3Store(bucket, prefix, **kwargs)
