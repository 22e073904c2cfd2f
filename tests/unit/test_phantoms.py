"""Phantom data sets: determinism, oracle quality, ground truth, data-set layouts."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from clinisynth_lab.phantoms import abdomen, cells, chest, datasets, fundus
from clinisynth_server.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def cell_batch() -> tuple[np.ndarray, np.ndarray]:
    return cells.generate(400, seed=11)


# --------------------------------------------------------------------------- cells


def test_cells_deterministic_and_seed_dependent() -> None:
    a, la = cells.generate(24, seed=5)
    b, lb = cells.generate(24, seed=5)
    c, _ = cells.generate(24, seed=6)
    assert a.dtype == np.uint8 and a.shape == (24, 32, 32)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    assert a.tobytes() != c.tobytes()
    # an image depends on (seed, index, label) only, not on the batch
    d, _ = cells.generate(3, seed=5, labels=la[:3])
    assert d.tobytes() == a[:3].tobytes()


def test_cells_class_balance_and_explicit_labels() -> None:
    _, labels = cells.generate(103, seed=1)
    counts = Counter(labels.tolist())
    assert set(counts) == set(range(len(cells.CELL_TYPES)))
    assert max(counts.values()) - min(counts.values()) <= 1
    _, fixed = cells.generate(4, seed=1, labels=[3, 3, 0, 1])
    assert fixed.tolist() == [3, 3, 0, 1]
    with pytest.raises(InvalidArgument):
        cells.generate(2, seed=1, labels=[0])
    with pytest.raises(InvalidArgument):
        cells.generate(2, seed=1, size=8)


def test_cells_oracle_accepts_real(cell_batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = cell_batch
    verdicts = [cells.oracle(x, int(y)) for x, y in zip(images, labels, strict=True)]
    rate = np.mean([v.plausible for v in verdicts])
    assert rate >= 0.99, Counter(f for v in verdicts for f in v.failures)


def test_cells_oracle_accepts_real_at_64px() -> None:
    images, labels = cells.generate(80, seed=2, size=64)
    assert images.shape == (80, 64, 64)
    assert cells.oracle_batch(images, labels).mean() >= 0.97


def test_cells_oracle_rejects_wrong_labels(cell_batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = cell_batch
    k = len(cells.CELL_TYPES)
    wrong = [(int(y) + 1 + i % (k - 1)) % k for i, y in enumerate(labels)]
    assert cells.oracle_batch(images, wrong).mean() <= 0.02


@pytest.mark.parametrize("kind", cells.CORRUPTIONS)
def test_cells_oracle_rejects_corruptions(
    kind: str, cell_batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = cell_batch
    rng = np.random.default_rng(0)
    bad = np.stack([cells.corrupt(x, kind, rng) for x in images[:80]])
    assert bad.dtype == np.uint8
    assert cells.oracle_batch(bad, labels[:80]).mean() <= 0.05


def test_cells_failures_name_checklist_items(cell_batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = cell_batch
    names = {c.name for crits in cells.CHECKLIST.values() for c in crits}
    rng = np.random.default_rng(1)
    seen: set[str] = set()
    for kind in cells.CORRUPTIONS:
        for x, y in zip(images[:10], labels[:10], strict=True):
            seen |= set(cells.oracle(cells.corrupt(x, kind, rng), int(y)).failures)
    assert seen and seen <= names
    ui = cells.checklist_dict()
    assert set(ui) == set(cells.CELL_TYPES)
    assert all(len(v) >= 8 and all(c["description"] for c in v) for v in ui.values())
    json.dumps(ui)
    # the class-specific items differ between types
    assert (
        len({dict((c["name"], c["description"]) for c in v)["nucleus_shape"] for v in ui.values()})
        == 4
    )


def test_cells_oracle_rejects_blank_and_bad_input() -> None:
    blank = np.full((32, 32), 220, np.uint8)
    verdict = cells.oracle(blank, "lymphocyte")
    assert not verdict.plausible and "membrane_present" in verdict.failures
    with pytest.raises(InvalidArgument):
        cells.oracle(blank, 9)
    with pytest.raises(InvalidArgument):
        cells.oracle(np.zeros((32, 20), np.uint8), 0)


# --------------------------------------------------------------------------- chest


def test_chest_deterministic_and_labels_match_ground_truth() -> None:
    a = chest.generate(12, seed=4)
    b = chest.generate(12, seed=4)
    assert a.images.shape == (12, 64, 64) and a.images.dtype == np.uint8
    assert a.images.tobytes() == b.images.tobytes() and a.reports == b.reports
    for lab, fs, p in zip(a.labels, a.findings, a.params, strict=True):
        assert fs == chest.ground_truth(p)
        assert lab.tolist() == chest.multi_hot(fs).tolist()
        assert lab.sum() >= 1 and (lab[0] == 1) == (fs == ("no_finding",))


def test_chest_requested_findings_are_rendered_as_ground_truth() -> None:
    for fs in chest.FINDING_SETS:
        batch = chest.generate(3, seed=9, findings=list(fs[0]))
        assert all(f == chest.canonical_findings(fs[0]) for f in batch.findings)
    with pytest.raises(InvalidArgument):
        chest.generate(1, seed=0, findings=["no_finding", "cardiomegaly"])
    with pytest.raises(InvalidArgument):
        chest.generate(1, seed=0, findings=["fracture"])


def test_chest_report_mentions_findings() -> None:
    rng = np.random.default_rng(3)
    sets = [fs for fs, _ in chest.FINDING_SETS]
    for i in range(300):
        fs = sets[i % len(sets)]
        text = chest.report(fs, rng)
        assert chest.findings_from_report(text) == chest.canonical_findings(fs), text
        low = text.lower()
        if "pneumothorax" in fs:
            assert "pneumothorax" in low
        if "cardiomegaly" in fs:
            assert "cardiomegaly" in low or "enlarged" in low
        for side in ("left", "right"):
            if f"pleural_effusion_{side}" in fs:
                assert "effusion" in low and (side in low or "bilateral" in low)
    batch = chest.generate(40, seed=2)
    assert len(set(batch.reports)) > 20  # varied phrasing
    for text, fs in zip(batch.reports, batch.findings, strict=True):
        assert chest.findings_from_report(text) == fs
    assert chest.report(["pleural_effusion_left"], np.random.default_rng(0)).count("left") >= 1


def test_chest_effusion_is_on_the_labelled_side() -> None:
    rng = np.random.default_rng(0)
    for side in ("left", "right"):
        p = chest.sample_params(rng, 64, [f"pleural_effusion_{side}"])
        p = dataclasses.replace(p, effusion=((side, 0.45, "large"),))
        clear = dataclasses.replace(p, effusion=(), findings=("no_finding",))
        diff = chest.render(p).astype(float) - chest.render(clear).astype(float)
        half_right = diff[:, 32:].sum()
        half_left = diff[:, :32].sum()
        # patient's left is the image's right
        assert (
            (half_right > 5 * abs(half_left))
            if side == "left"
            else (half_left > 5 * abs(half_right))
        )
        assert chest.ground_truth(clear) == ("no_finding",)


def test_abdomen_pretraining_domain() -> None:
    a = abdomen.generate(10, seed=1)
    b = abdomen.generate(10, seed=1)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert a.images.shape == (10, 64, 64)
    les = abdomen.generate(4, seed=2, findings=["liver_lesion"])
    assert all("liver" in c for c in les.captions)
    assert les.labels[:, abdomen.FINDINGS.index("liver_lesion")].all()


# --------------------------------------------------------------------------- fundus


def test_fundus_deterministic_labels_and_masks() -> None:
    imgs, labels, masks = fundus.generate(30, seed=7, lesion_fraction=0.4)
    imgs2, labels2, masks2 = fundus.generate(30, seed=7, lesion_fraction=0.4)
    assert imgs.shape == (30, 64, 64, 3) and imgs.dtype == np.uint8 and masks.dtype == bool
    assert imgs.tobytes() == imgs2.tobytes() and np.array_equal(masks, masks2)
    assert np.array_equal(labels, labels2)
    assert int(labels.sum()) == 12
    assert np.array_equal(masks.reshape(30, -1).any(axis=1), labels.astype(bool))
    ids = fundus.patient_ids(30, 7)
    assert len(set(ids.tolist())) == 30
    again, mask = fundus.render_patient(int(ids[3]), lesions=bool(labels[3]), lesion_seed=7)
    assert again.tobytes() == imgs[3].tobytes() and np.array_equal(mask, masks[3])
    with pytest.raises(InvalidArgument):
        fundus.generate(2, seed=0, lesion_fraction=1.5)


def test_fundus_pair_differs_only_at_lesions() -> None:
    for pid in fundus.patient_ids(8, 3):
        healthy, diseased, mask = fundus.render_pair(int(pid), lesion_seed=5)
        changed = np.any(healthy != diseased, axis=-1)
        assert mask.any()
        near = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
        assert not (changed & ~near).any()
        assert changed[mask].mean() >= 0.9
        # same patient, same anatomy: the healthy render does not depend on the lesion seed
        h2, _, m2 = fundus.render_pair(int(pid), lesion_seed=6)
        assert h2.tobytes() == healthy.tobytes() and not np.array_equal(m2, mask)
    a, _ = fundus.render_patient(1)
    b, _ = fundus.render_patient(2)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 3  # patients differ


# --------------------------------------------------------------------------- data sets


class _DictStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = data


def test_image_folder_round_trip(tmp_path: Path) -> None:
    imgs, labels = cells.generate(9, seed=1)
    root = datasets.write_image_folder(tmp_path / "cells", imgs, labels, cells.CELL_TYPES)
    assert (root / "classes.json").is_file()
    assert sorted(p.name for p in (root / cells.CELL_TYPES[int(labels[0])]).iterdir())
    back, back_labels, names = datasets.read_image_folder(root)
    assert names == list(cells.CELL_TYPES)
    got = sorted(zip(back_labels.tolist(), [b.tobytes() for b in back], strict=True))
    want = sorted(zip(labels.tolist(), [x.tobytes() for x in imgs], strict=True))
    assert got == want
    (root / "classes.json").unlink()  # torchvision convention: sorted folder names
    _, _, sorted_names = datasets.read_image_folder(root)
    assert sorted_names == sorted(n for n in cells.CELL_TYPES if (root / n).is_dir())


def test_manifest_round_trip_rgb_and_text(tmp_path: Path) -> None:
    batch = chest.generate(5, seed=3)
    root = datasets.write_manifest(
        tmp_path / "cxr", batch.images, batch.reports, [list(f) for f in batch.findings]
    )
    lines = (root / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["image"] == "images/000001.png" and first["prompt"] == batch.reports[0]
    recs = datasets.read_manifest(root)
    assert [r.text for r in recs] == batch.reports
    assert [tuple(r.labels) for r in recs] == batch.findings
    assert all(np.array_equal(r.image, x) for r, x in zip(recs, batch.images, strict=True))
    rgb, _, _ = fundus.generate(2, seed=1)
    r2 = datasets.write_manifest(tmp_path / "rgb", rgb, ["a", "b"], extra=[{"pid": 1}, {"pid": 2}])
    back = datasets.read_manifest(r2)
    assert back[0].image.shape == (64, 64, 3) and np.array_equal(back[1].image, rgb[1])
    assert back[1].extra == {"pid": 2} and back[0].labels == []


def test_manifest_reader_rejects_bad_sets(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        datasets.read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"image": "../etc/passwd", "prompt": "x"}\n')
    with pytest.raises(InvalidArgument):
        datasets.read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"prompt": "no image"}\n')
    with pytest.raises(InvalidArgument, match="image"):
        datasets.read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("{not json\n")
    with pytest.raises(InvalidArgument):
        datasets.read_manifest(tmp_path)
    with pytest.raises(InvalidArgument):
        datasets.write_image_folder(tmp_path / "x", np.zeros((1, 8, 8), np.uint8), [0], ["../up"])


def test_store_writers_match_local_layout(tmp_path: Path) -> None:
    store = _DictStore()
    keys = datasets.write_phantom_dataset_to_store("cells", store, "/datasets/cells-v1/", 8, seed=2)
    assert keys[-1] == "datasets/cells-v1/classes.json"
    root = datasets.write_phantom_dataset("cells", tmp_path / "cells", 8, seed=2)
    local = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert {k.removeprefix("datasets/cells-v1/"): v for k, v in store.objects.items()} == local
    store2 = _DictStore()
    keys2 = datasets.write_phantom_dataset_to_store("abdomen", store2, "ab", 3, seed=1)
    assert keys2[-1] == "ab/manifest.jsonl" and len(keys2) == 4
    with pytest.raises(InvalidArgument):
        datasets.write_phantom_dataset_to_store("mri", store2, "x", 1)
