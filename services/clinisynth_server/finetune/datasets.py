"""Data-set layouts the job kinds read, their validation, and loading into arrays.

Layouts (store prefixes; the same files in a local folder for ``clinisynth data upload``):

- ``image_folder`` — torchvision's ImageFolder: ``<prefix>/<class>/<file>``; the class is the
  first folder under the prefix (deeper sub-folders belong to it).
- ``image_text_manifest`` — ``<prefix>/manifest.jsonl``, one JSON object a line with ``image``
  (path relative to the prefix, e.g. ``images/0001.png``) and the text under ``prompt`` (or
  ``text`` / ``caption``); images usually under ``<prefix>/images/``.
- ``feedback_export`` — what the reward service exports: ``<prefix>/labels.jsonl``, one expert
  judgement a line (``image`` relative path, ``condition`` {``class_name`` | ``prompt``},
  ``plausible`` bool, ``rater_id``, ``criteria``, ``feedback_id``, ``generator``) + ``images/``.

Images: PNG, JPEG or DICOM (``.dcm``). DICOM is converted with the windowing of
:mod:`clinisynth_server.imaging.decode`: modality LUT (e.g. Hounsfield units), then the file's
first WindowCenter / WindowWidth (VOI LUT function honoured), else min–max; MONOCHROME1 is
inverted so 1.0 is white. Every image is decoded during validation, so an unreadable file fails
the job before training starts. Files and folders starting with ``.`` are ignored.

A sharded set (``index.json`` + ``shards/*.tar``, see :mod:`clinisynth_server.finetune.shards`)
reads like the folder it was made from: :class:`StoreSource` finds its index and serves every
member through a bounded local shard cache. Creating a job checks its index only (image shapes
come from it); ``ValidateDataset`` decodes every member, one shard at a time; training streams it
(:mod:`clinisynth_server.finetune.shards_loader`) where the kind supports that.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinisynth_server.errors import ClinisynthError, FieldViolation, InvalidArgument
from clinisynth_server.finetune import shards
from clinisynth_server.finetune.layouts import (
    IMAGE_FIELDS,
    TEXT_FIELDS,
    field_value,
)
from clinisynth_server.finetune.layouts import LABELS_NAME as LABELS
from clinisynth_server.finetune.layouts import MANIFEST_NAME as MANIFEST
from clinisynth_server.store.base import ArtifactStore, dir_prefix

LAYOUTS = ("image_folder", "image_text_manifest", "feedback_export")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
#: A validation report names every problem (each unreadable file by path) up to these bounds,
#: which keep the reply far below gRPC's message limit; past them it counts the rest.
MAX_PROBLEMS = 10_000
MAX_PROBLEM_BYTES = 1024 * 1024
#: A refusal (FieldViolations in the status trailer, bounded by gRPC's metadata size) names the
#: first ones only and points at `clinisynth data validate` for the full list.
MAX_VIOLATIONS = 20


@dataclass(frozen=True)
class Entry:
    """One training example: an image path relative to the prefix and its annotation."""

    path: str
    class_name: str = ""
    text: str = ""
    plausible: bool | None = None


@dataclass
class DatasetReport:
    prefix: str
    layout: str
    entries: list[Entry] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Shapes seen: (height, width, channels) → count.
    shapes: dict[tuple[int, int, int], int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.entries)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def finish(self) -> DatasetReport:
        kept, size = 0, 0
        for text in self.problems[:MAX_PROBLEMS]:
            size += len(text.encode()) + 8
            if size > MAX_PROBLEM_BYTES:
                break
            kept += 1
        if kept < len(self.problems):
            more = len(self.problems) - kept
            self.problems = [*self.problems[:kept], f"... and {more} more problems"]
        return self

    def violations(self, field_name: str) -> list[FieldViolation]:
        """The first problems as field violations, then a pointer to the full report."""
        out = [FieldViolation(field_name, p) for p in self.problems[:MAX_VIOLATIONS]]
        if len(self.problems) > MAX_VIOLATIONS:
            out.append(
                FieldViolation(
                    field_name,
                    f"... {len(self.problems) - MAX_VIOLATIONS} more: `clinisynth data validate` "
                    "lists every one",
                )
            )
        return out

    @property
    def channels(self) -> int:
        """3 when any image is colour, else 1."""
        return 3 if any(c == 3 for _, _, c in self.shapes) else 1

    @property
    def size(self) -> int:
        """The most common side length (images are resized to the job's size anyway)."""
        if not self.shapes:
            return 0
        (h, w, _), _n = max(self.shapes.items(), key=lambda kv: kv[1])
        return min(h, w)


# ---------------------------------------------------------------------------------------------
# sources: a store prefix or a local folder
# ---------------------------------------------------------------------------------------------


class Source:
    """Relative file names under a root, and their bytes."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError


class StoreSource(Source):
    """A store prefix; a sharded set under it is read through a :class:`ShardSource`."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store = store
        self.prefix = dir_prefix(prefix, "dataset")
        self._sharded: ShardSource | None = None
        self._looked = False

    @property
    def sharded(self) -> ShardSource | None:
        if not self._looked:
            self._looked = True
            if self.store.exists(self.prefix + shards.INDEX_NAME):
                self._sharded = ShardSource(self.store, self.prefix)
        return self._sharded

    def names(self) -> list[str]:
        if self.sharded is not None:
            return self.sharded.names()
        return [info.key[len(self.prefix) :] for info in self.store.list(self.prefix)]

    def read(self, name: str) -> bytes:
        if self.sharded is not None:
            return self.sharded.read(name)
        return self.store.get_bytes(self.prefix + name)


class ShardSource(Source):
    """A sharded set: the layout's plain files plus every shard member, by relative path.

    Members are read through a :class:`~clinisynth_server.finetune.shards.ShardCache` of at
    most ``cache_shards`` shards in ``cache_dir`` (a private temporary folder by default).
    """

    def __init__(
        self,
        store: ArtifactStore,
        prefix: str,
        cache_dir: str | pathlib.Path | None = None,
        *,
        cache_shards: int = 2,
    ) -> None:
        import tempfile

        self.store = store
        self.prefix = dir_prefix(prefix, "dataset")
        self.index = shards.parse_index(store.get_bytes(self.prefix + shards.INDEX_NAME))
        if cache_dir is None:  # removed with this object
            self._tmp = tempfile.TemporaryDirectory(prefix="clinisynth-shards-")
            cache_dir = self._tmp.name
        self.cache_dir = pathlib.Path(cache_dir)
        self.cache = shards.ShardCache(self.fetch, self.cache_dir / "main", max_shards=cache_shards)
        skip = (shards.INDEX_NAME, shards.SHARDS_DIR)
        self._plain = [
            name
            for name in (info.key[len(self.prefix) :] for info in store.list(self.prefix))
            if not name.startswith(skip)
        ]

    def fetch(self, name: str, dest: pathlib.Path) -> None:
        self.store.get_file(self.prefix + name, dest)

    def names(self) -> list[str]:
        return sorted([*self._plain, *self.index.where])

    def read(self, name: str) -> bytes:
        number = self.index.where.get(name)
        if number is None:
            return self.store.get_bytes(self.prefix + name)
        return self.cache.read(self.index.shards[number], name)

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """Member path → (height, width, channels) as the uploader read it from the header."""
        out = {}
        for shard in self.index.shards:
            for path, shape in zip(shard.paths, shard.shapes, strict=False):
                if shape is not None:
                    out[path] = shape
        return out


def sharded(source: Source) -> ShardSource | None:
    """The shard reader behind ``source``, if it is a sharded set."""
    if isinstance(source, ShardSource):
        return source
    if isinstance(source, StoreSource):
        return source.sharded
    return None


class FolderSource(Source):
    def __init__(self, root: str | pathlib.Path) -> None:
        self.root = pathlib.Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def _visible(name: str) -> bool:
    return not any(part.startswith(".") for part in name.split("/"))


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def decode(data: bytes, name: str) -> np.ndarray:
    """Bytes → float32 HxW or HxWx3 in [0, 1] (PNG / JPEG / DICOM with windowing)."""
    from clinisynth_server.imaging.decode import decode_image

    return decode_image(data, field=name)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def validate(
    source: Source,
    prefix: str,
    layout: str,
    *,
    decode_images: bool = True,
    decode_shards: bool = False,
) -> DatasetReport:
    """Read the layout's index, check every file exists and decodes; list every problem.

    A sharded set's members are decoded only with ``decode_shards`` (ValidateDataset, one
    shard at a time); otherwise their shapes come from its index, so creating a job on a large
    archive reads one small file, and unreadable members are the job's ``on_bad_image`` concern.
    """
    report = DatasetReport(prefix=prefix, layout=layout)
    if layout not in LAYOUTS:
        report.problem(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
        return report.finish()
    try:
        names = [n for n in source.names() if _visible(n)]
    except ClinisynthError as exc:
        report.problem(f"cannot list {prefix!r}: {exc.message}")
        return report.finish()

    if not names:
        report.problem(f"no files under {prefix!r} (empty or missing data set)")
        return report.finish()
    present = set(names)
    if layout == "image_folder":
        for name in names:
            if "/" not in name:
                if is_image(name):
                    report.problem(f"{name}: image outside a class folder (<class>/<file>)")
                continue
            if is_image(name):
                report.entries.append(Entry(name, class_name=name.split("/", 1)[0]))
    else:
        index = MANIFEST if layout == "image_text_manifest" else LABELS
        if index not in present:
            report.problem(f"{index} is missing (the {layout} layout needs it)")
            return report.finish()
        report.entries = list(_read_index(source, index, layout, present, report))
    if not report.entries and not report.problems:
        report.problem(f"no images in {prefix!r} ({', '.join(IMAGE_SUFFIXES)} files)")
    for entry in report.entries:
        if entry.class_name:
            report.per_class[entry.class_name] = report.per_class.get(entry.class_name, 0) + 1
    report.classes = sorted(report.per_class)
    reader = sharded(source)
    if decode_images and reader is not None and not decode_shards:
        decode_images = False
        known = reader.shapes()
        unknown = [e.path for e in report.entries if e.path not in known]
        known.update(_header_shapes(reader, unknown[:HEADER_SAMPLE]))
        for entry in report.entries:
            shape = known.get(entry.path)
            if shape is not None:
                report.shapes[shape] = report.shapes.get(shape, 0) + 1
    if decode_images:
        for path in sorted({e.path for e in report.entries}):
            try:
                arr = decode(source.read(path), path)
            except ClinisynthError as exc:
                report.problem(f"{path}: unreadable image ({exc.message})")
                continue
            except Exception as exc:
                report.problem(f"{path}: unreadable image ({exc})")
                continue
            shape = (arr.shape[0], arr.shape[1], 1 if arr.ndim == 2 else arr.shape[2])
            report.shapes[shape] = report.shapes.get(shape, 0) + 1
    return report.finish()


#: Images whose headers are read when a sharded set's index lacks their shapes (an uploader
#: without pydicom records none for DICOM): enough to find the common size, a shard or two read.
HEADER_SAMPLE = 32


def _header_shapes(source: Source, paths: list[str]) -> dict[str, tuple[int, int, int]]:
    from clinisynth_server.imaging.decode import inspect_image

    out = {}
    for path in paths:
        try:
            head = inspect_image(source.read(path), field=path)
        except ClinisynthError:
            continue  # training's on_bad_image decides about it
        out[path] = (head.height, head.width, 3 if head.samples >= 3 else 1)
    return out


def _read_index(
    source: Source, index: str, layout: str, present: set[str], report: DatasetReport
) -> Iterator[Entry]:
    try:
        text = source.read(index).decode("utf-8")
    except (UnicodeDecodeError, ClinisynthError) as exc:
        report.problem(f"{index}: unreadable ({exc})")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{index} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            report.problem(f"{where}: not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            report.problem(f"{where}: expected a JSON object")
            continue
        image = field_value(obj, IMAGE_FIELDS)
        if not isinstance(image, str) or not image:
            report.problem(f"{where}: 'image' (a relative path) is missing")
            continue
        if image not in present:
            report.problem(f"{where}: {image} does not exist under the prefix")
            continue
        if layout == "image_text_manifest":
            text_value = next((obj[f] for f in TEXT_FIELDS if isinstance(obj.get(f), str)), None)
            if not text_value or not text_value.strip():
                report.problem(f"{where}: no text ('prompt', 'text' or 'caption')")
                continue
            yield Entry(image, text=text_value.strip(), class_name=str(obj.get("class_name", "")))
        else:
            condition = obj.get("condition") or {}
            plausible = obj.get("plausible")
            if not isinstance(plausible, bool):
                report.problem(f"{where}: 'plausible' must be true or false")
                continue
            if not isinstance(condition, dict) or not (
                condition.get("class_name") or condition.get("prompt")
            ):
                report.problem(f"{where}: 'condition' needs class_name or prompt")
                continue
            yield Entry(
                image,
                class_name=str(condition.get("class_name") or ""),
                text=str(condition.get("prompt") or ""),
                plausible=plausible,
            )


def check_classes(
    report: DatasetReport, known: Iterable[str], what: str, field_name: str = "dataset"
) -> list[str]:
    """Problems for classes of the data set that ``known`` lacks."""
    known_list = list(known)
    unknown = [c for c in report.classes if c not in known_list]
    if not unknown:
        return []
    return [
        f"unknown class {c!r} ({report.per_class[c]} images): {what} has "
        f"{', '.join(known_list) or 'no classes'}"
        for c in unknown
    ]


def raise_if_bad(report: DatasetReport, field_name: str = "dataset") -> None:
    if report.problems:
        raise InvalidArgument(
            f"{field_name}: {report.problems[0]}"
            + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""),
            violations=report.violations(field_name),
        )


# ---------------------------------------------------------------------------------------------
# loading (workers)
# ---------------------------------------------------------------------------------------------


def load_images(
    source: Source,
    paths: Iterable[str],
    *,
    size: int,
    channels: int,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Decode and resize to ``(N, channels, size, size)`` float32 in [0, 1]."""
    from clinisynth_server.finetune.shards_loader import to_sample

    out = []
    for i, path in enumerate(paths):
        out.append(to_sample(decode(source.read(path), path), size, channels))
        if progress is not None:
            progress(i)
    return np.stack(out).astype(np.float32)
