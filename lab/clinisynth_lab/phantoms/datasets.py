"""Writers (and readers) of the data-set layouts the finetune service reads, from arrays.

Why: training jobs take a data set by reference (a local folder or a prefix in the artifact
store); fixing the on-disk layout here lets phantom sets, user uploads and tests share one
reader. Both layouts hold lossless 8-bit PNGs (grayscale ``L`` or ``RGB``), written with fixed
encoder settings so the same arrays always give the same bytes.

Layout 1 — **ImageFolder** (class-labelled images; torchvision's convention)::

    <root>/classes.json            optional: ["lymphocyte", "neutrophil", ...] = label order
    <root>/<class_name>/<id>.png   id = zero-padded running number, e.g. 000001.png

  A reader without ``classes.json`` orders classes by sorted folder name (as torchvision does);
  with it, label ``i`` is ``classes[i]`` (the writer always writes it). Empty class folders may
  be omitted; files other than ``*.png`` are ignored.

Layout 2 — **manifest** (image + text pairs, optional labels)::

    <root>/manifest.jsonl          one JSON object a line:
        {"image": "images/000001.png", "prompt": "Small left pleural effusion.",
         "labels": ["pleural_effusion_left"]}
    <root>/images/000001.png

  ``image`` is relative to ``<root>`` with forward slashes; ``prompt`` is the report / caption
  (readers also accept ``text`` / ``caption``, and ``file`` for ``image`` as older sets wrote);
  ``labels`` is a list of strings (may be empty). Extra keys are allowed and kept by the reader.

Layout 3 — **feedback export** (expert judgements; the reward service exports its stored
feedback in this layout itself, this writer makes one from arrays for phantoms and tests)::

    <root>/labels.jsonl            one judgement a line: {"image": "images/000001.png",
        "condition": {"class_name": "neutrophil"}, "plausible": true, "rater_id": "oracle", ...}
    <root>/images/000001.png

Store variants take any object with ``put_bytes(key, data)`` and write the same relative keys
under ``prefix`` (``<prefix>/manifest.jsonl``, ...), manifest / ``classes.json`` last so a reader
that sees them can rely on the images being there.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from clinisynth_server.errors import InvalidArgument, NotFound
from clinisynth_server.finetune.layouts import (
    CLASSES_NAME,
    IMAGE_FIELDS,
    IMAGES_DIR,
    LABELS_NAME,
    MANIFEST_NAME,
    TEXT_FIELDS,
    field_value,
)


class BytesSink(Protocol):
    """What the store writers need: the artifact store's ``put_bytes``."""

    def put_bytes(self, key: str, data: bytes) -> Any: ...


@dataclass(frozen=True)
class ManifestRecord:
    """One line of ``manifest.jsonl`` with its image decoded."""

    path: str
    text: str
    labels: list[str]
    image: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def encode_png(image: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a uint8 [H, W] (gray) or [H, W, 3] (RGB) array."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InvalidArgument.for_field("images", f"must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise InvalidArgument.for_field("images", f"must be [H, W] or [H, W, 3], got {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").save(
        buf, format="PNG", optimize=False, compress_level=6
    )
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 array of a PNG (gray stays [H, W], colour becomes [H, W, 3])."""
    with Image.open(io.BytesIO(data)) as opened:
        im: Image.Image = opened
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB" if "A" in im.mode or im.mode in ("P", "CMYK") else "L")
        return np.asarray(im, dtype=np.uint8).copy()


def _check_name(name: str, what: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InvalidArgument.for_field(what, f"not a safe folder name: {name!r}")
    return name


def image_folder_entries(
    images: np.ndarray | Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    start_id: int = 1,
) -> Iterator[tuple[str, bytes]]:
    """(relative key, bytes) pairs of an ImageFolder set; ``classes.json`` comes last."""
    names = [_check_name(c, "class_names") for c in class_names]
    if len(set(names)) != len(names):
        raise InvalidArgument.for_field("class_names", "must be unique")
    if len(images) != len(labels):
        raise InvalidArgument.for_field("labels", "must have one label per image")
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        k = int(lab)
        if not 0 <= k < len(names):
            raise InvalidArgument.for_field(f"labels[{i}]", f"must be in [0, {len(names)})")
        yield f"{names[k]}/{start_id + i:06d}.png", encode_png(img)
    yield CLASSES_NAME, (json.dumps(names) + "\n").encode()


def manifest_entries(
    images: np.ndarray | Sequence[np.ndarray],
    texts: Sequence[str],
    labels: Sequence[Sequence[str]] | None = None,
    *,
    extra: Sequence[Mapping[str, Any]] | None = None,
    start_id: int = 1,
) -> Iterator[tuple[str, bytes]]:
    """(relative key, bytes) pairs of a manifest set; ``manifest.jsonl`` comes last."""
    n = len(images)
    if len(texts) != n or (labels is not None and len(labels) != n):
        raise InvalidArgument.for_field("texts", "texts and labels need one entry per image")
    if extra is not None and len(extra) != n:
        raise InvalidArgument.for_field("extra", "needs one mapping per image")
    lines = []
    for i in range(n):
        rel = f"{IMAGES_DIR}/{start_id + i:06d}.png"
        yield rel, encode_png(images[i])
        rec: dict[str, Any] = dict(extra[i]) if extra is not None else {}
        rec.update(
            {
                IMAGE_FIELDS[0]: rel,
                TEXT_FIELDS[0]: str(texts[i]),
                "labels": [str(x) for x in labels[i]] if labels is not None else [],
            }
        )
        lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
    yield MANIFEST_NAME, ("\n".join(lines) + ("\n" if lines else "")).encode()


def _write_local(root: str | os.PathLike[str], entries: Iterator[tuple[str, bytes]]) -> Path:
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for rel, data in entries:
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    return base


def _write_store(sink: BytesSink, prefix: str, entries: Iterator[tuple[str, bytes]]) -> list[str]:
    pre = prefix.strip("/")
    keys = []
    for rel, data in entries:
        key = f"{pre}/{rel}" if pre else rel
        sink.put_bytes(key, data)
        keys.append(key)
    return keys


def write_image_folder(
    root: str | os.PathLike[str],
    images: np.ndarray | Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    start_id: int = 1,
) -> Path:
    """Write an ImageFolder set under ``root`` (created); returns the root path."""
    return _write_local(root, image_folder_entries(images, labels, class_names, start_id=start_id))


def write_manifest(
    root: str | os.PathLike[str],
    images: np.ndarray | Sequence[np.ndarray],
    texts: Sequence[str],
    labels: Sequence[Sequence[str]] | None = None,
    *,
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write a manifest set (``manifest.jsonl`` + ``images/``) under ``root``."""
    return _write_local(root, manifest_entries(images, texts, labels, extra=extra))


def write_image_folder_to_store(
    sink: BytesSink,
    prefix: str,
    images: np.ndarray | Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> list[str]:
    """Write an ImageFolder set to the artifact store under ``prefix``; returns the keys."""
    return _write_store(sink, prefix, image_folder_entries(images, labels, class_names))


def write_manifest_to_store(
    sink: BytesSink,
    prefix: str,
    images: np.ndarray | Sequence[np.ndarray],
    texts: Sequence[str],
    labels: Sequence[Sequence[str]] | None = None,
    *,
    extra: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Write a manifest set to the artifact store under ``prefix``; returns the keys."""
    return _write_store(sink, prefix, manifest_entries(images, texts, labels, extra=extra))


def feedback_entries(
    images: np.ndarray | Sequence[np.ndarray],
    class_names: Sequence[str],
    plausible: Sequence[bool],
    *,
    generator: str = "unknown@0",
    rater_id: str = "oracle",
) -> Iterator[tuple[str, bytes]]:
    """(relative key, bytes) pairs of a feedback export; ``labels.jsonl`` comes last."""
    if not len(images) == len(class_names) == len(plausible):
        raise InvalidArgument.for_field("plausible", "needs one class and verdict per image")
    lines = []
    for i, (img, cls, ok) in enumerate(zip(images, class_names, plausible, strict=True)):
        rel = f"{IMAGES_DIR}/{i + 1:06d}.png"
        yield rel, encode_png(img)
        lines.append(
            json.dumps(
                {
                    "image": rel,
                    "condition": {"class_name": str(cls)},
                    "plausible": bool(ok),
                    "rater_id": rater_id,
                    "criteria": {},
                    "feedback_id": f"fb-{i + 1:06d}",
                    "generator": generator,
                },
                sort_keys=True,
            )
        )
    yield LABELS_NAME, ("\n".join(lines) + ("\n" if lines else "")).encode()


def write_feedback(
    root: str | os.PathLike[str],
    images: np.ndarray | Sequence[np.ndarray],
    class_names: Sequence[str],
    plausible: Sequence[bool],
    *,
    generator: str = "unknown@0",
) -> Path:
    """Write a feedback export (``labels.jsonl`` + ``images/``) under ``root``."""
    return _write_local(root, feedback_entries(images, class_names, plausible, generator=generator))


def write_feedback_to_store(
    sink: BytesSink,
    prefix: str,
    images: np.ndarray | Sequence[np.ndarray],
    class_names: Sequence[str],
    plausible: Sequence[bool],
    *,
    generator: str = "unknown@0",
) -> list[str]:
    """Write a feedback export to the artifact store under ``prefix``; returns the keys."""
    return _write_store(
        sink, prefix, feedback_entries(images, class_names, plausible, generator=generator)
    )


def read_image_folder(
    root: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Read an ImageFolder set: (images, int64 labels, class names), files in sorted order.

    Class order: ``class_names`` if given, else ``classes.json``, else sorted folder names.
    """
    base = Path(root)
    if not base.is_dir():
        raise NotFound(f"data set folder {str(base)!r} does not exist")
    if class_names is None:
        cfile = base / CLASSES_NAME
        if cfile.is_file():
            class_names = [str(c) for c in json.loads(cfile.read_text())]
        else:
            class_names = sorted(
                p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
    names = list(class_names)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for k, name in enumerate(names):
        folder = base / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.png")):
            images.append(decode_png(f.read_bytes()))
            labels.append(k)
    return images, np.asarray(labels, dtype=np.int64), names


def read_manifest(root: str | os.PathLike[str]) -> list[ManifestRecord]:
    """Read a manifest set; each record carries its decoded image. Validates every line."""
    base = Path(root)
    mfile = base / MANIFEST_NAME
    if not mfile.is_file():
        raise NotFound(f"{str(mfile)!r} does not exist")
    records = []
    for lineno, line in enumerate(mfile.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        field_name = f"{MANIFEST_NAME}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument.for_field(field_name, f"invalid JSON: {exc.msg}") from exc
        rel = field_value(rec, IMAGE_FIELDS) if isinstance(rec, dict) else None
        if not isinstance(rel, str):
            raise InvalidArgument.for_field(field_name, "needs a string 'image'")
        if rel.startswith("/") or ".." in rel.split("/"):
            raise InvalidArgument.for_field(field_name, f"'image' must stay inside: {rel!r}")
        text = field_value(rec, TEXT_FIELDS) or ""
        labels = rec.get("labels", [])
        if not isinstance(text, str) or not isinstance(labels, list):
            raise InvalidArgument.for_field(field_name, "'prompt' must be text, 'labels' a list")
        path = base / rel
        if not path.is_file():
            raise NotFound(f"{field_name}: image {rel!r} is missing")
        known = (*IMAGE_FIELDS, *TEXT_FIELDS, "labels")
        extra = {k: v for k, v in rec.items() if k not in known}
        records.append(
            ManifestRecord(
                rel, text, [str(x) for x in labels], decode_png(path.read_bytes()), extra
            )
        )
    return records


# --------------------------------------------------------------------------- phantom sets

PHANTOM_KINDS: tuple[str, ...] = ("cells", "chest", "abdomen", "fundus")


def phantom_entries(
    kind: str, n: int, *, seed: int = 0, size: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """Entries of a ready-made phantom set: cells / fundus as ImageFolder, chest / abdomen as
    manifest (report or caption as text, findings as labels)."""
    from clinisynth_lab.phantoms import abdomen, cells, chest, fundus

    if kind == "cells":
        imgs, labs = cells.generate(n, seed=seed, size=size or cells.DEFAULT_SIZE)
        return image_folder_entries(imgs, labs, cells.CELL_TYPES)
    if kind == "fundus":
        imgs, labs, _ = fundus.generate(n, seed=seed, size=size or fundus.DEFAULT_SIZE)
        return image_folder_entries(imgs, labs, fundus.LABELS)
    if kind == "chest":
        b = chest.generate(n, seed=seed, size=size or chest.DEFAULT_SIZE)
        return manifest_entries(b.images, b.reports, [list(f) for f in b.findings])
    if kind == "abdomen":
        a = abdomen.generate(n, seed=seed, size=size or abdomen.DEFAULT_SIZE)
        return manifest_entries(a.images, a.captions, [list(f) for f in a.findings])
    raise InvalidArgument.for_field("kind", f"unknown phantom kind {kind!r}; use {PHANTOM_KINDS}")


def write_phantom_dataset(
    kind: str, root: str | os.PathLike[str], n: int, *, seed: int = 0, size: int | None = None
) -> Path:
    """Generate and write a phantom set of ``kind`` to a local folder."""
    return _write_local(root, phantom_entries(kind, n, seed=seed, size=size))


def write_phantom_dataset_to_store(
    kind: str, sink: BytesSink, prefix: str, n: int, *, seed: int = 0, size: int | None = None
) -> list[str]:
    """Generate and write a phantom set of ``kind`` to the artifact store under ``prefix``."""
    return _write_store(sink, prefix, phantom_entries(kind, n, seed=seed, size=size))
