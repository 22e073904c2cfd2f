"""Counterfactual service pieces without servers: validation, input checks, maps, Triton roles
run in-process (the same Backend objects Triton runs), the guidance model folder."""

from __future__ import annotations

import io
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.counterfactual import guidance
from clinisynth_server.counterfactual.options import CounterfactualOptions, validate
from clinisynth_server.counterfactual.service import (
    from_model_space,
    overlay_png,
    pixel_distance,
    prepare_input,
    to_model_space,
)
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.methods import counterfactual as cf
from clinisynth_server.store import open_store


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _record(
    name: str,
    kind: str,
    *,
    robust: bool | None = None,
    domain: str = "eye",
    classes: list[str] | None = None,
    channels: int = 1,
    size: int = 16,
) -> ModelRecord:
    labels = {"domain": domain}
    if robust is not None:
        labels["robust"] = "true" if robust else "false"
    role = "classifier" if kind == "classifier" else "denoiser"
    return ModelRecord(
        name=name,
        version=1,
        kind=kind,
        components={role: f"{name}.{role}"},
        component_versions={role: 1},
        classes=classes or ([] if role == "denoiser" else ["healthy", "lesion"]),
        width=size,
        height=size,
        channels=channels,
        digest="d" * 64,
        labels=labels,
        scheduler={"num_train_timesteps": 1000} if role == "denoiser" else {},
    )


@pytest.fixture()
def catalog(tmp_path: pathlib.Path) -> Catalog:
    cat = Catalog(open_store(str(tmp_path / "store")), ttl_s=0)
    for rec in (
        _record("eye-den", "unconditional"),
        _record("eye-robust", "classifier", robust=True),
        _record("eye-plain", "classifier", robust=False),
        _record("xr-den", "unconditional", domain="chest"),
        _record(
            "xr-robust", "classifier", robust=True, domain="chest", classes=["normal", "effusion"]
        ),
        _record(
            "xr-plain", "classifier", robust=False, domain="chest", classes=["normal", "effusion"]
        ),
        _record("rgb-plain", "classifier", robust=False, domain="eye", channels=3),
    ):
        cat.put(rec)
    return cat


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


def test_published_defaults_and_start_depth_semantics(catalog: Catalog) -> None:
    plan = validate(
        CounterfactualOptions(
            target_class="lesion", diffusion_model="eye-den", plain_classifier="eye-plain"
        ),
        catalog,
    )
    c = plan.config
    assert (c.steps, c.lambda_c, c.alpha_deg, c.distance, c.lambda_d, c.mode) == (
        200,
        0.1,
        30.0,
        "l2",
        0.5,
        "cone",
    )
    assert plan.start_depth == 0.5 and c.reverse_steps == 100
    assert plan.target_index == 1 and plan.robust.name == "eye-robust"
    l1 = validate(
        CounterfactualOptions(
            target_class="lesion",
            diffusion_model="eye-den",
            plain_classifier="eye-plain",
            distance="l1",
            start_depth=0.8,
            steps=50,
        ),
        catalog,
    )
    assert l1.config.lambda_d == 0.15
    assert l1.config.reverse_steps == 10  # 80 % of the chain skipped
    assert l1.knobs["reverse_steps"] == "10" and l1.knobs["start_depth"] == "0.8"


def test_models_resolve_by_domain_and_target(catalog: Catalog) -> None:
    plan = validate(
        CounterfactualOptions(target_class="effusion", plain_classifier="xr-plain"), catalog
    )
    assert (plan.denoiser.name, plan.robust.name) == ("xr-den", "xr-robust")
    by_target = validate(CounterfactualOptions(target_class="effusion"), catalog)
    assert by_target.denoiser.name == "xr-den"
    with pytest.raises(InvalidArgument) as err:  # two plain eye classifiers fit
        validate(CounterfactualOptions(target_class="lesion", diffusion_model="eye-den"), catalog)
    assert [v.field for v in err.value.violations] == ["plain_classifier.name"]


@pytest.mark.parametrize(
    ("knobs", "fields"),
    [
        ({"target_class": ""}, {"target_class"}),
        ({"target_class": "tumour"}, {"target_class"}),
        ({"start_depth": 0.0}, {"start_depth"}),
        ({"start_depth": 1.0}, {"start_depth"}),
        ({"cone_angle_deg": 90.0}, {"cone_angle_deg"}),
        ({"lambda_c": math.inf, "lambda_d": -0.1}, {"lambda_c", "lambda_d"}),
        ({"steps": 1001}, {"steps"}),
        ({"mode": "both"}, {"mode"}),
        ({"distance": "l3"}, {"distance"}),
        ({"seed": -1}, {"seed"}),
        ({"format": "jpeg"}, {"format"}),
        ({"output_prefix": "../x"}, {"output_prefix"}),
        ({"robust_classifier": "eye-plain"}, {"robust_classifier.name"}),
        ({"plain_classifier": "rgb-plain"}, {"plain_classifier.name"}),
        ({"plain_classifier": "xr-plain"}, {"plain_classifier.name"}),
        ({"diffusion_model": "eye-robust"}, {"diffusion_model.name"}),
        ({"diffusion_model": "eye-den", "diffusion_version": "9"}, {"diffusion_model.version"}),
    ],
)
def test_every_bad_field_is_named(catalog: Catalog, knobs: dict, fields: set[str]) -> None:
    base = {"target_class": "lesion", "diffusion_model": "eye-den", "plain_classifier": "eye-plain"}
    with pytest.raises(InvalidArgument) as err:
        validate(CounterfactualOptions(**{**base, **knobs}), catalog)
    assert {v.field for v in err.value.violations} == fields


# ---------------------------------------------------------------------------------------------
# input checks and maps
# ---------------------------------------------------------------------------------------------


def test_prepare_input_checks_channels_size_and_range() -> None:
    den = _record("d", "unconditional")
    ok, resized = prepare_input(np.full((16, 16, 1), 0.5, np.float32), den, resize=False)
    assert ok.shape == (16, 16) and not resized
    for bad, words in (
        (np.full((16, 16, 3), 0.5, np.float32), "channel"),
        (np.full((20, 16), 0.5, np.float32), "resize"),
        (np.full((16, 16), 1.5, np.float32), "[0, 1]"),
        (np.full((16, 16), np.nan, np.float32), "NaN"),
    ):
        with pytest.raises(InvalidArgument) as err:
            prepare_input(bad, den, resize=False, field="image")
        assert err.value.violations[0].field == "image" and words in err.value.message
    big, resized = prepare_input(np.full((40, 32), 0.25, np.float32), den, resize=True)
    assert big.shape == (16, 16) and resized and np.allclose(big, 0.25, atol=1e-5)


def test_model_space_round_trip_and_distances() -> None:
    gray, rgb = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    x = to_model_space([gray])
    assert x.shape == (1, 1, 8, 8) and float(x.min()) >= -1
    np.testing.assert_allclose(from_model_space(x)[0], gray, atol=1e-6)
    x3 = to_model_space([np.stack([rgb] * 3, axis=2)])
    assert x3.shape == (1, 3, 8, 8)
    d = np.full((4, 4), 0.1, np.float32)
    d[0, 0] = -0.5
    assert pixel_distance(d, "l1") == pytest.approx((15 * 0.1 + 0.5) / 16)
    assert pixel_distance(d, "l2") == pytest.approx(math.sqrt((15 * 0.01 + 0.25) / 16))


def test_overlay_marks_brighter_red_and_darker_blue() -> None:
    image = np.full((8, 8), 0.5, np.float32)
    diff = np.zeros((8, 8), np.float32)
    diff[1, 1], diff[6, 6] = 0.4, -0.4
    rgb = np.asarray(Image.open(io.BytesIO(overlay_png(image, diff))))
    assert rgb.shape == (8, 8, 3)
    assert rgb[1, 1, 0] > 200 and rgb[1, 1, 2] < 60  # red
    assert rgb[6, 6, 2] > 200 and rgb[6, 6, 0] < 60  # blue
    assert rgb[3, 3, 0] == rgb[3, 3, 1] == rgb[3, 3, 2]  # unchanged: gray
    tiny = np.asarray(Image.open(io.BytesIO(overlay_png(image, diff * 0.01))))
    assert tiny[1, 1, 0] - tiny[1, 1, 1] < 30  # noise-level edits stay faint


# ---------------------------------------------------------------------------------------------
# Triton roles, in-process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_folders(tmp_path_factory: pytest.TempPathFactory):
    from clinisynth_lab.toy import build_toy_models

    return build_toy_models(tmp_path_factory.mktemp("toy"), train=False)


def test_classifier_role_matches_the_module(toy_folders) -> None:
    from clinisynth_server.methods.classifier import Classifier
    from clinisynth_server.triton.backends import classifier as role

    spec = role.model_spec(toy_folders.plain, {})
    assert [t.name for t in spec.inputs] == ["images"] and spec.outputs[0].dims == (2,)
    backend = role.Backend(toy_folders.plain, {})
    x = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = Classifier.load(toy_folders.plain)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend({"images": x})["logits"], want, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        backend({"images": np.zeros((1, 3, 16, 16), np.float32)})


def test_guidance_folder_and_role_wrap_guidance_gradients(toy_folders, tmp_path) -> None:
    from clinisynth_server.methods.sampling import unet_eps_fn
    from clinisynth_server.triton.backends import cf_guidance as role
    from clinisynth_server.triton.backends._base import BackendInputError

    folder = guidance.write_guidance_folder(
        tmp_path / "w",
        toy_folders.denoiser / "unet",
        toy_folders.robust,
        toy_folders.plain,
        channels=1,
        classes=["healthy", "lesion"],
        sources={"diffusion_model": "d@1"},
    )
    meta = json.loads((folder / "config.json").read_text())
    assert meta["kind"] == "cf_guidance" and meta["learned_variance"] is False
    spec = role.model_spec(folder, {})
    assert [t.name for t in spec.inputs] == [
        "x_t",
        "timestep",
        "alpha_bar",
        "x0",
        "target",
        "distance",
    ]
    backend = role.Backend(folder, {})
    rng = np.random.default_rng(1)
    x_t = rng.standard_normal((3, 1, 16, 16)).astype(np.float32)
    x0 = (rng.random((3, 1, 16, 16)) * 2 - 1).astype(np.float32)
    t = np.array([300.0, 300.0, 100.0], np.float32)
    ab = np.array([0.3, 0.3, 0.8], np.float32)
    target = np.array([1, 0, 1])
    codes = np.array([0, 1, 0])  # mixed L2 / L1 rows in one batch
    out = backend(
        {"x_t": x_t, "timestep": t, "alpha_bar": ab, "x0": x0, "target": target, "distance": codes}
    )
    for row, kind in ((0, "l2"), (1, "l1"), (2, "l2")):
        ref = cf.guidance_gradients(
            unet_eps_fn(backend.unet),
            backend.robust,
            backend.plain,
            torch.from_numpy(x_t[row : row + 1]),
            torch.from_numpy(t[row : row + 1]),
            torch.from_numpy(x0[row : row + 1]),
            torch.from_numpy(target[row : row + 1]),
            alpha_bar_t=torch.from_numpy(ab[row : row + 1]),
            distance_kind=kind,
        )
        for name in ("eps", "x0_hat", "g_r", "g_p", "g_d", "logits_robust", "logits_plain"):
            np.testing.assert_allclose(
                out[name][row], getattr(ref, name)[0].numpy(), rtol=1e-4, atol=1e-5, err_msg=name
            )
    with pytest.raises(BackendInputError, match="target"):
        backend(
            {
                "x_t": x_t,
                "timestep": t,
                "alpha_bar": ab,
                "x0": x0,
                "target": np.array([0, 1, 2]),
                "distance": codes,
            }
        )


def test_guidance_model_name_is_stable_and_version_sensitive() -> None:
    den, rob, pla = (
        _record("d", "unconditional"),
        _record("r", "classifier", robust=True),
        _record("p", "classifier", robust=False),
    )
    name = guidance.guidance_model_name(den, rob, pla)
    assert name == guidance.guidance_model_name(den, rob, pla) and name.startswith("d.cf_guidance.")
    newer = ModelRecord(**{**den.to_json(), "version": 2})
    assert guidance.guidance_model_name(newer, rob, pla) != name


def test_service_update_is_the_methods_cone_projection() -> None:
    """The service's loop is run_counterfactual: one guided step, checked by hand."""
    torch.manual_seed(0)
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    g_r, g_p, g_d = torch.randn(3, 1, 1, 4, 4).unbind(0)
    eps = torch.randn(1, 1, 4, 4)

    def guide(x_t, t, ab, x0_in, target):  # type: ignore[no-untyped-def]
        return cf.GuidanceGradients(
            eps, torch.zeros_like(x_t), torch.zeros(1, 2), torch.zeros(1, 2), g_r, g_p, g_d
        )

    ab = torch.linspace(0.9999, 0.01, 1000)
    config = cf.CounterfactualConfig(steps=2, depth=0.5, lambda_c=0.1, alpha_deg=30.0)
    res = cf.run_counterfactual(guide, x0, torch.tensor([1]), ab, config=config, seeds=[0])
    sched = cf.respace(ab, 2)
    mu = (
        (1 - float(sched.alpha_bar_prev[0]))
        * math.sqrt(1 - float(sched.beta[0]))
        / (1 - float(sched.alpha_bar[0]))
        * (
            math.sqrt(float(sched.alpha_bar[0])) * x0
            + math.sqrt(1 - float(sched.alpha_bar[0]))
            * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        )
    )
    g_c = cf.cone_project(g_r, g_p, 30.0)
    assert float(cf.angle_deg(g_c, g_p)) <= 30.0 + 1e-4
    want = cf.guided_mean(mu, torch.tensor(float(sched.posterior_variance[0])), g_c, g_d, 0.1, 0.5)
    torch.testing.assert_close(res.final_sample, want, atol=1e-5, rtol=1e-5)
