"""The methods benchmark's three loops at tiny sizes: mechanics and no collapse, never a gain.

Each study runs end to end through the finetune job kinds in process (the same trainers the
service's jobs use) with models of a few thousand parameters and a handful of steps, so the
pipeline cannot silently break; the claims themselves are what ``clinisynth benchmark methods``
measures at real sizes.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from clinisynth_lab.benchmarks import methods
from clinisynth_lab.benchmarks import methods_adaptation as ad
from clinisynth_lab.benchmarks import methods_counterfactual as cf
from clinisynth_lab.benchmarks import methods_feedback as fb


def _not_collapsed(images: torch.Tensor) -> None:
    """Finite, in [0, 1], and not one constant image repeated."""
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert images.flatten(1).std(dim=1).min() > 0  # no flat image
    assert (images - images[:1]).abs().amax() > 0  # not all identical


def _state(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (weights,) = folder.glob("*.safetensors")
    return load_file(str(weights))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def feedback(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], pathlib.Path]:
    work = tmp_path_factory.mktemp("feedback")
    cfg = fb.FeedbackConfig.tiny()
    cfg = fb.with_overrides(cfg, {"real_corrupt_fraction": "0.25"})  # an archive with artefacts
    return fb.run(cfg, [0], work, quick=False, cache=work / "cache"), work


def test_feedback_loop_runs_every_arm_through_the_jobs(
    feedback: tuple[dict[str, Any], pathlib.Path],
) -> None:
    res, work = feedback
    (seed,) = res["per_seed"]
    assert set(seed["arms"]) == set(fb.ARMS)
    for arm in seed["arms"].values():
        assert 0.0 <= arm["plausibility"] <= 1.0
        assert 0.0 <= arm["downstream_acc"] <= 1.0
        assert math.isfinite(arm["fid"]) and math.isfinite(arm["kid_x1000"])
        _not_collapsed(arm["examples"])
    assert 0.0 <= seed["reward_model"]["val_accuracy"] <= 1.0
    assert seed["pool"]["size"] == fb.FeedbackConfig.tiny().pool_size
    # Every fine-tuned arm moved away from the pretrained generator, and the arms differ.
    base = _state(
        work
        / "cache"
        / next(p.name for p in (work / "cache").iterdir() if p.name.startswith("cells-generator"))
        / "unet"
    )
    arms = {
        a: _state(work / "seed0" / f"arm-{a}" / "unet")
        for a in ("real_only", "uniform", "reward", "oracle")
    }
    assert not any(_same(base, s) for s in arms.values())
    assert not _same(arms["reward"], arms["real_only"])


def test_feedback_real_set_holds_the_asked_share_of_artefacts(
    feedback: tuple[dict[str, Any], pathlib.Path],
) -> None:
    from PIL import Image

    from clinisynth_lab.phantoms import cells

    _, work = feedback
    files = sorted((work / "cells-real").glob("*/*.png"))
    assert len(files) == fb.FeedbackConfig.tiny().n_real
    verdicts = [cells.oracle(np.asarray(Image.open(f)), f.parent.name).plausible for f in files]
    assert abs((1 - np.mean(verdicts)) - 0.25) <= 0.03


def test_feedback_arms_train_on_one_pool_with_their_own_rewards(
    feedback: tuple[dict[str, Any], pathlib.Path],
) -> None:
    _, work = feedback
    from clinisynth_server.finetune.kinds.reward_finetune import load_pool, pool_artifact

    pools = [
        load_pool(p)
        for p in sorted(
            (work / "runner-cells" / "jobs").glob(f"bench-reward_finetune-*/{pool_artifact(0)}")
        )
    ]
    assert len(pools) == 5  # reward, reward_filtered, uniform, oracle, real_only
    for pool in pools[1:]:
        assert torch.equal(pool["x"], pools[0]["x"])  # the same synthetic images
    reward, filtered, uniform, oracle, real_only = (p["rewards"] for p in pools)
    assert torch.equal(filtered, reward)  # same scores; only the kept subset differs
    assert torch.equal(pools[1]["keep"], reward >= 0.5)
    assert ((reward > 0) & (reward < 1)).all()  # P(aligned) of the reward model
    assert torch.equal(uniform, torch.ones_like(uniform))  # r ≡ 1 control
    assert set(oracle.unique().tolist()) <= {0.0, 1.0}  # the oracle's verdicts
    assert torch.equal(real_only, torch.zeros_like(real_only))  # synthetic term off


def test_feedback_table_and_verdict_are_reported(
    feedback: tuple[dict[str, Any], pathlib.Path],
) -> None:
    res, _ = feedback
    text = fb.table(res)
    for arm in fb.ARMS:
        assert fb.ARM_LABELS[arm] in text
    v = fb.verdict(res)
    assert v["holds"] in (True, False)
    assert len(v["delta_plausibility_pts"]) == 1


def test_feedback_overrides_are_typed() -> None:
    cfg = fb.with_overrides(
        fb.FeedbackConfig.tiny(),
        {"beta": "0.3", "ema": "false", "rounds": "2", "arms": "before,reward"},
    )
    assert (cfg.beta, cfg.ema, cfg.rounds, cfg.arms) == (0.3, False, 2, ("before", "reward"))
    with pytest.raises(SystemExit):
        fb.with_overrides(cfg, {"no_such_knob": "1"})


def test_adaptation_trains_the_parts_it_names(tmp_path: pathlib.Path) -> None:
    res = ad.run(ad.AdaptationConfig.tiny(), [0], tmp_path, quick=False, cache=tmp_path / "cache")
    (seed,) = res["per_seed"]
    assert set(seed["arms"]) == set(ad.ARMS)
    for arm in seed["arms"].values():
        assert set(arm["per_finding"]) == set(ad.FINDINGS)
        for v in arm["per_finding"].values():
            assert 0.0 <= v["detected"] <= 1.0
        assert math.isfinite(arm["fid"])
    for images in seed["examples"].values():
        _not_collapsed(images)
    base = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("t2i-abdomen"))
    # U-Net only: the text encoder is the base's; U-Net + text: both moved.
    assert _same(_state(tmp_path / "t2i-unet" / "text_encoder"), _state(base / "text_encoder"))
    assert not _same(
        _state(tmp_path / "t2i-unet_text" / "text_encoder"), _state(base / "text_encoder")
    )
    for arm in ("unet", "unet_text"):
        assert not _same(_state(tmp_path / f"t2i-{arm}" / "unet"), _state(base / "unet"))
        assert _same(_state(tmp_path / f"t2i-{arm}" / "vae"), _state(base / "vae"))
    # VAE arms: their VAE is the chest-tuned one, and the adaptation after it left that VAE
    # alone; the text encoder moved only where it was asked to.
    for arm in ("unet_vae", "unet_text_vae"):
        assert not _same(_state(tmp_path / f"t2i-{arm}" / "vae"), _state(base / "vae"))
        assert _same(
            _state(tmp_path / f"t2i-{arm}" / "vae"), _state(tmp_path / "t2i-chest-vae" / "vae")
        )
    assert _same(_state(tmp_path / "t2i-unet_vae" / "text_encoder"), _state(base / "text_encoder"))
    assert not _same(
        _state(tmp_path / "t2i-unet_text_vae" / "text_encoder"), _state(base / "text_encoder")
    )
    assert math.isfinite(res["vae_recon_mse_chest_adapted"])
    assert "U-Net + text encoder" in ad.table(res)
    v = ad.verdict(res)
    assert set(v["pairs"]) == {"unet_text - unet", "unet_text_vae - unet_vae"}
    for pair, (unet, text) in zip(v["pairs"].values(), ad.PAIRS, strict=True):
        arms = seed["arms"]
        want = 100 * (arms[text]["detected_mean"] - arms[unet]["detected_mean"])
        assert pair["delta_detected_pts"] == [pytest.approx(want)]
    assert v["best_arm"] not in ("real", "base") and 0 <= v["best_detected_pct"] <= 100


def test_adaptation_trains_only_the_arms_asked_for(tmp_path: pathlib.Path) -> None:
    from clinisynth_lab.benchmarks.methods_common import override

    cfg = override(ad.AdaptationConfig.tiny(), {"arms": "real,unet_vae"})
    res = ad.run(cfg, [0], tmp_path, quick=False, cache=tmp_path / "cache")
    assert set(res["per_seed"][0]["arms"]) == {"real", "base", "unet_vae"}
    assert not (tmp_path / "t2i-unet").exists() and (tmp_path / "t2i-unet_vae").is_dir()


def test_counterfactual_edits_every_direction_and_mode(tmp_path: pathlib.Path) -> None:
    cfg = cf.CounterfactualStudyConfig.tiny()
    res = cf.run(cfg, [0], tmp_path, quick=False, cache=tmp_path / "cache")
    (seed,) = res["per_seed"]
    assert set(seed["results"]) == {
        cf.arm_key(d, m, lam) for d in cf.DIRECTIONS for m, lam in cf.arms(cfg)
    }
    assert len(seed["results"]) == len(cf.DIRECTIONS) * (1 + 3 * len(cfg.lambda_c))
    for key, r in seed["results"].items():
        for name in ("flip_robust", "flip_plain", "flip_heldout", "share_in_mask", "mask_area"):
            assert 0.0 <= r[name] <= 1.0, (key, name)
        assert r["l2"] > 0  # the edit changed the image
        assert ("to_twin_ratio" in r) == key.startswith("lesion→healthy")
    for pair in seed["examples"].values():
        _not_collapsed(pair)
    assert "cone" in cf.table(res)


def test_main_writes_tables_json_and_contact_sheets(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    rc = methods.main(
        [
            "--tiny",
            "--seeds",
            "0",
            "--studies",
            "counterfactual",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ]
    )
    assert rc == 0
    text = (out / "methods.md").read_text()
    assert "Counterfactuals" in text and "| direction |" in text
    data = json.loads((out / "methods.json").read_text())["studies"]["counterfactual"]
    assert data["seeds"] == [0] and data["machine"]["cores"] >= 1
    assert data["per_seed"][0]["results"]
    assert (out / "counterfactual.md").read_text().strip() in text  # per-study files merge
    assert (out / "counterfactual-contact-sheet.png").stat().st_size > 0
    assert "rows top to bottom: " + ", ".join(sorted(cf.DIRECTIONS)) in text

    # Seeds run side by side (one process each) combine into one table with the spread.
    out1 = tmp_path / "out-seed1"
    assert (
        methods.main(
            [
                "--tiny",
                "--seeds",
                "1",
                "--studies",
                "counterfactual",
                "--out",
                str(out1),
                "--work",
                str(tmp_path / "work"),
            ]
        )
        == 0
    )
    both = tmp_path / "both"
    assert methods.main(["--combine", str(out), str(out1), "--out", str(both)]) == 0
    merged = json.loads((both / "methods.json").read_text())["studies"]["counterfactual"]
    assert merged["seeds"] == [0, 1]
    assert [s["seed"] for s in merged["per_seed"]] == [0, 1]
    assert "seeds [0, 1]" in (both / "counterfactual.md").read_text()
    assert "rows top to bottom: " in (both / "counterfactual.md").read_text()
    with pytest.raises(SystemExit, match="share seeds"):
        methods.main(["--combine", str(out), str(out), "--out", str(tmp_path / "dup")])


def test_the_command_prints_the_three_tables(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``clinisynth benchmark methods`` with every study, as the README runs it (tiny sizes)."""
    out = tmp_path / "out"
    assert (
        methods.main(
            ["--tiny", "--seeds", "0", "--out", str(out), "--work", str(tmp_path / "work")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    headers = {
        "feedback": ("## 1. Feedback", "| arm |"),
        "adaptation": ("## 2. Adaptation", "| model |"),
        "counterfactual": ("## 3. Counterfactuals", "| direction |"),
    }
    text = (out / "methods.md").read_text()
    for name, (title, table) in headers.items():
        section = (out / f"{name}.md").read_text()
        assert title in section and table in section
        assert section.strip() in text and title in printed
        assert (out / f"{name}-contact-sheet.png").stat().st_size > 0
    studies = json.loads((out / "methods.json").read_text())["studies"]
    assert set(studies) == set(headers)
    assert studies["adaptation"]["verdict"]["holds"] in (True, False)


def test_fidelity_kid_does_not_depend_on_the_feature_scale() -> None:
    from clinisynth_lab.benchmarks.methods_common import fidelity

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=gen).abs()
    fake = torch.randn(120, 16, generator=gen).abs() + 0.5
    small = fidelity(real, fake)
    large = fidelity(real * 300, fake * 300)
    assert small["kid_x1000"] > 0  # the shifted set is measurably different
    assert math.isclose(small["kid_x1000"], large["kid_x1000"], rel_tol=1e-3)
    same = fidelity(real, real.clone())
    assert abs(same["kid_x1000"]) < small["kid_x1000"] / 10
