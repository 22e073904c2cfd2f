"""Reward model r(x, y): shapes, checkpoint round trip, training beats chance, branch init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clinisynth_server.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from clinisynth_server.methods.backbones import build_backbone
from clinisynth_server.methods.classifier import Classifier, ClassifierConfig
from clinisynth_server.methods.reward_model import (
    RewardModel,
    RewardModelConfig,
    init_image_branch_from_classifier,
    train_reward_model,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small(**overrides: object) -> RewardModel:
    torch.manual_seed(0)
    cfg = {"num_classes": 3, "in_channels": 1, "backbone_width": 4, **overrides}
    return RewardModel(RewardModelConfig(**cfg))  # type: ignore[arg-type]


def test_class_conditioned_shapes() -> None:
    model = _small().eval()
    x = torch.rand(5, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 1, 0])
    assert model(x, y).shape == (5, 2)
    r = model.reward(x, y)
    assert r.shape == (5,)
    assert bool(((r > 0) & (r < 1)).all())
    # the published head: 1000 → 100 | one-hot → 100 | 200 → 32 → ReLU → 2
    assert (model.image_fc.out_features, model.image_proj.out_features) == (1000, 100)
    assert (model.label_proj.in_features, model.label_proj.out_features) == (3, 100)
    assert [m.__class__.__name__ for m in model.head] == ["Linear", "ReLU", "Linear"]
    assert (model.head[0].in_features, model.head[0].out_features) == (200, 32)
    assert model.head[2].out_features == 2


def test_text_conditioned_variant() -> None:
    model = _small(conditioning="text", text_dim=24, num_classes=0).eval()
    out = model.reward(torch.rand(2, 1, 16, 16), torch.randn(2, 24))
    assert out.shape == (2,)
    with pytest.raises(InvalidArgument):
        model(torch.rand(2, 1, 16, 16), torch.randn(2, 7))


def test_bad_labels_and_config_are_invalid_arguments() -> None:
    model = _small()
    with pytest.raises(InvalidArgument) as err:
        model(torch.rand(1, 1, 16, 16), torch.tensor([3]))
    assert err.value.violations[0].field == "labels"
    with pytest.raises(InvalidArgument) as err:
        RewardModelConfig(backbone="vgg")
    assert err.value.violations[0].field == "backbone"


def test_resnext50_is_the_torchvision_architecture() -> None:
    # torchvision's resnext50_32x4d has 25,028,904 parameters (3 channels, fc → 1000).
    backbone = build_backbone("resnext50", in_channels=3)
    fc = torch.nn.Linear(backbone.out_features, 1000)
    n = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in fc.parameters())
    assert n == 25_028_904
    model = RewardModel(RewardModelConfig(backbone="resnext50", in_channels=1, num_classes=23))
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32), torch.tensor([0, 22])).shape == (2, 2)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _small(conditioning="text", text_dim=8, num_classes=0).eval()
    x, e = torch.rand(3, 1, 16, 16), torch.randn(3, 8)
    folder = model.save(tmp_path / "rm")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = RewardModel.load(folder)
    assert loaded.config == model.config
    assert torch.equal(loaded(x, e), model(x, e))
    with pytest.raises(NotFound):
        RewardModel.load(tmp_path / "missing")
    Classifier(ClassifierConfig(in_channels=1)).save(tmp_path / "clf")
    with pytest.raises(FailedPrecondition):
        RewardModel.load(tmp_path / "clf")


def _toy_feedback(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 0 should be dark, class 1 bright: aligned iff the brightness matches the label."""
    g = torch.Generator().manual_seed(seed)
    bright = torch.rand(n, generator=g) < 0.5
    labels = torch.randint(0, 2, (n,), generator=g)
    level = torch.where(bright, 0.75, 0.25).view(-1, 1, 1, 1)
    images = (level + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    aligned = bright == labels.bool()
    return images, labels, aligned


def test_training_beats_chance_and_keeps_best_epoch() -> None:
    model = _small(num_classes=2)
    images, labels, aligned = _toy_feedback(320, seed=1)
    steps: list[int] = []
    metrics = train_reward_model(
        model,
        images,
        labels,
        aligned,
        epochs=12,
        lr=3e-3,
        batch_size=32,
        seed=0,
        val_fraction=0.25,
        on_step=lambda p: steps.append(p.step),
    )
    assert metrics.n_val == 80 and metrics.n_train == 240
    assert metrics.majority_baseline < 0.65
    assert metrics.best_val_accuracy >= 0.85
    assert metrics.best_val_accuracy == max(h.val_accuracy for h in metrics.history)
    assert steps == list(range(1, 12 * 8 + 1))
    # the kept weights are the best epoch's: re-evaluating reproduces its accuracy
    test_x, test_y, test_a = _toy_feedback(200, seed=2)
    with torch.no_grad():
        acc = float(((model.reward(test_x, test_y) > 0.5) == test_a).float().mean())
    assert acc >= 0.85


def test_weak_feedback_adds_negatives_and_stop_cancels() -> None:
    images, labels, aligned = _toy_feedback(64, seed=3)
    metrics = train_reward_model(
        _small(num_classes=2),
        images,
        labels,
        aligned,
        epochs=1,
        batch_size=32,
        seed=0,
        val_fraction=0.25,
        weak_feedback=True,
    )
    assert metrics.n_weak == int(
        aligned[torch.randperm(64, generator=torch.Generator().manual_seed(0))[16:]].sum()
    )
    with pytest.raises(Cancelled):
        train_reward_model(
            _small(num_classes=2),
            images,
            labels,
            aligned,
            epochs=3,
            batch_size=16,
            seed=0,
            val_fraction=0.25,
            on_step=lambda p: p.step < 2,
        )
    with pytest.raises(InvalidArgument):
        train_reward_model(
            _small(conditioning="text", text_dim=4, num_classes=0),
            images,
            torch.randn(64, 4),
            aligned,
            epochs=1,
            seed=0,
            weak_feedback=True,
        )


def test_image_branch_initialised_from_classifier(tmp_path: Path) -> None:
    torch.manual_seed(5)
    clf = Classifier(ClassifierConfig(num_classes=3, in_channels=1, backbone_width=4))
    model = _small()
    copied = init_image_branch_from_classifier(model, clf.save(tmp_path / "clf"))
    assert copied == len(clf.backbone.state_dict())
    for (name, a), (_, b) in zip(
        model.backbone.state_dict().items(), clf.backbone.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    other = Classifier(ClassifierConfig(num_classes=3, in_channels=1, backbone_width=8))
    with pytest.raises(FailedPrecondition):
        init_image_branch_from_classifier(model, other)
