"""Feedback exports: write labels + de-identified images + a manifest; read one back in chunks.

The chunking of a download lives here, not in the servicer: :meth:`FeedbackExport.chunks`
yields each file of an export as bounded chunks with its SHA-256 on the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from clinisynth_server.cancel import NEVER, CancelToken
from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.feedback import FeedbackRecord, FeedbackStore
from clinisynth_server.reward.scoring import Condition
from clinisynth_server.store.base import (
    ArtifactStore,
    dir_prefix,
    encode_json,
    outside_service_namespaces,
    readable_key,
)
from clinisynth_server.tenancy import (
    TENANT_FIELD,
    Viewer,
    owner_metadata,
    refuse_foreign_prefix,
    sees_object,
)

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "export.json"
CHUNK = 1024 * 1024
_AGGREGATES = ("all", "majority")


@dataclass(frozen=True)
class ExportResult:
    prefix: str
    judgements: int
    images: int
    labels_key: str
    labels_sha256: str
    labels_size: int
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportChunk:
    """One piece of one file of an export; ``sha256`` is set on the file's last chunk."""

    path: str
    offset: int
    data: bytes
    last: bool = False
    sha256: str = ""


class FeedbackExport:
    def __init__(
        self, store: ArtifactStore, feedback: FeedbackStore, *, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.feedback = feedback
        self.clock = clock

    def export(
        self,
        *,
        prefix: str = "",
        condition: Condition | None = None,
        aggregate: str = "",
        tenant: str = "",
        admin: bool = False,
    ) -> ExportResult:
        """Write ``<prefix>/labels.jsonl`` + ``images/`` + ``export.json`` .

        The export holds ``tenant``'s judgements (``admin``: every tenant's) and belongs to
        ``tenant``: its manifest says so and every file it writes carries it.
        """
        aggregate = aggregate or "all"
        errors = ValidationErrors()
        if aggregate not in _AGGREGATES:
            errors.add("aggregate", f"one of {_AGGREGATES}, got {aggregate!r}")
        if prefix:
            try:
                outside_service_namespaces(prefix, "prefix")
            except InvalidArgument as exc:
                errors.violations.extend(exc.violations)
        errors.raise_if_any()
        base = (
            dir_prefix(prefix)
            if prefix
            else time.strftime("exports/feedback/%Y%m%dT%H%M%S/", time.gmtime(self.clock()))
        )
        refuse_foreign_prefix(self.store, base + EXPORT_MANIFEST, tenant, "prefix")
        viewer = Viewer(tenant, admin)
        owner = owner_metadata(tenant)
        self.feedback.refresh()
        records = [
            r
            for r in self.feedback.records()
            if (condition is None or r.condition == condition) and viewer.sees(r.tenant)
        ]
        rows: list[dict[str, object]] = []
        images: dict[str, str] = {}  # store key → relative path in the export
        for r in records:
            rel = "images/" + r.image_sha256 + _suffix(r.image_key)
            images[r.image_key] = rel
        if aggregate == "all":
            for r in records:
                rows.append(
                    {
                        "image": images[r.image_key],
                        "condition": r.condition.to_json(),
                        "plausible": r.plausible,
                        "rater_id": r.rater_id,
                        "criteria": r.criteria,
                        "feedback_id": r.id,
                        "generator": r.generator,
                        "item_id": r.item_id,
                        "comment": r.comment,
                        "time_spent_ms": r.time_spent_ms,
                        "created": r.created,
                    }
                )
        else:
            groups: dict[str, list[FeedbackRecord]] = {}
            for r in records:
                groups.setdefault(f"{r.condition.key}\0{r.image_sha256}", []).append(r)
            for group in groups.values():
                yes = sum(r.plausible for r in group)
                if yes * 2 == len(group):
                    continue  # a tie carries no label
                first = group[0]
                rows.append(
                    {
                        "image": images[first.image_key],
                        "condition": first.condition.to_json(),
                        "plausible": yes * 2 > len(group),
                        "rater_id": "majority",
                        "raters": sorted({r.rater_id for r in group}),
                        "votes": {"plausible": yes, "implausible": len(group) - yes},
                        "criteria": _majority_criteria(group),
                        "feedback_id": ",".join(r.id for r in group),
                        "generator": first.generator,
                        "item_id": first.item_id,
                    }
                )
        used = {str(row["image"]) for row in rows}
        files = []
        for key, rel in sorted(images.items(), key=lambda kv: kv[1]):
            if rel in used and rel not in files:
                try:  # exports leave de-identified, whatever the store holds
                    data = imgs.deidentified_copy(self.store.get_bytes(key), field=key)
                except InvalidArgument as exc:
                    log.warning("export %s: image %s left out: %s", base, key, exc.message)
                    continue
                self.store.put_bytes(base + rel, data, metadata=owner)
                files.append(rel)
        rows = [row for row in rows if str(row["image"]) in files]
        labels = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        info = self.store.put_bytes(
            base + "labels.jsonl", labels, content_type="application/x-ndjson", metadata=owner
        )
        listed = ["labels.jsonl", *files]
        manifest = {
            "kind": "clinisynth-feedback-export",
            "format_version": 1,
            "aggregate": aggregate,
            "condition": condition.to_json() if condition is not None else None,
            "judgements": len(records),
            "rows": len(rows),
            "files": listed,
            "created": self.clock(),
            TENANT_FIELD: tenant,
        }
        self.store.put_bytes(base + EXPORT_MANIFEST, encode_json(manifest), metadata=owner)
        return ExportResult(
            base,
            len(records),
            len(files),
            base + "labels.jsonl",
            info.sha256 or "",
            info.size,
            [*listed, EXPORT_MANIFEST],
        )

    def export_files(self, prefix: str, viewer: Viewer | None = None) -> list[str]:
        """Keys of an export written by :meth:`export` (refuses any other prefix).

        Another tenant's export than ``viewer``'s is answered as a missing one.

        The prefix is caller-chosen and a manifest can be uploaded by a caller, so both the
        prefix and every file it lists must stay where exports are written: outside the
        service namespaces (checked before any store call) and under the prefix.
        """
        if not prefix:
            raise InvalidArgument.for_field("prefix", "required")
        base = dir_prefix(outside_service_namespaces(prefix, "prefix"), "prefix")
        key = base + EXPORT_MANIFEST
        visible = self.store.exists(key) if viewer is None else sees_object(self.store, key, viewer)
        if not visible:
            raise InvalidArgument.for_field("prefix", f"no feedback export at {base!r}")
        manifest = self.store.get_json(key)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, list) or manifest.get("kind") != "clinisynth-feedback-export":
            raise InvalidArgument.for_field("prefix", f"{base!r} is not a feedback export")
        keys = []
        for name in [*files, EXPORT_MANIFEST]:
            if not isinstance(name, str):
                raise InvalidArgument.for_field("prefix", f"{base!r} is not a feedback export")
            try:
                keys.append(readable_key(base + name, "prefix"))
            except InvalidArgument as exc:
                raise InvalidArgument.for_field(
                    "prefix", f"{base!r}: the export lists a file outside it ({name!r})"
                ) from exc
        return keys

    def chunks(
        self,
        prefix: str,
        *,
        chunk_size: int = CHUNK,
        cancel: CancelToken = NEVER,
        viewer: Viewer | None = None,
    ) -> Iterator[ExportChunk]:
        """Every file of the export at ``prefix``, in chunks of at most ``chunk_size`` bytes."""
        keys = self.export_files(prefix, viewer)
        base = keys[-1][: -len(EXPORT_MANIFEST)]
        for key in keys:
            digest = hashlib.sha256()
            offset = 0
            pending: bytes | None = None
            for chunk in self.store.iter_chunks(key, chunk_size):
                cancel.check()
                if pending is not None:
                    yield ExportChunk(key[len(base) :], offset - len(pending), pending)
                digest.update(chunk)
                offset += len(chunk)
                pending = chunk
            pending = pending or b""
            yield ExportChunk(
                key[len(base) :], offset - len(pending), pending, True, digest.hexdigest()
            )


def _suffix(key: str) -> str:
    dot = key.rfind(".")
    return key[dot:] if dot > key.rfind("/") else ".png"


def _majority_criteria(group: Sequence[FeedbackRecord]) -> dict[str, bool]:
    votes: dict[str, list[bool]] = {}
    for r in group:
        for name, ok in r.criteria.items():
            votes.setdefault(name, []).append(ok)
    return {n: sum(v) * 2 > len(v) for n, v in votes.items() if sum(v) * 2 != len(v)}
