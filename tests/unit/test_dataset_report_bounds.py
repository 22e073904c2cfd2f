"""`data validate` names every unreadable file by path (not the first 50), within bounds that keep
the reply small; a refusal at job creation names the first few and points at validate."""

from __future__ import annotations

import pathlib

import numpy as np

from clinisynth_lab.phantoms.datasets import write_image_folder_to_store
from clinisynth_server.finetune import datasets
from clinisynth_server.store import open_store


def test_validate_names_every_unreadable_file(tmp_path: pathlib.Path) -> None:
    store = open_store(str(tmp_path / "store"))
    images = np.zeros((4, 8, 8), np.uint8)
    write_image_folder_to_store(store, "datasets/bad", images, [0, 1, 0, 1], ["a", "b"])
    broken = [f"datasets/bad/a/broken-{i:03d}.png" for i in range(120)]
    for key in broken:
        store.put_bytes(key, b"\x89PNG\r\n\x1a\n not really")
    report = datasets.validate(
        datasets.StoreSource(store, "datasets/bad"), "datasets/bad", "image_folder"
    )
    named = {p.split(":", 1)[0] for p in report.problems}
    assert named == {k.removeprefix("datasets/bad/") for k in broken}  # all 120, by path

    refusal = report.violations("dataset")
    assert len(refusal) == datasets.MAX_VIOLATIONS + 1
    assert "100 more" in refusal[-1].description and "data validate" in refusal[-1].description


def test_report_is_bounded_in_bytes() -> None:
    report = datasets.DatasetReport("p", "image_folder")
    for i in range(20_000):
        report.problem(f"folder/{i:06d}.png: unreadable ({'x' * 80})")
    report.finish()
    assert sum(len(p.encode()) for p in report.problems) <= datasets.MAX_PROBLEM_BYTES + 100
    assert report.problems[-1].startswith("... and ") and "more problems" in report.problems[-1]
    kept = len(report.problems) - 1
    assert report.problems[-1] == f"... and {20_000 - kept} more problems"
