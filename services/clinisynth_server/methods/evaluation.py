"""Evaluation of generated images against real ones (no Inception weights exist offline).

Features come from a classifier trained on real phantoms (its penultimate layer); on them:
- FID  (Fréchet distance of Gaussian fits) and KID (unbiased MMD², cubic polynomial kernel);
- precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020), from
  k-nearest-neighbour balls;
- MS-SSIM between images (intra-prompt diversity: lower = more diverse).
All functions take plain tensors / arrays, so the benchmark, tests and services share them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor


@torch.no_grad()
def features(extract: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 256) -> Tensor:
    """``extract`` applied in batches; returns (N, D) float64 features."""
    out = [
        extract(images[i : i + batch_size]).flatten(1).double()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    mu_r, mu_f = real.mean(0).numpy(), fake.mean(0).numpy()
    cov_r = np.cov(real.numpy(), rowvar=False)
    cov_f = np.cov(fake.numpy(), rowvar=False)
    covmean = linalg.sqrtm(cov_r @ cov_f)
    covmean = np.real(covmean[0] if isinstance(covmean, tuple) else covmean)
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean))


def kid(
    real: Tensor, fake: Tensor, subsets: int = 10, subset_size: int = 200, seed: int = 0
) -> tuple[float, float]:
    """Kernel inception distance (mean, std over subsets); k(x,y) = (x·y/d + 1)³."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    m = min(subset_size, real.shape[0], fake.shape[0])
    values = []
    for _ in range(subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (
            (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
        values.append(float(mmd))
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(x: Tensor, k: int) -> Tensor:
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def prdc(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls."""
    real_r = _knn_radii(real, k)
    fake_r = _knn_radii(fake, k)
    d_rf = torch.cdist(real, fake)  # (R, F)
    inside_real = d_rf < real_r[:, None]  # fake j inside the ball of real i
    precision = inside_real.any(0).double().mean()
    recall = (d_rf < fake_r[None, :]).any(1).double().mean()
    density = inside_real.double().sum(0).mean() / k
    coverage = (d_rf.min(1).values < real_r).double().mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "density": float(density),
        "coverage": float(coverage),
    }


def _gaussian_window(size: int, sigma: float, channels: int) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_parts(x: Tensor, y: Tensor, window: Tensor) -> tuple[Tensor, Tensor]:
    c1, c2 = 0.01**2, 0.03**2
    ch = x.shape[1]
    mu_x = F.conv2d(x, window, groups=ch)
    mu_y = F.conv2d(y, window, groups=ch)
    sxx = F.conv2d(x * x, window, groups=ch) - mu_x**2
    syy = F.conv2d(y * y, window, groups=ch) - mu_y**2
    sxy = F.conv2d(x * y, window, groups=ch) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x: Tensor, y: Tensor, *, scales: int | None = None, window: int = 7) -> Tensor:
    """Multi-scale SSIM of image pairs (B, C, H, W) in [0, 1]; scales adapt to small images."""
    x, y = x.double(), y.double()
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], dtype=torch.float64)
    max_scales = 1
    while min(x.shape[-2:]) // (2**max_scales) >= window and max_scales < 5:
        max_scales += 1
    n = min(scales or max_scales, max_scales)
    weights = weights[:n] / weights[:n].sum()
    win = _gaussian_window(window, 1.5, x.shape[1])
    values = []
    for s in range(n):
        ssim, cs = _ssim_parts(x, y, win)
        values.append(ssim.clamp(min=0) if s == n - 1 else cs.clamp(min=0))
        if s < n - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=1)  # (B, n)
    return torch.prod(stacked ** weights[None, :], dim=1)


def intra_set_ms_ssim(images: Tensor) -> float:
    """Mean MS-SSIM over all pairs of one set (4 images → 6 pairs, as RoentGen reports)."""
    n = images.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    a = torch.stack([images[i] for i, _ in pairs])
    b = torch.stack([images[j] for _, j in pairs])
    return float(ms_ssim(a, b).mean())
