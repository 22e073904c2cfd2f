"""What the SDK and CLI send as an item's name: never the caller's folder layout.

Item names are stored with feedback and review items and shown to raters; a full local path
(``/home/<user>/<patient>/image.png``) would carry the machine's layout and often a patient or
study name into the service (issue: PACS in / de-identified inputs).
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

from clinisynth import _reward as rw
from clinisynth.cli.reward import review_names


def _png(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_enqueue_sends_base_names_of_local_files(tmp_path: pathlib.Path) -> None:
    a = _png(tmp_path / "Doe^Jane" / "study-17" / "a.png")
    b = _png(tmp_path / "Roe^Rick" / "b.png")
    req = rw.enqueue_request([a, str(b)], None, None, None, 1, None, None)
    sent = [item.name for item in req.images]
    assert sent == ["a.png", "b.png"]
    assert not any("Doe" in n or "Roe" in n or str(tmp_path) in n for n in sent)


def test_windows_paths_lose_their_folders_too() -> None:
    assert rw._name_of("C:\\Users\\doe\\Jane Doe\\scan.png") == "scan.png"
    assert rw._name_of("/srv/pacs/export/Jane Doe/scan.png") == "scan.png"


def test_names_chosen_by_the_caller_are_sent_as_given(tmp_path: pathlib.Path) -> None:
    a = _png(tmp_path / "x" / "a.png")
    req = rw.enqueue_request([a], None, None, None, 1, None, ["case-0001"])
    assert [item.name for item in req.images] == ["case-0001"]


def test_score_stream_names_are_base_names(tmp_path: pathlib.Path) -> None:
    a = _png(tmp_path / "Doe^Jane" / "a.png")
    msgs = list(
        rw.stream_requests(
            [a],
            condition=None,
            model=None,
            resize=False,
            store_prefix=None,
            batch_size=8,
            generator=None,
        )
    )
    names = [m.image.name for m in msgs if m.HasField("image")]
    assert names == ["a.png"]


def test_cli_review_names_stay_inside_the_folder_or_use_the_label(tmp_path: pathlib.Path) -> None:
    paths = [_png(tmp_path / "cases" / "p1" / "a.png"), _png(tmp_path / "cases" / "b.png")]
    assert review_names(tmp_path / "cases", paths, None) == ["p1/a.png", "b.png"]
    assert review_names(tmp_path / "cases", paths, "site-b") == ["site-b-0001", "site-b-0002"]
