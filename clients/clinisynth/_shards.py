"""Writing a local data set as tar shards + ``index.json`` (``clinisynth data upload``).

The format is the finetune service's (``clinisynth_server.finetune.shards``; a unit test keeps
the two in step): ``shards/<nnnnnn>-<first 16 hex of its sha256>.tar`` holding image files under
their data-set paths, the layout's own small files (``manifest.jsonl`` / ``labels.jsonl``) as they
are, and ``index.json`` last. Tar bytes are deterministic (sorted members, zero times and owners),
so the same folder gives the same shard names and a re-run skips what the store already holds.

The archive layout (``dicom_archive``) is a DICOM tree plus a CSV of report text keyed by study or
image id (MIMIC-CXR-like): each image's prompt is one section of its report (``IMPRESSION:``,
``FINDINGS:``, ...); images go under ``<class>/`` (a CSV column) or ``images/``, so the set is
both an ImageFolder and an image–text manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pathlib
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

INDEX_NAME = "index.json"
SHARDS_DIR = "shards/"
FORMAT = "clinisynth-shards"
VERSION = 1
DEFAULT_SHARD_BYTES = 64 * 1024**2
DICOM_SUFFIXES = (".dcm", ".dicom")
_HEADER_RE = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)])[ \t]*:", re.MULTILINE)


@dataclass(frozen=True)
class Member:
    """One image of the set: its path in the data set and where it is on disk."""

    name: str
    path: pathlib.Path


@dataclass
class Shard:
    number: int
    members: list[Member] = field(default_factory=list)
    size: int = 0

    def bytes(self) -> bytes:
        """The shard's tar, byte for byte the same for the same members."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
            for m in self.members:
                info = tarfile.TarInfo(m.name)
                data = m.path.read_bytes()
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def plan(members: Sequence[Member], *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Shard]:
    """Members in path order, cut into shards of about ``shard_bytes`` each."""
    shards: list[Shard] = []
    current = Shard(0)
    for m in sorted(members, key=lambda m: m.name):
        size = m.path.stat().st_size
        if current.members and current.size + size > shard_bytes:
            shards.append(current)
            current = Shard(len(shards))
        current.members.append(m)
        current.size += size
    if current.members:
        shards.append(current)
    return shards


def shard_name(number: int, data: bytes) -> tuple[str, str]:
    """(``shards/<nnnnnn>-<sha16>.tar``, full sha256) of a shard's bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{SHARDS_DIR}{number:06d}-{digest[:16]}.tar", digest


def shape_of(path: pathlib.Path) -> list[int] | None:
    """(height, width, channels) from the image's header, without decoding; None if unknown."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        try:
            import pydicom
        except ImportError:
            return None
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            spp = int(getattr(ds, "SamplesPerPixel", 1))
            return [int(ds.Rows), int(ds.Columns), 3 if spp == 3 else 1]
        except Exception:  # the server decodes it and reports it by path
            return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            colour = im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV")
            return [im.height, im.width, 3 if colour else 1]
    except (UnidentifiedImageError, OSError):
        return None


def index_json(layout: str, shards: Iterable[dict[str, object]]) -> bytes:
    body = {"format": FORMAT, "version": VERSION, "layout": layout, "shards": list(shards)}
    return json.dumps(body, indent=1, sort_keys=True).encode()


# ---------------------------------------------------------------------------------------------
# the archive layout: a DICOM tree + a CSV of reports
# ---------------------------------------------------------------------------------------------


def report_section(text: str, section: str) -> str:
    """The body of ``SECTION:`` in a report (up to the next header), whitespace-normalised."""
    want = section.strip().upper()
    headers = list(_HEADER_RE.finditer(text))
    for i, h in enumerate(headers):
        if h.group(1).strip() == want:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            return " ".join(text[h.end() : end].split())
    return ""


@dataclass
class Archive:
    """What the archive layout turned into: members, the manifest and the images left out."""

    members: list[Member]
    manifest: bytes
    problems: list[str]
    left_out: list[str]


def read_archive(
    root: pathlib.Path,
    reports_csv: pathlib.Path,
    *,
    key_column: str = "study_id",
    text_column: str = "report",
    section: str = "impression",
    class_column: str | None = None,
) -> Archive:
    """Match every DICOM under ``root`` to a CSV row by its file stem or a folder name.

    A key is a whole path segment (``s50414267``) or the file's stem (``02aa804e-...``), so a
    report keyed by study covers every image of the study. Images with no row, or whose report
    has no such section, are left out and listed.
    """
    problems: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    try:
        with open(reports_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            for need in (key_column, text_column, *([class_column] if class_column else [])):
                if need not in fields:
                    problems.append(f"{reports_csv.name}: no column {need!r} (has {fields})")
            if not problems:
                for n, line in enumerate(reader, 2):
                    key = (line.get(key_column) or "").strip()
                    if not key:
                        problems.append(f"{reports_csv.name} line {n}: empty {key_column!r}")
                    rows[key] = line
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{reports_csv}: unreadable ({exc})")
    members: list[Member] = []
    lines: list[str] = []
    left_out: list[str] = []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)
    if not files:
        problems.append(f"no DICOM files (.dcm) under {root}")
    for path in files:
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        keys = [path.stem, *path.relative_to(root).parent.parts]
        row = next((rows[k] for k in keys if k in rows), None)
        if row is None:
            left_out.append(f"{rel}: no report row")
            continue
        prompt = report_section(row.get(text_column) or "", section)
        if not prompt:
            left_out.append(f"{rel}: report has no {section.upper()} section")
            continue
        folder = (row.get(class_column) or "").strip() if class_column else "images"
        if not folder or "/" in folder or folder.startswith("."):
            left_out.append(f"{rel}: class {folder!r} is not a folder name")
            continue
        name = f"{folder}/{rel}"
        members.append(Member(name, path))
        entry = {"image": name, "prompt": prompt}
        if class_column:
            entry["class_name"] = folder
        lines.append(json.dumps(entry, sort_keys=True))
    if files and not members and not problems:
        problems.append(f"no image of {root} has a report with a {section.upper()} section")
    manifest = ("\n".join(lines) + "\n").encode() if lines else b""
    return Archive(members, manifest, problems, left_out)
