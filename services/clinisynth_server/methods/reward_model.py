"""The feedback method's reward model r(x, y) (docs/METHODS.md §1).

Architecture (AlaaLab/pathologist-in-the-loop)::

    x ─ backbone ─ Linear(F, 1000) ─ Linear(1000, 100) ─┐
                                                        ├ cat ─ Linear(200,32) ─ ReLU ─ Linear(32,2)
    y ─ one-hot(K) ─ Linear(K, 100) ────────────────────┘

The label branch of the text-conditioned variant (prompt-conditioned generators) is
``Linear(text_dim, 100)`` of a text embedding vector (e.g. a pooled sentence / CLIP embedding).

Training targets are ``[1, 0]`` (aligned) and ``[0, 1]`` (not aligned) with an MSE loss on the two
outputs, as in the original code; the scalar reward is ``P(aligned) = softmax(logits)[0]``. (With
MSE on the raw outputs, a perfectly fitted model gives rewards near softmax([1, 0])[0] ≈ 0.73 and
0.27 — the mean rewards the first probe reported, FINDINGS.md.)

Images enter in [0, 1], ``(B, C, H, W)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinisynth_server.errors import FailedPrecondition, InvalidArgument
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
from clinisynth_server.methods.classifier import Classifier

KIND: Final = "reward_model"
CONDITIONINGS: Final[tuple[str, ...]] = ("class", "text")


@dataclass(frozen=True)
class RewardModelConfig:
    """Everything needed to rebuild the network (weights excluded)."""

    conditioning: str = "class"  # "class": one-hot labels; "text": embedding vectors
    num_classes: int = 2  # K, for conditioning="class"
    text_dim: int = 0  # embedding size, for conditioning="text"
    in_channels: int = 3
    backbone: str = "small_cnn"  # see backbones.BACKBONES
    backbone_width: int = 16  # small_cnn only
    image_features: int = 1000  # the ImageNet-logit layer of the original
    branch_dim: int = 100
    hidden_dim: int = 32

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise InvalidArgument.for_field(
                "conditioning", f"{self.conditioning!r} is not one of {', '.join(CONDITIONINGS)}"
            )
        if self.backbone not in BACKBONES:
            raise InvalidArgument.for_field(
                "backbone", f"unknown backbone {self.backbone!r}; valid: {', '.join(BACKBONES)}"
            )
        if self.conditioning == "class" and self.num_classes < 2:
            raise InvalidArgument.for_field("num_classes", f"must be ≥ 2, got {self.num_classes}")
        if self.conditioning == "text" and self.text_dim < 1:
            raise InvalidArgument.for_field("text_dim", f"must be ≥ 1, got {self.text_dim}")


class RewardModel(nn.Module):
    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, config.in_channels, config.backbone_width)
        self.image_fc = nn.Linear(self.backbone.out_features, config.image_features)
        self.image_proj = nn.Linear(config.image_features, config.branch_dim)
        label_in = config.num_classes if config.conditioning == "class" else config.text_dim
        self.label_proj = nn.Linear(label_in, config.branch_dim)
        self.head = nn.Sequential(
            nn.Linear(2 * config.branch_dim, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, 2),
        )

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Logits ``(B, 2)``: index 0 = aligned, 1 = not aligned.

        ``labels``: ``(B,)`` int class ids, or ``(B, text_dim)`` embeddings for text conditioning.
        """
        h_img = self.image_proj(self.image_fc(self.backbone(images * 2 - 1)))
        h_lab = self.label_proj(self._label_input(labels, images.dtype))
        return self.head(torch.cat([h_img, h_lab], dim=1))

    def reward(self, images: Tensor, labels: Tensor) -> Tensor:
        """r(x, y) = P(aligned) ∈ (0, 1), shape ``(B,)``."""
        return self(images, labels).softmax(dim=1)[:, 0]

    def _label_input(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        if self.config.conditioning == "class":
            if labels.ndim != 1:
                raise InvalidArgument.for_field("labels", "class labels must be a 1-D int tensor")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_classes):
                raise InvalidArgument.for_field(
                    "labels", f"class ids must be in [0, {self.config.num_classes})"
                )
            return F.one_hot(labels.long(), self.config.num_classes).to(dtype)
        if labels.ndim != 2 or labels.shape[1] != self.config.text_dim:
            raise InvalidArgument.for_field(
                "labels",
                f"text embeddings must be (B, {self.config.text_dim}), got {tuple(labels.shape)}",
            )
        return labels.to(dtype)

    def save(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, KIND, asdict(self.config), self)

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> RewardModel:
        config, state = read_checkpoint(directory, KIND, map_location)
        model = cls(RewardModelConfig(**config))
        model.load_state_dict(state)
        return model.to(map_location).eval()


def init_image_branch_from_classifier(
    model: RewardModel, classifier: Classifier | str | Path
) -> int:
    """Copy a trained classifier's backbone (a model or a checkpoint folder) into the image branch.

    The first probe of the method found this decisive: from scratch on ~500 labels the reward
    model reached 65 % held-out accuracy, initialised from a classifier on real images 86 %.
    Returns the number of tensors copied.
    """
    if not isinstance(classifier, Classifier):
        classifier = Classifier.load(classifier)
    mine, theirs = model.config, classifier.config
    if (mine.backbone, mine.in_channels, mine.backbone_width) != (
        theirs.backbone,
        theirs.in_channels,
        theirs.backbone_width,
    ):
        raise FailedPrecondition(
            "classifier backbone does not match the reward model's image branch: "
            f"{(theirs.backbone, theirs.in_channels, theirs.backbone_width)} vs "
            f"{(mine.backbone, mine.in_channels, mine.backbone_width)}"
        )
    state = classifier.backbone.state_dict()
    model.backbone.load_state_dict(state)
    return len(state)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float


@dataclass(frozen=True)
class RewardTrainingMetrics:
    best_epoch: int  # 0-based epoch whose weights were kept
    best_val_accuracy: float  # NaN without a validation split
    majority_baseline: float  # accuracy of always predicting the majority label on validation
    n_train: int  # expert-labelled training examples
    n_weak: int  # weak-feedback negatives added to training
    n_val: int
    history: tuple[EpochMetrics, ...]


def train_reward_model(
    model: RewardModel,
    images: Tensor,
    labels: Tensor,
    aligned: Tensor,
    *,
    epochs: int = 30,
    lr: float = 1e-4,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.2,
    weak_feedback: bool = False,
    real_images: Tensor | None = None,
    real_labels: Tensor | None = None,
    freeze_backbone: bool = False,
    on_step: ProgressCallback | None = None,
) -> RewardTrainingMetrics:
    """Fit r(x, y) on expert labels; keep the weights of the best validation epoch (in place).

    ``images`` (N, C, H, W) in [0, 1]; ``labels`` (N,) class ids or (N, D) text embeddings;
    ``aligned`` (N,) bool (the expert's verdict). Adam + cosine LR, MSE to [1,0] / [0,1].
    ``weak_feedback``: add real images paired with a *wrong* class as negatives (class
    conditioning only) — ``real_images`` / ``real_labels`` if given, else the training split's
    aligned images. Negatives go to training only; validation stays expert-labelled.
    ``freeze_backbone``: train only the heads (e.g. after
    :func:`init_image_branch_from_classifier`).
    """
    # 1. Validate and split.
    n = images.shape[0]
    if not (labels.shape[0] == aligned.shape[0] == n) or n < 2:
        raise InvalidArgument.for_field(
            "images", f"need ≥ 2 examples with one label and one verdict each, got {n}"
        )
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)):
        check_positive(name, value)
    if weak_feedback and model.config.conditioning != "class":
        raise InvalidArgument.for_field(
            "weak_feedback", "needs class conditioning (a wrong class must exist)"
        )
    device = next(model.parameters()).device
    aligned = aligned.bool()
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    x_tr, y_tr, a_tr = images[train_idx], labels[train_idx], aligned[train_idx]
    x_val, y_val, a_val = images[val_idx], labels[val_idx], aligned[val_idx]

    # 2. Weak feedback: (real image, wrong class) pairs are "not aligned".
    gen = torch.Generator().manual_seed(seed)
    n_weak = 0
    if weak_feedback:
        if real_images is not None and real_labels is not None:
            x_w, y_w = real_images, real_labels
        else:
            x_w, y_w = x_tr[a_tr], y_tr[a_tr]
        k = model.config.num_classes
        y_wrong = (y_w.long() + torch.randint(1, k, (len(y_w),), generator=gen)) % k
        n_weak = len(y_w)
        x_tr = torch.cat([x_tr, x_w.to(x_tr.dtype)])
        y_tr = torch.cat([y_tr.long(), y_wrong])
        a_tr = torch.cat([a_tr, torch.zeros(n_weak, dtype=torch.bool)])

    # 3. Optimiser: Adam, cosine decay over all steps.
    for p in model.backbone.parameters():
        p.requires_grad_(not freeze_backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    per_epoch = steps_per_epoch(len(x_tr), batch_size)
    total = per_epoch * epochs
    lr_sched = cosine_lr(optimizer, total)

    def targets(a: Tensor) -> Tensor:  # [1, 0] aligned, [0, 1] not aligned
        return F.one_hot((~a).long(), 2).float().to(device)

    # 4. Epochs; keep the best validation accuracy (ties → the later, better-trained epoch).
    history: list[EpochMetrics] = []
    best_acc, best_epoch, best_state = -math.inf, 0, None
    step = 0
    for epoch in range(epochs):
        model.train()
        if freeze_backbone:
            model.backbone.eval()
        running, seen = 0.0, 0
        for idx in batches(len(x_tr), batch_size, gen):
            logits = model(x_tr[idx].to(device), y_tr[idx].to(device))
            loss = F.mse_loss(logits, targets(a_tr[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_sched.step()
            step += 1
            running += loss.item() * len(idx)
            seen += len(idx)
            report(on_step, TrainProgress(epoch, step, total, loss.item()))
        val_loss, val_acc = _evaluate(model, x_val, y_val, a_val, batch_size, device)
        history.append(EpochMetrics(epoch, running / max(seen, 1), val_loss, val_acc))
        score = val_acc if len(val_idx) else float(epoch)  # no validation: keep the last epoch
        if score >= best_acc:
            best_acc, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())

    # 5. Restore the best weights.
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    majority = (
        float(max(a_val.float().mean().item(), 1 - a_val.float().mean().item()))
        if len(val_idx)
        else math.nan
    )
    return RewardTrainingMetrics(
        best_epoch=best_epoch,
        best_val_accuracy=history[best_epoch].val_accuracy,
        majority_baseline=majority,
        n_train=len(train_idx),
        n_weak=n_weak,
        n_val=len(val_idx),
        history=tuple(history),
    )


@torch.no_grad()
def _evaluate(
    model: RewardModel, x: Tensor, y: Tensor, a: Tensor, batch_size: int, device: torch.device
) -> tuple[float, float]:
    if len(x) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb, ab = (t[start : start + batch_size] for t in (x, y, a))
        logits = model(xb.to(device), yb.to(device))
        target = F.one_hot((~ab).long(), 2).float().to(device)
        loss_sum += F.mse_loss(logits, target, reduction="sum").item() / 2
        correct += int(((logits.argmax(1) == 0).cpu() == ab).sum())
    return loss_sum / len(x), correct / len(x)
