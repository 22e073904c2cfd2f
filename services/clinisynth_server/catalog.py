"""The model catalog: what each served model *is* (kind, classes, size, Triton components).

Triton knows tensors; the services need meaning. Each model version has one JSON record in the
artifact store (``catalog/<name>/<version:06d>.json``, written once) naming the Triton models that
serve its parts (``components``: role → Triton model name and version) plus what sampling needs
(scheduler config, tokenizer files). Every service reads the catalog per request (with a short
cache), so a version promoted by the finetune service is picked up without a restart.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.errors import InvalidArgument, NotFound
from clinisynth_server.store.base import ArtifactStore

PREFIX = "catalog/"
_RECORD_KEY = re.compile(r"catalog/[^/]+/\d{6}\.json")
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
    samplers: list[str] = field(default_factory=lambda: ["ddim", "dpmsolver++", "euler", "ddpm"])
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


def record_key(name: str, version: int) -> str:
    return f"{PREFIX}{name}/{version:06d}.json"


class Catalog:
    """Reads and writes model records; ``ttl_s`` bounds how stale a cached listing may be."""

    def __init__(self, store: ArtifactStore, *, ttl_s: float = 2.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: tuple[float, list[ModelRecord]] | None = None

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

    def all(self) -> list[ModelRecord]:
        with self._lock:
            if self._cache is not None and time.monotonic() - self._cache[0] < self.ttl_s:
                return self._cache[1]
        records = [
            ModelRecord.from_json(self.store.get_json(info.key))
            for info in self.store.list(PREFIX)
            if _RECORD_KEY.fullmatch(info.key)
        ]
        records.sort(key=lambda r: (r.name, r.version))
        with self._lock:
            self._cache = (time.monotonic(), records)
        return records

    def versions(self, name: str) -> list[ModelRecord]:
        return [r for r in self.all() if r.name == name]

    def next_version(self, name: str) -> int:
        versions = [r.version for r in self.versions(name)]
        return max(versions, default=0) + 1

    def get(
        self, name: str, version: str | int = "", *, field_name: str = "model"
    ) -> ModelRecord:
        """``name`` at ``version`` ("" = latest); bad refs are INVALID_ARGUMENT on the field."""
        if not name:
            raise InvalidArgument.for_field(f"{field_name}.name", "is required")
        versions = self.versions(name)
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
        return self.versions(record.name)[-1].version == record.version


def _encode(record: ModelRecord) -> bytes:
    import json

    return json.dumps(record.to_json(), indent=2, sort_keys=True).encode()


def require_found(record: ModelRecord | None, what: str) -> ModelRecord:
    if record is None:
        raise NotFound(f"{what} not found")
    return record
