"""The model catalog: what each served model *is* (kind, classes, size, Triton components).

Triton knows tensors; the services need meaning. Each model version has one JSON record in the
artifact store (``catalog/<name>/<version:06d>.json``, written once) naming the Triton models that
serve its parts (``components``: role → Triton model name and version) plus what sampling needs
(scheduler config, tokenizer files). Every service reads the catalog per request (with a short
cache), so a version promoted by the finetune service is picked up without a restart.

Records stay immutable; what changes about a version lives beside it: a retirement marker
(``catalog/<name>/retired/<version:06d>.json``, written once) takes a version out of service and
out of listings while its record stays readable for provenance, and aliases
(``catalog/<name>/aliases/<alias>.json``, movable) name a version wherever a version is accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clinisynth_server.errors import ClinisynthError, FailedPrecondition, InvalidArgument, NotFound
from clinisynth_server.methods.schedulers import SAMPLERS
from clinisynth_server.store.base import ArtifactStore

if TYPE_CHECKING:
    from clinisynth_server.runtime.metrics import ServiceMetrics
    from clinisynth_server.tenancy import Viewer

log = logging.getLogger(__name__)
PREFIX = "catalog/"
_RECORD_KEY = re.compile(r"catalog/([^/]+)/(\d{6})\.json")
_RETIRED_KEY = re.compile(r"catalog/([^/]+)/retired/(\d{6})\.json")
_ALIAS_KEY = re.compile(r"catalog/([^/]+)/aliases/([^/]+)\.json")
#: An alias is a name, never a number (numbers are versions).
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
KINDS = ("text_to_image", "class_conditional", "unconditional", "reward", "classifier")


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: int
    kind: str
    # role → Triton model name ("denoiser", "text_encoder", "vae_decode", "scorer", ...).
    components: dict[str, str]
    # role → Triton model version serving this catalog version.
    component_versions: dict[str, int]
    classes: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    channels: int = 1
    digest: str = ""
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    default_sampler: str = "ddim"
    default_steps: int = 25
    default_guidance_scale: float = 1.0
    max_images: int = 16
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    # Scheduler config (diffusers scheduler_config.json contents).
    scheduler: dict[str, Any] = field(default_factory=dict)
    # Model-specific facts: latent_channels, vae_scale_factor, scaling_factor, tokenizer_prefix,
    # max_length, size_multiple, null_class, ...
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def parse(cls, data: object) -> ModelRecord:
        """A record from stored JSON, every field type-checked; ``ValueError`` says what is wrong.

        Records are read on every request path, so a malformed one must be caught here, once,
        and not as a ``TypeError`` deep inside a servicer.
        """
        check_fields(cls, data)
        assert isinstance(data, dict)
        if data["kind"] not in KINDS:
            raise ValueError(f"unknown kind {data['kind']!r}")
        return cls.from_json(data)


def check_fields(cls: type, data: object) -> None:
    """``ValueError`` unless ``data`` is a JSON object whose values fit dataclass ``cls``.

    Shared by every stored record type (catalog, finetune jobs, events, checkpoints): a record
    another process wrote may be truncated or tampered with, and must be refused as a whole.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing field {f.name!r}")
            continue
        if not _type_ok(data[f.name], hints[f.name]):
            raise ValueError(f"field {f.name!r} is not {hints[f.name]}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_ok(value: object, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (str, int, float, list, dict, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, hint)


class CorruptRecords:
    """Stored records that cannot be read: logged once by key (never content) and counted.

    A listing skips them and serves the rest; one bad object must never take a listing down
    for every caller.
    """

    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def report(self, namespace: str, key: str, why: str) -> None:
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        log.warning("skipping corrupt %s record %s: %s", namespace, key, why)
        counter = getattr(self.metrics, "store_corrupt_records", None)
        if counter is not None and self.metrics is not None:
            counter.labels(self.metrics.service, namespace).inc()


def record_key(name: str, version: int) -> str:
    return f"{PREFIX}{name}/{version:06d}.json"


def retired_key(name: str, version: int) -> str:
    return f"{PREFIX}{name}/retired/{version:06d}.json"


def alias_key(name: str, alias: str) -> str:
    return f"{PREFIX}{name}/aliases/{alias}.json"


class Catalog:
    """Reads and writes model records; ``ttl_s`` bounds how stale a cached listing may be."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        ttl_s: float = 2.0,
        metrics: ServiceMetrics | None = None,
        corrupt: CorruptRecords | None = None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.corrupt = corrupt or CorruptRecords(metrics)
        self._lock = threading.Lock()
        self._cache: tuple[float, list[ModelRecord]] | None = None
        # (name, version) of records skipped as corrupt in the last listing.
        self._bad: set[tuple[str, int]] = set()
        # Every readable record, retired ones included; retired (name, version); aliases.
        self._everything: list[ModelRecord] = []
        self._retired: set[tuple[str, int]] = set()
        self._aliases: dict[str, dict[str, int]] = {}

    def put(self, record: ModelRecord) -> ModelRecord:
        if record.kind not in KINDS:
            raise InvalidArgument.for_field("kind", f"must be one of {KINDS}, not {record.kind!r}")
        if not record.created:
            record = dataclasses.replace(record, created=time.time())
        if not self.store.put_if_absent(record_key(record.name, record.version), _encode(record)):
            raise InvalidArgument.for_field(
                "version", f"{record.ref} is already registered (versions are immutable)"
            )
        self.invalidate()
        return record

    def invalidate(self) -> None:
        with self._lock:
            self._cache = None

    def seen_by(self, viewer: Viewer | None) -> Catalog:
        """This catalog as ``viewer`` sees it: another tenant's private models do not exist.

        Every read (``get``, ``list``, ``versions``, aliases) of the returned view skips them,
        so resolving one answers exactly as for an unknown model. ``None``: everything.
        """
        if viewer is None or viewer.admin:
            return self
        return TenantView(self, viewer)

    def all(self) -> list[ModelRecord]:
        """Every served (not retired) record, sorted by (name, version)."""
        with self._lock:
            if self._cache is not None and time.monotonic() - self._cache[0] < self.ttl_s:
                return self._cache[1]
        records: list[ModelRecord] = []
        bad: set[tuple[str, int]] = set()
        retired: set[tuple[str, int]] = set()
        aliases: dict[str, dict[str, int]] = {}
        for info in self.store.list(PREFIX):
            match = _RECORD_KEY.fullmatch(info.key)
            if not match:
                self._side_record(info.key, retired, aliases)
                continue
            name, version = match.group(1), int(match.group(2))
            try:
                record = ModelRecord.parse(self.store.get_json(info.key))
                if (record.name, record.version) != (name, version):
                    raise ValueError(f"names {record.ref}, not {name}@{version}")
            except NotFound:
                continue  # deleted between the listing and the read
            except (ClinisynthError, ValueError, TypeError) as exc:
                self.corrupt.report("catalog", info.key, getattr(exc, "message", str(exc)))
                bad.add((name, version))
                continue
            records.append(record)
        records.sort(key=lambda r: (r.name, r.version))
        served = [r for r in records if (r.name, r.version) not in retired]
        with self._lock:
            self._cache = (time.monotonic(), served)
            self._bad = bad
            self._everything, self._retired, self._aliases = records, retired, aliases
        return served

    def _side_record(
        self, key: str, retired: set[tuple[str, int]], aliases: dict[str, dict[str, int]]
    ) -> None:
        """Collect a retirement marker or an alias seen while listing (unreadable ones skipped)."""
        if match := _RETIRED_KEY.fullmatch(key):
            retired.add((match.group(1), int(match.group(2))))
            return
        if match := _ALIAS_KEY.fullmatch(key):
            try:
                data = self.store.get_json(key)
                version = data.get("version") if isinstance(data, dict) else None
                if not isinstance(version, int) or isinstance(version, bool):
                    raise ValueError("no integer 'version'")
            except NotFound:
                return
            except (ClinisynthError, ValueError, TypeError) as exc:
                self.corrupt.report("catalog", key, getattr(exc, "message", str(exc)))
                return
            aliases.setdefault(match.group(1), {})[match.group(2)] = version

    def everything(self) -> list[ModelRecord]:
        """Every readable record, retired ones included (provenance of old images)."""
        self.all()
        with self._lock:
            return list(self._everything)

    def is_retired(self, name: str, version: int) -> bool:
        self.all()
        with self._lock:
            return (name, version) in self._retired

    def aliases(self, name: str) -> dict[str, int]:
        """Alias → version for model ``name``."""
        self.all()
        with self._lock:
            return dict(self._aliases.get(name, {}))

    def retire(self, record: ModelRecord) -> None:
        """Mark ``record`` retired (idempotent); its record stays for provenance."""
        self.store.put_if_absent(
            retired_key(record.name, record.version),
            _encode_json({"name": record.name, "version": record.version, "time": time.time()}),
        )
        self.invalidate()

    def set_alias(self, record: ModelRecord, alias: str) -> None:
        """Point ``alias`` of ``record.name`` at ``record.version`` (moving it if set)."""
        if not ALIAS_RE.match(alias):
            raise InvalidArgument.for_field(
                "alias",
                "a name: a letter, then letters, digits, '_', '-', '.' (at most 64); "
                f"numbers are versions; got {alias!r}",
            )
        if self.is_retired(record.name, record.version):
            raise FailedPrecondition(
                f"{record.ref} is retired; an alias must point at a served version",
                reason="MODEL_RETIRED",
            )
        self.store.put_bytes(
            alias_key(record.name, alias),
            _encode_json({"version": record.version, "time": time.time()}),
        )
        self.invalidate()

    def versions(self, name: str) -> list[ModelRecord]:
        return [r for r in self.all() if r.name == name]

    def corrupt_versions(self, name: str) -> list[int]:
        """Versions of ``name`` whose records are stored but unreadable (skipped by listings)."""
        self.all()
        with self._lock:
            return sorted(v for n, v in self._bad if n == name)

    def next_version(self, name: str) -> int:
        """Never reuses a number: retired and unreadable versions count."""
        versions = [r.version for r in self.everything() if r.name == name]
        versions += self.corrupt_versions(name)
        return max(versions, default=0) + 1

    def get(
        self,
        name: str,
        version: str | int = "",
        *,
        field_name: str = "model",
        include_retired: bool = False,
    ) -> ModelRecord:
        """``name`` at ``version`` ("" = latest served; a number or an alias).

        The one resolver of model references: bad refs are INVALID_ARGUMENT on the field; a
        retired version is FAILED_PRECONDITION (``MODEL_RETIRED``) unless ``include_retired``.
        """
        if not name:
            raise InvalidArgument.for_field(f"{field_name}.name", "is required")
        if isinstance(version, str) and ALIAS_RE.match(version):
            version = self._resolve_alias(name, version, field_name)
        if version not in ("", 0, None):
            retired = self._retired_record(name, version)
            if retired is not None:
                if include_retired:
                    return retired
                raise FailedPrecondition(
                    f"{retired.ref} is retired: it is no longer served (its record stays for "
                    "provenance); use another version",
                    reason="MODEL_RETIRED",
                    metadata={"model": retired.ref},
                )
        versions = self.versions(name)
        corrupt = self.corrupt_versions(name)
        if not versions and version in ("", 0, None):
            gone = [r for r in self.everything() if r.name == name]
            if gone:
                if include_retired:
                    return gone[-1]
                raise FailedPrecondition(
                    f"every version of {name!r} is retired; nothing of it is served",
                    reason="MODEL_RETIRED",
                    metadata={"model": gone[-1].ref},
                )
        if not versions and corrupt:
            raise FailedPrecondition(
                f"model {name!r} cannot be served: its catalog record"
                f"{'s' if len(corrupt) > 1 else ''} (version {', '.join(map(str, corrupt))}) "
                "cannot be read; an operator must repair or remove it",
                reason="CORRUPT_CATALOG_RECORD",
            )
        if not versions:
            known = sorted({r.name for r in self.all()})
            raise InvalidArgument.for_field(
                f"{field_name}.name", f"unknown model {name!r}; known: {', '.join(known) or 'none'}"
            )
        if version in ("", 0, None):
            return versions[-1]
        try:
            wanted = int(version)
        except ValueError as exc:
            raise InvalidArgument.for_field(
                f"{field_name}.version", f"must be a version number, not {version!r}"
            ) from exc
        for record in versions:
            if record.version == wanted:
                return record
        if wanted in corrupt:
            raise FailedPrecondition(
                f"{name}@{wanted} cannot be served: its catalog record cannot be read; "
                f"readable versions: {[r.version for r in versions]}",
                reason="CORRUPT_CATALOG_RECORD",
            )
        raise InvalidArgument.for_field(
            f"{field_name}.version",
            f"{name} has no version {wanted}; versions: {[r.version for r in versions]}",
        )

    def list(
        self, *, kind: str = "", name: str = "", all_versions: bool = False
    ) -> list[ModelRecord]:
        records = [
            r for r in self.all() if (not kind or r.kind == kind) and (not name or r.name == name)
        ]
        if all_versions:
            return records
        latest: dict[str, ModelRecord] = {}
        for record in records:
            latest[record.name] = record
        return list(latest.values())

    def is_latest(self, record: ModelRecord) -> bool:
        versions = self.versions(record.name)
        return bool(versions) and versions[-1].version == record.version

    def _resolve_alias(self, name: str, alias: str, field_name: str) -> int:
        known = self.aliases(name)
        if alias not in known:
            raise InvalidArgument.for_field(
                f"{field_name}.version",
                f"{name} has no version or alias {alias!r}; aliases: "
                f"{', '.join(sorted(known)) or 'none'}",
            )
        return known[alias]

    def _retired_record(self, name: str, version: str | int) -> ModelRecord | None:
        try:
            wanted = int(version)
        except ValueError:
            return None
        if not self.is_retired(name, wanted):
            return None
        return next((r for r in self.everything() if (r.name, r.version) == (name, wanted)), None)


class TenantView(Catalog):
    """A :class:`Catalog` filtered by :meth:`~clinisynth_server.tenancy.Viewer.sees_model`.

    It shares the underlying catalog's cache and writes; only what reads return differs.
    """

    def __init__(self, base: Catalog, viewer: Viewer) -> None:
        self.base = base
        self.viewer = viewer
        self.store = base.store
        self.ttl_s = base.ttl_s
        self.corrupt = base.corrupt

    def seen_by(self, viewer: Viewer | None) -> Catalog:
        return self.base.seen_by(viewer)

    def put(self, record: ModelRecord) -> ModelRecord:
        return self.base.put(record)

    def invalidate(self) -> None:
        self.base.invalidate()

    def all(self) -> list[ModelRecord]:
        return [r for r in self.base.all() if self.viewer.sees_model(r)]

    def everything(self) -> list[ModelRecord]:
        return [r for r in self.base.everything() if self.viewer.sees_model(r)]

    def _names(self) -> set[str]:
        return {r.name for r in self.everything()}

    def is_retired(self, name: str, version: int) -> bool:
        return name in self._names() and self.base.is_retired(name, version)

    def aliases(self, name: str) -> dict[str, int]:
        return self.base.aliases(name) if name in self._names() else {}

    def corrupt_versions(self, name: str) -> list[int]:
        hidden = name not in self._names() and any(r.name == name for r in self.base.everything())
        return [] if hidden else self.base.corrupt_versions(name)

    def next_version(self, name: str) -> int:
        return self.base.next_version(name)  # numbers are never reused, whoever sees them

    def retire(self, record: ModelRecord) -> None:
        self.base.retire(record)

    def set_alias(self, record: ModelRecord, alias: str) -> None:
        self.base.set_alias(record, alias)


def _encode(record: ModelRecord) -> bytes:
    return _encode_json(record.to_json())


def _encode_json(data: dict[str, Any]) -> bytes:
    import json

    return json.dumps(data, indent=2, sort_keys=True).encode()


def require_found(record: ModelRecord | None, what: str) -> ModelRecord:
    if record is None:
        raise NotFound(f"{what} not found")
    return record
