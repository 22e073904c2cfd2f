"""Classifiers for counterfactual guidance: plain / PGD / TRADES training, temperature scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    fit_temperature,
    l2_attack,
    train_classifier,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 = bright, class 0 = dark, with texture noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    level = torch.where(labels.bool(), 0.65, 0.35).view(-1, 1, 1, 1)
    return (level + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), labels


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ClassifierConfig(num_classes=2, in_channels=1, backbone_width=4))


def test_plain_training_learns_and_calibrates(tmp_path: Path) -> None:
    x, y = _toy(256, 0)
    model = _model()
    metrics = train_classifier(
        model, x, y, epochs=6, lr=3e-3, batch_size=32, seed=0, val_fraction=0.25
    )
    test_x, test_y = _toy(200, 1)
    assert accuracy(model, test_x, test_y) >= 0.9
    assert metrics.val_nll_calibrated <= metrics.val_nll_uncalibrated + 1e-4
    assert metrics.temperature == pytest.approx(float(model.temperature))

    loaded = Classifier.load(model.save(tmp_path / "clf"))
    assert float(loaded.temperature) == pytest.approx(metrics.temperature)
    with torch.no_grad():
        assert torch.equal(loaded(test_x), model.eval()(test_x))


def test_fit_temperature_recovers_a_known_temperature() -> None:
    model = _model()
    model.eval()
    x = torch.rand(400, 1, 8, 8)
    with torch.no_grad():
        logits = model.raw_logits(x)
    # labels drawn from softmax(logits / 0.5) — the best temperature is about 0.5
    g = torch.Generator().manual_seed(0)
    scaled = (logits * 40) / 0.5  # sharpen raw logits so the labels carry signal
    model.head.weight.data *= 40
    model.head.bias.data *= 40
    y = torch.multinomial(scaled.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(model, x, y)
    assert 0.3 < t < 0.8


def test_l2_attack_stays_in_ball_and_raises_loss() -> None:
    x, y = _toy(16, 2)
    model = _model()
    train_classifier(model, x, y, epochs=2, lr=3e-3, batch_size=8, seed=0, val_fraction=0.0)
    model.eval()
    x_adv = l2_attack(
        model.raw_logits,
        x,
        lambda lg: F.cross_entropy(lg, y, reduction="sum"),
        eps=0.5,
        steps=5,
        step_size=0.25,
    )
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    with torch.no_grad():
        assert F.cross_entropy(model.raw_logits(x_adv), y) > F.cross_entropy(model.raw_logits(x), y)


@pytest.mark.parametrize("adversarial", ["pgd", "trades"])
def test_adversarial_training_runs_and_learns(adversarial: str) -> None:
    x, y = _toy(128, 3)
    model = _model()
    metrics = train_classifier(
        model,
        x,
        y,
        epochs=4,
        lr=3e-3,
        batch_size=32,
        seed=0,
        val_fraction=0.25,
        adversarial=adversarial,
        eps=0.3,
        attack_steps=3,
    )
    assert len(metrics.history) == 4
    assert metrics.val_accuracy >= 0.75


def test_bad_settings_are_invalid_arguments() -> None:
    x, y = _toy(8, 0)
    with pytest.raises(InvalidArgument) as err:
        train_classifier(_model(), x, y, epochs=1, adversarial="fgsm")
    assert err.value.violations[0].field == "adversarial"
    with pytest.raises(InvalidArgument):
        ClassifierConfig(num_classes=1)
