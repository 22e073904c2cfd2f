"""Image classifiers for the counterfactual method (docs/METHODS.md §4) and reward-branch init.

Two are needed: a plain one (cross-entropy) and an adversarially robust one (PGD in an L2 ball, or
TRADES), both temperature-scaled on a validation split so their probabilities are comparable when
the counterfactual loop reports them. Images enter in [0, 1], ``(B, C, H, W)``.

Legend
    ε        radius of the L2 threat ball ‖δ‖₂ ≤ ε
    β        TRADES trade-off: CE(f(x), y) + β·KL(p(x) ‖ p(x + δ))
    T        temperature: p = softmax(logits / T), fit by minimising validation NLL
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods._checkpoint import read_checkpoint, save_checkpoint
from clinisynth_server.methods._training import (
    ProgressCallback,
    TrainProgress,
    batches,
    check_positive,
    cosine_lr,
    report,
    split_indices,
    steps_per_epoch,
)
from clinisynth_server.methods.backbones import BACKBONES, build_backbone

KIND: Final = "classifier"
ADVERSARIAL: Final[tuple[str, ...]] = ("none", "pgd", "trades")


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int = 2
    in_channels: int = 3
    backbone: str = "small_cnn"  # see backbones.BACKBONES
    backbone_width: int = 16  # small_cnn only

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InvalidArgument.for_field(
                "backbone", f"unknown backbone {self.backbone!r}; valid: {', '.join(BACKBONES)}"
            )
        if self.num_classes < 2:
            raise InvalidArgument.for_field("num_classes", f"must be ≥ 2, got {self.num_classes}")


class Classifier(nn.Module):
    """Backbone → Linear(num_classes); logits divided by the fitted temperature T."""

    temperature: Tensor  # a registered buffer, so it moves with .to() and lands in the state dict

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, config.in_channels, config.backbone_width)
        self.head = nn.Linear(self.backbone.out_features, config.num_classes)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, images: Tensor) -> Tensor:
        """Calibrated logits ``(B, num_classes)``."""
        return self.raw_logits(images) / self.temperature

    def raw_logits(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images * 2 - 1))

    def save(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, KIND, asdict(self.config), self)

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
        config, state = read_checkpoint(directory, KIND, map_location)
        model = cls(ClassifierConfig(**config))
        model.load_state_dict(state)
        return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------


def _unit_l2(g: Tensor) -> Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.ndim - 1)))


def _project_l2(delta: Tensor, eps: float) -> Tensor:
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norm).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def l2_attack(
    logits_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    *,
    eps: float,
    steps: int,
    step_size: float,
    init_std: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Maximise ``objective(logits_fn(x + δ))`` over ‖δ‖₂ ≤ ε, x + δ ∈ [0, 1] (normalised steps)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    delta = _project_l2(init_std * noise, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = objective(logits_fn((x + delta).clamp(0, 1)))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = _project_l2(delta.detach() + step_size * _unit_l2(grad), eps)
    return (x + delta).clamp(0, 1).detach()


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierTrainingMetrics:
    best_epoch: int
    val_accuracy: float  # clean accuracy of the kept weights (NaN without validation)
    val_nll_uncalibrated: float
    val_nll_calibrated: float
    temperature: float
    history: tuple[tuple[float, float], ...]  # (train loss, val accuracy) per epoch


def train_classifier(
    model: Classifier,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
    adversarial: str = "none",
    eps: float = 0.5,
    attack_steps: int = 7,
    attack_step_size: float | None = None,
    trades_beta: float = 6.0,
    calibrate: bool = True,
    on_step: ProgressCallback | None = None,
) -> ClassifierTrainingMetrics:
    """Train in place; keep the best validation epoch; fit T on the validation split.

    ``adversarial``: ``"none"`` (cross-entropy), ``"pgd"`` (Madry: CE on the worst-case x + δ in
    the L2 ball of radius ``eps``) or ``"trades"`` (CE(x) + β·KL(p(x) ‖ p(x + δ))).
    ``attack_step_size`` defaults to 2.5·ε / steps.
    """
    # 1. Validate and split.
    n = images.shape[0]
    if labels.shape[0] != n or n < 2:
        raise InvalidArgument.for_field("images", f"need ≥ 2 labelled images, got {n}")
    if adversarial not in ADVERSARIAL:
        raise InvalidArgument.for_field(
            "adversarial", f"{adversarial!r} is not one of {', '.join(ADVERSARIAL)}"
        )
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("eps", eps)):
        check_positive(name, value)
    device = next(model.parameters()).device
    labels = labels.long()
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    x_tr, y_tr = images[train_idx], labels[train_idx]
    x_val, y_val = images[val_idx], labels[val_idx]
    step_size = attack_step_size or 2.5 * eps / max(attack_steps, 1)
    gen = torch.Generator().manual_seed(seed)

    # 2. Optimiser: Adam + cosine LR; the temperature is reset (training sees raw logits).
    model.temperature.fill_(1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = steps_per_epoch(len(x_tr), batch_size) * epochs
    lr_sched = cosine_lr(optimizer, total)

    # 3. Epochs.
    history: list[tuple[float, float]] = []
    best_acc, best_epoch, best_state = -math.inf, 0, None
    step = 0
    for epoch in range(epochs):
        running, seen = 0.0, 0
        for idx in batches(len(x_tr), batch_size, gen):
            x, y = x_tr[idx].to(device), y_tr[idx].to(device)
            loss = _batch_loss(
                model, x, y, adversarial, eps, attack_steps, step_size, trades_beta, gen
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_sched.step()
            step += 1
            running += loss.item() * len(idx)
            seen += len(idx)
            report(on_step, TrainProgress(epoch, step, total, loss.item()))
        acc = accuracy(model, x_val, y_val, batch_size) if len(val_idx) else math.nan
        history.append((running / max(seen, 1), acc))
        score = acc if len(val_idx) else float(epoch)
        if score >= best_acc:
            best_acc, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())

    # 4. Best weights, then temperature scaling on the validation split.
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    nll_before = nll_after = math.nan
    if len(val_idx):
        nll_before = _nll(model, x_val, y_val, batch_size)
        if calibrate:
            fit_temperature(model, x_val, y_val, batch_size=batch_size)
        nll_after = _nll(model, x_val, y_val, batch_size)
    return ClassifierTrainingMetrics(
        best_epoch=best_epoch,
        val_accuracy=history[best_epoch][1],
        val_nll_uncalibrated=nll_before,
        val_nll_calibrated=nll_after,
        temperature=float(model.temperature),
        history=tuple(history),
    )


def _batch_loss(
    model: Classifier,
    x: Tensor,
    y: Tensor,
    adversarial: str,
    eps: float,
    steps: int,
    step_size: float,
    beta: float,
    gen: torch.Generator,
) -> Tensor:
    if adversarial == "none":
        model.train()
        return F.cross_entropy(model.raw_logits(x), y)
    model.eval()  # attack against fixed BatchNorm statistics
    if adversarial == "pgd":
        x_adv = l2_attack(
            model.raw_logits,
            x,
            lambda lg: F.cross_entropy(lg, y, reduction="sum"),
            eps=eps,
            steps=steps,
            step_size=step_size,
            generator=gen,
        )
        model.train()
        return F.cross_entropy(model.raw_logits(x_adv), y)
    # TRADES
    with torch.no_grad():
        p_clean = F.softmax(model.raw_logits(x), dim=1)
    x_adv = l2_attack(
        model.raw_logits,
        x,
        lambda lg: F.kl_div(F.log_softmax(lg, dim=1), p_clean, reduction="sum"),
        eps=eps,
        steps=steps,
        step_size=step_size,
        generator=gen,
    )
    model.train()
    logits = model.raw_logits(torch.cat([x, x_adv]))
    clean, adv = logits.chunk(2)
    kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return F.cross_entropy(clean, y) + beta * kl


@torch.no_grad()
def accuracy(model: Classifier, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


@torch.no_grad()
def _raw_logits(model: Classifier, images: Tensor, batch_size: int) -> Tensor:
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model.raw_logits(images[s : s + batch_size].to(device))
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).float()


def _nll(model: Classifier, images: Tensor, labels: Tensor, batch_size: int) -> float:
    logits = _raw_logits(model, images, batch_size) / model.temperature.float()
    return float(F.cross_entropy(logits, labels.long().to(logits.device)))


def fit_temperature(
    model: Classifier, images: Tensor, labels: Tensor, *, batch_size: int = 256
) -> float:
    """Temperature scaling (Guo et al. 2017): T = argmin NLL(softmax(z / T)); sets and returns T."""
    logits = _raw_logits(model, images, batch_size)
    target = labels.long().to(logits.device)
    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(0.05, 20.0))
    model.temperature.fill_(t)
    return t
