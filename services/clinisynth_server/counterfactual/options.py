"""A counterfactual request in domain terms, and its validation (before any model work).

Published defaults (docs/METHODS.md §4): start depth 0.5 (half of the respaced chain skipped), 200
respaced steps, λ_c 0.1, cone angle α 30°, L2 distance with λ_d 0.5 (L1 → λ_d 0.15), cone mode.

``start_depth`` follows the contract (counterfactual.proto): the fraction of the schedule
*skipped*, so ``round(steps · (1 − start_depth))`` guided reverse steps run; the methods'
``CounterfactualConfig.depth`` is the fraction *re-run*, i.e. ``1 − start_depth``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.methods.counterfactual import DISTANCES, MODES, CounterfactualConfig
from clinisynth_server.store.base import outside_service_namespaces

FORMATS = ("png", "png16", "dicom", "raw")
DEFAULT_STEPS = 200
DEFAULT_START_DEPTH = 0.5
DEFAULT_LAMBDA_C = 0.1
DEFAULT_ALPHA_DEG = 30.0
DEFAULT_LAMBDA_D = {"l2": 0.5, "l1": 0.15}
MAX_LAMBDA = 10.0
MAX_STEPS = 1000


@dataclass(frozen=True)
class CounterfactualOptions:
    """Every knob as the caller sent it; ``None`` / empty = the published default."""

    target_class: str = ""
    diffusion_model: str = ""
    diffusion_version: str = ""
    robust_classifier: str = ""
    robust_version: str = ""
    plain_classifier: str = ""
    plain_version: str = ""
    start_depth: float | None = None
    steps: int = 0
    lambda_c: float | None = None
    cone_angle_deg: float | None = None
    distance: str = ""
    lambda_d: float | None = None
    seed: int | None = None
    mode: str = ""
    resize: bool = False
    format: str = "png"
    store_outputs: bool = False
    output_prefix: str = ""
    request_id: str = ""
    # A [pacs.NAME] destination the counterfactual also goes to, as DICOM ("" = none).
    to_pacs: str = ""
    # The out-of-domain guard: "refuse" | "warn" ("" = refuse; similarity/guard.py).
    domain_guard: str = ""


@dataclass(frozen=True)
class Plan:
    """A validated request: the three models, the target and the method's config."""

    denoiser: ModelRecord
    robust: ModelRecord
    plain: ModelRecord
    target_class: str
    target_index: int
    config: CounterfactualConfig
    start_depth: float
    seed: int
    options: CounterfactualOptions

    @property
    def knobs(self) -> dict[str, str]:
        """The knobs as provenance strings (exact values, so a run can be repeated)."""
        c = self.config
        return {
            "start_depth": repr(self.start_depth),
            "steps": str(c.steps),
            "reverse_steps": str(min(c.reverse_steps, c.steps)),
            "lambda_c": repr(c.lambda_c),
            "cone_angle_deg": repr(c.alpha_deg),
            "distance": c.distance,
            "lambda_d": repr(c.lambda_d),
            "mode": c.mode,
            "variance": c.variance,
        }


def _is_robust(record: ModelRecord) -> bool:
    return record.labels.get("robust", "").lower() == "true"


def _pick(
    candidates: list[ModelRecord], what: str, field: str, errors: ValidationErrors
) -> ModelRecord | None:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        errors.add(field, f"no {what} is registered; name one")
    else:
        names = ", ".join(r.ref for r in candidates)
        errors.add(field, f"several {what}s fit ({names}); name one")
    return None


def _get(
    catalog: Catalog, name: str, version: str, field: str, kind: str, errors: ValidationErrors
) -> ModelRecord | None:
    try:
        record = catalog.get(name, version, field_name=field)
    except InvalidArgument as exc:
        errors.violations.extend(exc.violations)
        return None
    if record.kind != kind:
        errors.add(f"{field}.name", f"{record.ref} is a {record.kind} model, not {kind}")
        return None
    return record


def resolve_models(
    options: CounterfactualOptions, catalog: Catalog, errors: ValidationErrors
) -> tuple[ModelRecord | None, ModelRecord | None, ModelRecord | None]:
    """Named models, else defaults: classifiers of the denoiser's domain (or having the target
    class), the unconditional denoiser of the classifiers' domain; ambiguity is an error."""
    den = rob = pla = None
    if options.diffusion_model:
        den = _get(
            catalog,
            options.diffusion_model,
            options.diffusion_version,
            "diffusion_model",
            "unconditional",
            errors,
        )
    if options.robust_classifier:
        rob = _get(
            catalog,
            options.robust_classifier,
            options.robust_version,
            "robust_classifier",
            "classifier",
            errors,
        )
        if rob is not None and not _is_robust(rob):
            errors.add("robust_classifier.name", f"{rob.ref} is not labelled robust=true")
    if options.plain_classifier:
        pla = _get(
            catalog,
            options.plain_classifier,
            options.plain_version,
            "plain_classifier",
            "classifier",
            errors,
        )
    if errors.violations:
        return den, rob, pla

    domain = next(
        (r.labels["domain"] for r in (den, rob, pla) if r is not None and r.labels.get("domain")),
        "",
    )

    def classifiers(robust: bool) -> list[ModelRecord]:
        found = [r for r in catalog.list(kind="classifier") if _is_robust(r) == robust]
        if domain:
            found = [r for r in found if r.labels.get("domain") == domain]
        if options.target_class and len(found) > 1:
            found = [r for r in found if options.target_class in r.classes]
        return found

    if rob is None:
        rob = _pick(classifiers(True), "robust classifier", "robust_classifier.name", errors)
    if pla is None:
        pla = _pick(classifiers(False), "plain classifier", "plain_classifier.name", errors)
    if den is None:
        domain = domain or next(
            (r.labels.get("domain", "") for r in (rob, pla) if r is not None), ""
        )
        found = catalog.list(kind="unconditional")
        if domain:
            found = [r for r in found if r.labels.get("domain") == domain]
        den = _pick(
            found,
            f"unconditional denoiser{f' for {domain}' if domain else ''}",
            "diffusion_model.name",
            errors,
        )
    return den, rob, pla


def validate(options: CounterfactualOptions, catalog: Catalog) -> Plan:
    """Resolve models and defaults; every bad field is reported at once."""
    errors = ValidationErrors()
    den, rob, pla = resolve_models(options, catalog, errors)

    # Models fit together: same classes, the classifiers take the denoiser's images.
    if rob is not None and pla is not None and rob.classes != pla.classes:
        errors.add(
            "plain_classifier.name",
            f"{pla.ref} has classes {pla.classes}, {rob.ref} has {rob.classes}",
        )
    if den is not None:
        for rec, field in ((rob, "robust_classifier.name"), (pla, "plain_classifier.name")):
            if rec is None:
                continue
            if rec.channels != den.channels:
                errors.add(
                    field,
                    f"{rec.ref} takes {rec.channels}-channel images, "
                    f"{den.ref} makes {den.channels}-channel ones",
                )
            if (rec.width, rec.height) != (den.width, den.height) and rec.width:
                errors.add(
                    field,
                    f"{rec.ref} takes {rec.width}x{rec.height} images, "
                    f"{den.ref} makes {den.width}x{den.height}",
                )

    # Target class.
    classes = rob.classes if rob is not None else []
    target_index = -1
    if not options.target_class:
        errors.add("target_class", f"required; one of {classes}" if classes else "required")
    elif rob is not None:
        if options.target_class in classes:
            target_index = classes.index(options.target_class)
        else:
            errors.add("target_class", f"unknown class {options.target_class!r}; one of {classes}")

    # Knobs.
    def number(
        name: str,
        value: float | None,
        default: float,
        lo: float,
        hi: float,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> float:
        v = default if value is None else float(value)
        ok = (
            math.isfinite(v)
            and (v > lo if lo_open else v >= lo)
            and (v < hi if hi_open else v <= hi)
        )
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            errors.add(name, f"must be in {interval}, got {v}")
        return v

    start_depth = number(
        "start_depth", options.start_depth, DEFAULT_START_DEPTH, 0, 1, lo_open=True, hi_open=True
    )
    train_steps = int(den.scheduler.get("num_train_timesteps", 1000)) if den is not None else 1000
    steps = options.steps or DEFAULT_STEPS
    if not 1 <= steps <= min(MAX_STEPS, train_steps):
        errors.add("steps", f"must be in [1, {min(MAX_STEPS, train_steps)}], got {options.steps}")
    elif 0 < start_depth < 1 and round(steps * (1 - start_depth)) < 1:
        errors.add("start_depth", f"{start_depth} of {steps} steps leaves no step to run")
    lambda_c = number("lambda_c", options.lambda_c, DEFAULT_LAMBDA_C, 0, MAX_LAMBDA)
    alpha = number(
        "cone_angle_deg",
        options.cone_angle_deg,
        DEFAULT_ALPHA_DEG,
        0,
        90,
        lo_open=True,
        hi_open=True,
    )
    distance = options.distance or "l2"
    if distance not in DISTANCES:
        errors.add("distance", f"{distance!r} is not one of {', '.join(DISTANCES)}")
        distance = "l2"
    lambda_d = number("lambda_d", options.lambda_d, DEFAULT_LAMBDA_D[distance], 0, MAX_LAMBDA)
    mode = options.mode or "cone"
    if mode not in MODES:
        errors.add("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    if options.seed is not None and not 0 <= options.seed < 2**63:
        errors.add("seed", f"must be >= 0, got {options.seed}")
    if options.format not in FORMATS:
        errors.add("format", f"must be one of {FORMATS}, got {options.format!r}")
    if options.output_prefix:
        try:
            outside_service_namespaces(options.output_prefix, "output_prefix")
        except InvalidArgument as exc:
            errors.violations.extend(exc.violations)
    errors.raise_if_any()
    assert den is not None and rob is not None and pla is not None

    config = CounterfactualConfig(
        steps=steps,
        depth=1.0 - start_depth,
        lambda_c=lambda_c,
        alpha_deg=alpha,
        distance=distance,
        lambda_d=lambda_d,
        mode=mode,
    )
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    return Plan(
        den, rob, pla, options.target_class, target_index, config, start_depth, seed, options
    )
