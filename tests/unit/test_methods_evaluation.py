"""Evaluation metrics behave as their definitions say on data with known answers."""

from __future__ import annotations

import torch

from clinisynth_server.methods import evaluation as ev


def test_fid_zero_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    same = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    assert ev.fid(real, same) < 0.05
    shifted = same + 1.0
    assert abs(ev.fid(real, shifted) - 8.0) < 0.5  # ‖Δμ‖² = 8 · 1²


def test_kid_near_zero_for_same_and_positive_for_different():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(600, 16, generator=g, dtype=torch.float64)
    same = torch.randn(600, 16, generator=g, dtype=torch.float64)
    mean_same, _ = ev.kid(real, same)
    mean_diff, _ = ev.kid(real, same * 2 + 0.5)
    assert abs(mean_same) < 0.05 and mean_diff > 10 * max(abs(mean_same), 1e-3)


def test_prdc_detects_mode_collapse_and_shift():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 4, generator=g, dtype=torch.float64)
    good = torch.randn(500, 4, generator=g, dtype=torch.float64)
    collapsed = real[:20].repeat(25, 1) + 0.01 * torch.randn(
        500, 4, generator=g, dtype=torch.float64
    )
    far = good + 10
    r_good, r_col, r_far = ev.prdc(real, good), ev.prdc(real, collapsed), ev.prdc(real, far)
    assert r_good["precision"] > 0.7 and r_good["recall"] > 0.7 and r_good["coverage"] > 0.8
    assert r_col["recall"] < 0.3 and r_col["coverage"] < 0.3 and r_col["precision"] > 0.9
    assert r_far["precision"] == 0 and r_far["coverage"] == 0


def test_ms_ssim_identity_one_and_orders_by_similarity():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 64, 64, generator=g)
    assert torch.allclose(ev.ms_ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-6)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    unrelated = torch.rand(3, 1, 64, 64, generator=g)
    assert (ev.ms_ssim(x, slightly) > ev.ms_ssim(x, unrelated)).all()
    same_set = x[:1].repeat(4, 1, 1, 1)
    mixed = torch.cat([x, unrelated[:1]])
    assert ev.intra_set_ms_ssim(same_set) > 0.99
    assert ev.intra_set_ms_ssim(mixed) < 0.5
