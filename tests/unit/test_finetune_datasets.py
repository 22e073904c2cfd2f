"""Data-set layouts: every problem is listed before any training."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from clinisynth_lab.phantoms import datasets as layouts
from clinisynth_server.finetune import datasets
from clinisynth_server.finetune.datasets import FolderSource, StoreSource, validate
from clinisynth_server.store import open_store


@pytest.fixture()
def store(tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    return open_store(str(tmp_path / "store"))


def images(n: int, size: int = 8) -> np.ndarray:
    return np.arange(n * size * size, dtype=np.uint8).reshape(n, size, size) * 7


def test_image_folder_classes_counts_and_sizes(store) -> None:  # type: ignore[no-untyped-def]
    layouts.write_image_folder_to_store(store, "d", images(5), [0, 1, 1, 0, 1], ["a", "b"])
    report = validate(StoreSource(store, "d"), "d", "image_folder")
    assert report.ok and report.images == 5
    assert report.classes == ["a", "b"] and report.per_class == {"a": 2, "b": 3}
    assert (report.size, report.channels) == (8, 1)
    arr = datasets.load_images(
        StoreSource(store, "d"), [e.path for e in report.entries], size=4, channels=3
    )
    assert arr.shape == (5, 3, 4, 4) and arr.dtype == np.float32
    assert 0 <= arr.min() <= arr.max() <= 1


def test_image_folder_problems(store) -> None:  # type: ignore[no-untyped-def]
    layouts.write_image_folder_to_store(store, "d", images(2), [0, 1], ["a", "b"])
    store.put_bytes("d/a/broken.png", b"\x89PNG nope")
    store.put_bytes("d/loose.png", layouts.encode_png(images(1)[0]))
    report = validate(StoreSource(store, "d"), "d", "image_folder")
    assert len(report.problems) == 2
    assert any("a/broken.png: unreadable image" in p for p in report.problems)
    assert any("loose.png: image outside a class folder" in p for p in report.problems)
    empty = validate(StoreSource(store, "nothing"), "nothing", "image_folder")
    assert empty.problems == ["no files under 'nothing' (empty or missing data set)"]


def test_manifest_problems_listed_per_line(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "images" / "0.png").write_bytes(layouts.encode_png(images(1)[0]))
    lines = [
        json.dumps({"image": "images/0.png", "prompt": "left effusion"}),
        "{not json",
        json.dumps({"image": "images/9.png", "prompt": "x"}),
        json.dumps({"image": "images/0.png"}),
    ]
    (root / "manifest.jsonl").write_text("\n".join(lines))
    report = validate(FolderSource(root), "m", "image_text_manifest")
    assert report.images == 1 and report.entries[0].text == "left effusion"
    assert [p.split(":")[0] for p in report.problems] == [
        "manifest.jsonl line 2",
        "manifest.jsonl line 3",
        "manifest.jsonl line 4",
    ]
    missing = validate(FolderSource(root / "images"), "m", "image_text_manifest")
    assert missing.problems == [
        "manifest.jsonl is missing (the image_text_manifest layout needs it)"
    ]


def test_feedback_export(store) -> None:  # type: ignore[no-untyped-def]
    layouts.write_feedback_to_store(
        store, "fb", images(4), ["a", "b", "a", "b"], [True, False, True, False]
    )
    report = validate(StoreSource(store, "fb"), "fb", "feedback_export")
    assert report.ok and [e.plausible for e in report.entries] == [True, False, True, False]
    assert report.per_class == {"a": 2, "b": 2}
    problems = datasets.check_classes(report, ["a"], "cells@1")
    assert problems == ["unknown class 'b' (2 images): cells@1 has a"]


def test_phantom_manifests_are_readable_by_the_finetune_reader(tmp_path):
    """phantoms/datasets.py writes "file" keys; the reader takes them as "image"."""
    from clinisynth_lab.phantoms import datasets as pd
    from clinisynth_server.finetune import datasets as fd

    pd.write_phantom_dataset("chest", tmp_path / "ds", n=6, size=32)
    report = fd.validate(fd.FolderSource(tmp_path / "ds"), "", "image_text_manifest")
    assert report.problems == [] and report.images == 6


def test_the_writers_layouts_are_what_the_jobs_read(tmp_path: pathlib.Path) -> None:
    """One writer per layout (phantoms.datasets); the finetune reader takes each as it is."""
    texts = ["left effusion", "right effusion", "cardiomegaly"]
    root = layouts.write_manifest(tmp_path / "m", images(3), texts, [["a"], ["b"], []])
    report = validate(FolderSource(root), "m", "image_text_manifest")
    assert report.ok, report.problems
    assert [e.text for e in report.entries] == texts
    folder = layouts.write_image_folder(tmp_path / "f", images(3), [1, 0, 1], ["a", "b"])
    report = validate(FolderSource(folder), "f", "image_folder")
    assert report.ok and report.per_class == {"a": 1, "b": 2}  # classes.json is not an image
    fb = layouts.write_feedback(tmp_path / "fb", images(2), ["a", "b"], [False, True])
    report = validate(FolderSource(fb), "fb", "feedback_export")
    assert report.ok and [e.plausible for e in report.entries] == [False, True]


def test_manifests_of_older_sets_still_read(tmp_path: pathlib.Path) -> None:
    """Sets written before the keys were unified used ``file`` + ``text``."""
    root = layouts.write_manifest(tmp_path / "m", images(2), ["x", "y"])
    old = [
        json.dumps({"file": json.loads(line)["image"], "text": json.loads(line)["prompt"]})
        for line in (root / "manifest.jsonl").read_text().splitlines()
    ]
    (root / "manifest.jsonl").write_text("\n".join(old) + "\n")
    report = validate(FolderSource(root), "m", "image_text_manifest")
    assert report.ok and [e.text for e in report.entries] == ["x", "y"]
    assert [r.text for r in layouts.read_manifest(root)] == ["x", "y"]
