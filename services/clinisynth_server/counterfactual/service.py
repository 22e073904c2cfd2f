"""The counterfactual service's domain logic: a real image in, its guided counterfactual out.

Knows nothing of gRPC and holds no weights. Every forward / backward pass runs in Triton:

- ``<classifier>.classifier`` models give P(target) of the input and of the result;
- the combination's ``cf_guidance`` model (:mod:`.guidance`) does one guided step's model work
  (ε̂, x̂₀, both classifiers' logits, g_r, g_p, g_d by autograd through the denoiser).

The loop itself — respaced chain, cone projection, guided posterior mean, noise — is
:func:`clinisynth_server.methods.counterfactual.run_counterfactual`, the same function the
benchmark runs in-process; progress, the probability trajectory and cancellation live between
its steps. Input images may be patient images: an inline DICOM is de-identified on arrival
(:func:`admit_input`, PS3.15 basic profile), and so is one fetched from a PACS by its UIDs
(:meth:`Counterfactuals.fetch_input`, :mod:`clinisynth_server.pacs.fetch`; the provenance keeps
only a salted hash of the original UIDs), before it is decoded or described in a log line
(only :func:`imaging.deid.safe_log_repr`, never pixels); outputs are new encodings that carry
none of the input's attributes (a DICOM result is a Secondary Capture, see ``imaging.encode``,
marked PatientIdentityRemoved = YES because its pixels derive from a patient's image).

Stages of one request:
  1. validate options and resolve the three models (before any model work);
  2. check the input against the models (channels, size; resize only when asked);
  3. find or create the guidance model; P(target) of the input by both classifiers;
  4. the guided reverse chain (one ``cf_guidance`` call per step) with a trajectory point each;
  5. P(target) of the result; difference map, overlay, distance; provenance; optionally store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pathlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pydicom
import torch

from clinisynth_server import __version__
from clinisynth_server.cancel import NEVER, CancelToken
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.counterfactual import guidance
from clinisynth_server.counterfactual.options import CounterfactualOptions, Plan, validate
from clinisynth_server.errors import FailedPrecondition, InvalidArgument, NotFound
from clinisynth_server.imaging import decode as imdecode
from clinisynth_server.imaging import deid, encode
from clinisynth_server.imaging.deid import safe_log_repr
from clinisynth_server.imaging.provenance import Provenance
from clinisynth_server.methods import counterfactual as cf
from clinisynth_server.pacs.config import check_destination
from clinisynth_server.pacs.fetch import FetchedInstance, PacsReader, PacsRef
from clinisynth_server.pacs.outbox import Outbox, OutboxItem
from clinisynth_server.runtime.metrics import CounterfactualMetrics
from clinisynth_server.similarity import guard
from clinisynth_server.similarity.guard import DomainCheck, DomainGuard
from clinisynth_server.store.base import (
    ArtifactStore,
    ObjectInfo,
    dir_prefix,
    outside_service_namespaces,
)
from clinisynth_server.tenancy import Viewer, owner_metadata, refuse_foreign_prefix, sees_object
from clinisynth_server.triton.client import TritonClient

log = logging.getLogger(__name__)

MAX_TRITON_BATCH = guidance.MAX_BATCH_SIZE
BATCH_CHUNK = 8  # images guided together in batch mode (one Triton call per step for all)
DISTANCE_CODES = {"l2": 0, "l1": 1}
GUIDANCE_OUTPUTS = ["eps", "x0_hat", "g_r", "g_p", "g_d", "logits_robust", "logits_plain"]
SAMPLER = "dvce-ddpm"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", "")
OVERLAY_FLOOR = 0.05  # |difference| shown at full colour (or the largest |difference| if more)


# ---------------------------------------------------------------------------------------------
# domain types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total: int


@dataclass(frozen=True)
class TrajectoryPoint:
    step: int  # 1-based guided step
    p_robust: float
    p_plain: float
    angle_deg: float  # ∠(g_r, g_p) before projection


@dataclass
class CounterfactualOutcome:
    image: np.ndarray  # [H, W] / [H, W, 3] float32 in [0, 1]
    data: bytes  # encoded as ``format`` (empty for raw)
    format: str
    difference: np.ndarray  # counterfactual − input, signed float32, same shape
    overlay_png: bytes
    p_before_robust: float
    p_after_robust: float
    p_before_plain: float
    p_after_plain: float
    trajectory: list[TrajectoryPoint]
    distance: float
    target_class: str
    provenance: Provenance
    request_id: str
    stored: dict[str, ObjectInfo] = field(default_factory=dict)
    # With ``to_pacs``: the outbox item of the counterfactual (pending when answered).
    pacs: list[OutboxItem] = field(default_factory=list)
    # The out-of-domain guard's verdict on the input (against the diffusion model's index).
    domain: DomainCheck | None = None

    @property
    def verdict(self) -> cf.FlipVerdict:
        return cf.flip_verdict(self.p_before_robust, self.p_after_robust)

    @property
    def flipped(self) -> bool:
        """Robust P(target) crossed 0.5; never for an input that already showed the target."""
        return self.verdict.flipped

    @property
    def already_target(self) -> bool:
        return self.verdict.already_target

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts (no pixels): what ``result.json`` and the CLI's ``.json`` hold."""
        return {
            "target_class": self.target_class,
            "p_target_before": {"robust": self.p_before_robust, "plain": self.p_before_plain},
            "p_target_after": {"robust": self.p_after_robust, "plain": self.p_after_plain},
            "flipped": self.flipped,
            "already_target": self.already_target,
            "p_target_change": {
                "robust": self.p_after_robust - self.p_before_robust,
                "plain": self.p_after_plain - self.p_before_plain,
            },
            "distance": self.distance,
            "trajectory": [
                {
                    "step": p.step,
                    "p_robust": p.p_robust,
                    "p_plain": p.p_plain,
                    "gradient_angle_deg": p.angle_deg,
                }
                for p in self.trajectory
            ],
            "provenance": self.provenance.to_dict(),
        }


@dataclass(frozen=True)
class BatchItem:
    input_key: str
    result: ObjectInfo | None = None
    p_before_robust: float = math.nan
    p_after_robust: float = math.nan
    distance: float = math.nan
    flipped: bool = False
    error: str = ""
    already_target: bool = False


@dataclass(frozen=True)
class BatchSummary:
    images: int
    failed: int
    flip_rate: float
    mean_distance: float
    summary: ObjectInfo | None
    output_prefix: str
    already_target: int = 0  # images the robust classifier already gave the target


Event = Progress | TrajectoryPoint | BatchItem
EventSink = Callable[[Event], None]


# ---------------------------------------------------------------------------------------------
# pure helpers (unit-tested)
# ---------------------------------------------------------------------------------------------


def prepare_input(
    pixels: np.ndarray, denoiser: ModelRecord, *, resize: bool, field: str = "image"
) -> tuple[np.ndarray, bool]:
    """The input as the models take it ([H, W] / [H, W, 3] in [0, 1]); ``(array, resized)``.

    Channel counts must match (no silent gray↔RGB conversion of a patient image); another size
    is resized only when the caller asks; NaN / Inf and values outside [0, 1] are refused.
    """
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if channels != denoiser.channels:
        raise InvalidArgument.for_field(
            field,
            f"image has {channels} channel(s); {denoiser.ref} takes "
            f"{denoiser.channels} ({'grayscale' if denoiser.channels == 1 else 'RGB'})",
        )
    if not np.isfinite(arr).all():
        raise InvalidArgument.for_field(field, "image has NaN/Inf values")
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise InvalidArgument.for_field(
            field, f"pixel values must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]"
        )
    size = (denoiser.height, denoiser.width)
    resized = arr.shape[:2] != size
    if resized:
        if not resize:
            raise InvalidArgument.for_field(
                field,
                f"image is {arr.shape[0]}x{arr.shape[1]} (HxW); {denoiser.ref} takes "
                f"{size[0]}x{size[1]}: send that size or set resize to resize it",
            )
        arr = imdecode.resize_to(
            arr, size, resample="area" if arr.shape[0] > size[0] else "bicubic"
        )
    return np.clip(arr, 0.0, 1.0).astype(np.float32), resized


def admit_input(data: bytes, *, field: str) -> bytes:
    """A client's inline image as this service may hold it: DICOM de-identified, else as is."""
    return deid.deidentify_input(data, field=field)


def derived_dicom(data: bytes) -> bytes:
    """A result DICOM marked as de-identified derived data (PatientIdentityRemoved = YES)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    deid.mark_deidentified(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def to_model_space(images: list[np.ndarray]) -> torch.Tensor:
    """[H, W(, C)] arrays in [0, 1] → (B, C, H, W) in [-1, 1]."""
    arrs = [a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1)) for a in images]
    return torch.from_numpy(np.stack(arrs)).float() * 2 - 1


def from_model_space(x: torch.Tensor) -> list[np.ndarray]:
    """(B, C, H, W) in [-1, 1] → per-image [H, W] / [H, W, C] in [0, 1]."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) / 2).numpy()
    return [
        np.ascontiguousarray(
            a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)), dtype=np.float32
        )
        for a in arr
    ]


def pixel_distance(difference: np.ndarray, kind: str) -> float:
    """Per-pixel distance in [0, 1] units: mean |Δ| (L1) or root mean square Δ (L2)."""
    d = np.asarray(difference, dtype=np.float64)
    return float(np.abs(d).mean()) if kind == "l1" else float(np.sqrt((d**2).mean()))


def overlay_png(image: np.ndarray, difference: np.ndarray) -> bytes:
    """RGB PNG: the input in gray, red where the counterfactual is brighter, blue where darker.

    Colour strength is |Δ| / max(max |Δ|, 0.05), so noise-level edits stay faint.
    """
    base = image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114], np.float32)
    d = difference if difference.ndim == 2 else difference.mean(axis=2)
    scale = max(float(np.abs(d).max()), OVERLAY_FLOOR)
    strength = np.clip(np.abs(d) / scale, 0, 1)[..., None]
    gray = np.repeat(base[..., None], 3, axis=2) * 0.8
    colour = np.where((d >= 0)[..., None], np.array([1.0, 0.1, 0.1]), np.array([0.1, 0.3, 1.0]))
    rgb = gray * (1 - strength) + colour * strength
    return encode.encode_png(np.clip(rgb, 0, 1).astype(np.float32), None)


def _softmax_p(logits: np.ndarray, target: int) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(axis=1, keepdims=True))[:, target]


# ---------------------------------------------------------------------------------------------
# Triton-backed model calls
# ---------------------------------------------------------------------------------------------


def triton_guide_fn(
    triton: TritonClient,
    model: str,
    *,
    distance: str,
    cancel: CancelToken,
    angles: list[torch.Tensor] | None = None,
) -> cf.GuideFn:
    """A :class:`~clinisynth_server.methods.counterfactual.GuideFn` calling ``cf_guidance``.

    ``angles`` (if given) receives ∠(g_r, g_p) per sample of each call, for the trajectory.
    """
    code = DISTANCE_CODES[distance]

    def guide(
        x_t: torch.Tensor,
        t: torch.Tensor,
        alpha_bar_t: torch.Tensor,
        x0_input: torch.Tensor,
        target: torch.Tensor,
    ) -> cf.GuidanceGradients:
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in GUIDANCE_OUTPUTS}
        for start in range(0, x_t.shape[0], MAX_TRITON_BATCH):
            cancel.check()
            sl = slice(start, start + MAX_TRITON_BATCH)
            n = x_t[sl].shape[0]
            out = triton.infer(
                model,
                {
                    "x_t": x_t[sl].detach().float().numpy(),
                    "timestep": t[sl].detach().float().numpy(),
                    "alpha_bar": torch.as_tensor(alpha_bar_t)
                    .expand(x_t.shape[0])[sl]
                    .detach()
                    .float()
                    .numpy(),
                    "x0": x0_input[sl].detach().float().numpy(),
                    "target": target[sl].detach().long().numpy(),
                    "distance": np.full((n,), code, np.int64),
                },
                GUIDANCE_OUTPUTS,
                timeout_s=cancel.remaining(),
            )
            for name in GUIDANCE_OUTPUTS:
                parts[name].append(torch.from_numpy(out[name].copy()))
        got = {name: torch.cat(values) for name, values in parts.items()}
        if angles is not None:
            angles.append(cf.angle_deg(got["g_r"], got["g_p"]).float())
        return cf.GuidanceGradients(
            eps=got["eps"],
            x0_hat=got["x0_hat"],
            logits_robust=got["logits_robust"],
            logits_plain=got["logits_plain"],
            g_r=got["g_r"],
            g_p=got["g_p"],
            g_d=got["g_d"],
        )

    return guide


# ---------------------------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------------------------


class Counterfactuals:
    """Counterfactual edits of real images through Triton (see the module doc for the stages)."""

    def __init__(
        self,
        catalog: Catalog,
        triton: TritonClient,
        store: ArtifactStore,
        *,
        model_repository: str | pathlib.Path | None = None,
        instance_kind: str = "cpu",
        metrics: CounterfactualMetrics | None = None,
        outbox: Outbox | None = None,
        pacs: PacsReader | None = None,
    ) -> None:
        self.outbox = outbox
        # PACS in reads from the same [pacs.NAME] tables the outbox delivers to.
        self.pacs = pacs or PacsReader(outbox.destinations if outbox else {}, store)
        self.catalog = catalog
        self.triton = triton
        self.store = store
        self.model_repository = model_repository
        self.instance_kind = instance_kind
        self.metrics = metrics
        self._ready: set[str] = set()
        self._lock = threading.Lock()
        self._schedules: dict[str, torch.Tensor] = {}
        self.guard = DomainGuard(triton)

    # -- the out-of-domain guard -------------------------------------------------------------
    def domain_check(
        self, plan: Plan, source: np.ndarray, policy: str, field_name: str, cancel: CancelToken
    ) -> DomainCheck:
        """The prepared input ([H, W] / [H, W, 3] in [0, 1]) against the diffusion model's
        training images; FAILED_PRECONDITION under ``refuse`` when it is out of domain."""
        chw = source[None, None] if source.ndim == 2 else np.transpose(source, (2, 0, 1))[None]
        return self.guard.check(
            plan.denoiser,
            chw,
            policy=policy,
            fields=[field_name],
            timeout_s=cancel.remaining(),
        )[0]

    # -- input by reference ------------------------------------------------------------------
    def fetch_input(
        self, ref: PacsRef, *, field: str = "image.pacs", timeout_s: float | None = None
    ) -> FetchedInstance:
        """An input named by its PACS UIDs, fetched and de-identified (see :mod:`.pacs.fetch`);
        ``timeout_s``: what is left of the call's deadline, which caps the fetch."""
        return self.pacs.fetch(ref, field=field, timeout_s=timeout_s)

    # -- stage 3: models ---------------------------------------------------------------------
    def guidance_model(self, plan: Plan) -> str:
        name = guidance.guidance_model_name(plan.denoiser, plan.robust, plan.plain)
        with self._lock:
            if name in self._ready:
                return name
        if self.model_repository:
            name = guidance.ensure_guidance_model(
                plan.denoiser,
                plan.robust,
                plan.plain,
                model_repository=self.model_repository,
                triton=self.triton,
                store=self.store,
                instance_kind=self.instance_kind,
            )
        elif not self.triton.model_ready(name):
            raise FailedPrecondition(
                f"Triton has no guidance model {name} for {plan.denoiser.ref} + "
                f"{plan.robust.ref} + {plan.plain.ref}: create it with `python -m "
                "clinisynth_server.counterfactual.guidance` or give the service the model "
                "repository (CLINISYNTH_COUNTERFACTUAL_MODEL_REPOSITORY)",
                reason="GUIDANCE_MODEL_MISSING",
            )
        with self._lock:
            self._ready.add(name)
        return name

    def classify(
        self, record: ModelRecord, images: torch.Tensor, cancel: CancelToken
    ) -> np.ndarray:
        """Calibrated logits of ``images`` ((B, C, H, W) in [-1, 1]) by a classifier in Triton."""
        cancel.check()
        out = self.triton.infer(
            record.components["classifier"],
            {"images": ((images.float() + 1) / 2).clamp(0, 1).numpy()},
            ["logits"],
            version=str(record.component_versions["classifier"]),
            timeout_s=cancel.remaining(),
        )
        return out["logits"]

    def alphas_cumprod(self, record: ModelRecord) -> torch.Tensor:
        from clinisynth_server.registry import DEFAULT_SCHEDULER

        with self._lock:
            if record.ref not in self._schedules:
                from diffusers import DDPMScheduler

                config = {
                    k: v
                    for k, v in (record.scheduler or DEFAULT_SCHEDULER).items()
                    if not k.startswith("_")
                }
                self._schedules[record.ref] = DDPMScheduler.from_config(config).alphas_cumprod
            return self._schedules[record.ref]

    # -- stages 3-5 for a batch of prepared images -------------------------------------------
    def _run(
        self,
        plan: Plan,
        images: list[np.ndarray],
        seeds: list[int],
        *,
        cancel: CancelToken,
        on_point: Callable[[int, TrajectoryPoint], None] | None,
        on_step: Callable[[int, int], None] | None,
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[list[TrajectoryPoint]], str]:
        model = self.guidance_model(plan)
        x0 = to_model_space(images)
        target = torch.full((len(images),), plan.target_index, dtype=torch.long)
        before = np.stack(
            [
                _softmax_p(self.classify(plan.robust, x0, cancel), plan.target_index),
                _softmax_p(self.classify(plan.plain, x0, cancel), plan.target_index),
            ]
        )
        angles: list[torch.Tensor] = []
        points: list[list[TrajectoryPoint]] = [[] for _ in images]

        def step(info: cf.CounterfactualStep) -> bool:
            cancel.check()
            for i in range(len(images)):
                point = TrajectoryPoint(
                    info.index + 1,
                    float(info.prob_robust[i]),
                    float(info.prob_plain[i]),
                    float(angles[-1][i]) if angles else math.nan,
                )
                points[i].append(point)
                if on_point is not None:
                    on_point(i, point)
            if on_step is not None:
                on_step(info.index + 1, info.total)
            return True

        try:
            result = cf.run_counterfactual(
                triton_guide_fn(
                    self.triton, model, distance=plan.config.distance, cancel=cancel, angles=angles
                ),
                x0,
                target,
                self.alphas_cumprod(plan.denoiser),
                config=plan.config,
                seeds=seeds,
                on_step=step,
            )
        except NotFound:
            with self._lock:  # Triton lost the model (restart, unload): look it up again
                self._ready.discard(model)
            raise
        after = np.stack(
            [
                _softmax_p(self.classify(plan.robust, result.image, cancel), plan.target_index),
                _softmax_p(self.classify(plan.plain, result.image, cancel), plan.target_index),
            ]
        )
        return from_model_space(result.image), before, after, points, model

    def _provenance(
        self,
        plan: Plan,
        seed: int,
        size: tuple[int, int],
        request_id: str,
        model: str,
        input_pixels: np.ndarray,
        resized: bool,
    ) -> Provenance:
        extra = {
            "kind": "counterfactual",
            "robust_classifier": plan.robust.ref,
            "robust_digest": plan.robust.digest,
            "plain_classifier": plan.plain.ref,
            "plain_digest": plan.plain.digest,
            "guidance_model": model,
            "input_pixels_sha256": hashlib.sha256(
                np.ascontiguousarray(input_pixels, "<f4").tobytes()
            ).hexdigest(),
            "resized": "true" if resized else "false",
            **plan.knobs,
        }
        return Provenance(
            model_name=plan.denoiser.name,
            model_version=str(plan.denoiser.version),
            model_digest=plan.denoiser.digest,
            seed=int(seed),
            sampler=SAMPLER,
            steps=plan.config.steps,
            guidance_scale=float(plan.config.lambda_c),
            size=size,
            request_id=request_id,
            class_name=plan.target_class,
            software_version=__version__,
            extra=extra,
        )

    def _outcome(
        self,
        plan: Plan,
        image: np.ndarray,
        source: np.ndarray,
        before: np.ndarray,
        after: np.ndarray,
        points: list[TrajectoryPoint],
        provenance: Provenance,
        fmt: str,
    ) -> CounterfactualOutcome:
        difference = (image - source).astype(np.float32)
        if fmt == "dicom":
            data = derived_dicom(
                encode.encode_dicom(
                    image, provenance, bits=8 if plan.denoiser.channels == 3 else 16
                )
            )
        elif fmt == "raw":
            data = b""
        else:
            bits = 16 if fmt == "png16" and plan.denoiser.channels == 1 else 8
            data = encode.encode_png(image, provenance, bits=bits)
        return CounterfactualOutcome(
            image=image,
            data=data,
            format=fmt,
            difference=difference,
            overlay_png=overlay_png(source, difference),
            p_before_robust=float(before[0]),
            p_after_robust=float(after[0]),
            p_before_plain=float(before[1]),
            p_after_plain=float(after[1]),
            trajectory=points,
            distance=pixel_distance(difference, plan.config.distance),
            target_class=plan.target_class,
            provenance=provenance,
            request_id=provenance.request_id,
        )

    def _observe(self, plan: Plan, outcome: CounterfactualOutcome, started: float) -> None:
        if self.metrics is None:
            return
        self.metrics.duration.observe(time.perf_counter() - started)
        self.metrics.distance.observe(outcome.distance)
        if outcome.flipped:
            self.metrics.flips.labels(plan.target_class).inc()

    # -- one image ---------------------------------------------------------------------------
    def counterfactual(
        self,
        pixels: np.ndarray,
        options: CounterfactualOptions,
        *,
        cancel: CancelToken = NEVER,
        sink: EventSink | None = None,
        source_repr: str = "",
        source_facts: Mapping[str, str] | None = None,
        tenant: str = "",
        admin: bool = False,
    ) -> CounterfactualOutcome:
        """``source_facts``: what provenance records of the input's origin (a PACS input's
        ``input_lineage``, :meth:`.FetchedInstance.provenance`), never an identifier.

        Models private to another tenant than ``tenant`` resolve as unknown (``admin``: every
        model); stored outputs are recorded as ``tenant``'s."""
        plan = validate(options, self.catalog.seen_by(Viewer(tenant, admin)))  # 1.
        policy = guard.check_policy(options.domain_guard, "domain_guard")
        if options.to_pacs:
            check_destination(options.to_pacs, self.outbox.destinations if self.outbox else {})
        source, resized = prepare_input(pixels, plan.denoiser, resize=options.resize)  # 2.
        domain = self.domain_check(plan, source, policy, "image", cancel)
        request_id = options.request_id or uuid.uuid4().hex
        log.info(
            "counterfactual %s: input %s, target %s, models %s / %s / %s",
            request_id,
            source_repr or safe_log_repr(pixels),
            plan.target_class,
            plan.denoiser.ref,
            plan.robust.ref,
            plan.plain.ref,
        )
        started = time.perf_counter()

        def on_point(_: int, point: TrajectoryPoint) -> None:
            if sink is not None:
                sink(point)

        def on_step(step: int, total: int) -> None:
            if sink is not None:
                sink(Progress("denoise", step, total))

        images, before, after, points, model = self._run(  # 3.-4.
            plan, [source], [plan.seed], cancel=cancel, on_point=on_point, on_step=on_step
        )
        provenance = self._provenance(
            plan, plan.seed, (source.shape[0], source.shape[1]), request_id, model, source, resized
        )
        facts = {**(source_facts or {}), **domain.provenance()}
        provenance = replace(provenance, extra={**provenance.extra, **facts})
        outcome = self._outcome(
            plan,
            images[0],
            source,
            before[:, 0],
            after[:, 0],
            points[0],
            provenance,
            options.format,
        )  # 5.
        outcome.domain = domain
        if options.store_outputs:
            prefix = (
                options.output_prefix or time.strftime("counterfactuals/%Y/%m/%d/") + request_id
            )
            outcome.stored = self._store(
                dir_prefix(prefix, "output_prefix"), "", outcome, tenant, "output_prefix"
            )
        if options.to_pacs:
            assert self.outbox is not None  # checked with the options
            data = outcome.data if outcome.format == "dicom" else self._dicom(plan, outcome)
            outcome.pacs = self.outbox.enqueue(options.to_pacs, request_id, [data])
        self._observe(plan, outcome, started)
        return outcome

    @staticmethod
    def _dicom(plan: Plan, outcome: CounterfactualOutcome) -> bytes:
        bits = 8 if plan.denoiser.channels == 3 else 16
        return derived_dicom(encode.encode_dicom(outcome.image, outcome.provenance, bits=bits))

    def _store(
        self,
        prefix: str,
        stem: str,
        outcome: CounterfactualOutcome,
        tenant: str = "",
        field: str = "output_prefix",
    ) -> dict[str, ObjectInfo]:
        """Write result files under ``prefix`` (``<stem>.<what>``, or ``<what>`` with no stem),
        each recorded as ``tenant``'s (object metadata)."""
        base = f"{prefix}{stem}." if stem else prefix
        refuse_foreign_prefix(self.store, f"{base}result.json", tenant, field)
        owner = owner_metadata(tenant)
        suffix = {"dicom": ".dcm", "raw": ".npy"}.get(outcome.format, ".png")
        image_data = outcome.data
        if outcome.format == "raw":
            image_data = _npy(outcome.image)
        return {
            "counterfactual": self.store.put_bytes(
                f"{base}counterfactual{suffix}", image_data, metadata=owner
            ),
            "difference": self.store.put_bytes(
                f"{base}difference.npy", _npy(outcome.difference), metadata=owner
            ),
            "overlay": self.store.put_bytes(
                f"{base}overlay.png", outcome.overlay_png, content_type="image/png", metadata=owner
            ),
            "result": self.store.put_bytes(
                f"{base}result.json",
                json.dumps(outcome.summary(), indent=2).encode(),
                content_type="application/json",
                metadata=owner,
            ),
        }

    # -- a store prefix ----------------------------------------------------------------------
    def batch(
        self,
        input_prefix: str,
        options: CounterfactualOptions,
        *,
        output_prefix: str = "",
        limit: int = 0,
        cancel: CancelToken = NEVER,
        sink: EventSink | None = None,
        tenant: str = "",
        admin: bool = False,
    ) -> BatchSummary:
        """Counterfactuals of every image under ``input_prefix`` (item i uses seed + i).

        Only ``tenant``'s images under the prefix are read (``admin``: all); the outputs are
        recorded as ``tenant``'s.

        Per image, under ``output_prefix``: ``<stem>.counterfactual.png``, ``.difference.npy``,
        ``.overlay.png`` and ``.result.json``; then ``summary.json``. An image that cannot be
        used (bad file, wrong channels/size) is reported and skipped; the batch goes on.
        """
        if not input_prefix:
            raise InvalidArgument.for_field("input_prefix", "required")
        in_prefix = dir_prefix(
            outside_service_namespaces(input_prefix, "input_prefix"), "input_prefix"
        )
        if limit < 0:
            raise InvalidArgument.for_field("limit", f"must be >= 0, got {limit}")
        viewer = Viewer(tenant, admin)
        plan = validate(options, self.catalog.seen_by(viewer))
        policy = guard.check_policy(options.domain_guard, "options.domain_guard")
        request_id = options.request_id or uuid.uuid4().hex
        out_prefix = dir_prefix(
            outside_service_namespaces(output_prefix, "output_prefix")
            or f"counterfactuals/{request_id}/",
            "output_prefix",
        )
        if out_prefix.startswith(in_prefix):
            raise InvalidArgument.for_field("output_prefix", "must lie outside input_prefix")
        keys = [
            info.key
            for info in self.store.list(in_prefix)
            if pathlib.PurePosixPath(info.key).suffix.lower() in IMAGE_SUFFIXES
            and sees_object(self.store, info.key, viewer)
        ]
        if limit:
            keys = keys[:limit]
        if not keys:
            raise InvalidArgument.for_field("input_prefix", f"no images under {in_prefix!r}")

        items: list[BatchItem] = []
        ready: list[tuple[int, str, np.ndarray, bool]] = []

        def emit(item: BatchItem) -> None:
            items.append(item)
            if sink is not None:
                sink(item)

        # Decode and check every input first (cheap) so chunks hold only usable images.
        for index, key in enumerate(keys):
            cancel.check()
            try:
                pixels = imdecode.decode_image(self.store.get_bytes(key), field=key)
                prepared, resized = prepare_input(
                    pixels, plan.denoiser, resize=options.resize, field=key
                )
                # an out-of-domain image is reported and skipped like an unusable one
                self.domain_check(plan, prepared, policy, key, cancel)
                ready.append((index, key, prepared, resized))
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                emit(BatchItem(key, error=str(exc)))
        total_steps = math.ceil(len(ready) / BATCH_CHUNK) * min(
            plan.config.reverse_steps, plan.config.steps
        )
        done_steps = 0
        for start in range(0, len(ready), BATCH_CHUNK):
            chunk = ready[start : start + BATCH_CHUNK]
            started = time.perf_counter()
            offset = done_steps

            def on_step(step: int, total: int, offset: int = offset) -> None:
                if sink is not None:
                    sink(Progress("denoise", offset + step, total_steps))

            seeds = [plan.seed + index for index, *_ in chunk]
            images, before, after, points, model = self._run(
                plan, [c[2] for c in chunk], seeds, cancel=cancel, on_point=None, on_step=on_step
            )
            done_steps += min(plan.config.reverse_steps, plan.config.steps)
            for j, (index, key, source, resized) in enumerate(chunk):
                rid = f"{request_id}-{index:05d}"
                prov = self._provenance(
                    plan, seeds[j], (source.shape[0], source.shape[1]), rid, model, source, resized
                )
                outcome = self._outcome(
                    plan,
                    images[j],
                    source,
                    before[:, j],
                    after[:, j],
                    points[j],
                    replace(prov, extra={**prov.extra, "input_key": key}),
                    "png",
                )
                stem = pathlib.PurePosixPath(key[len(in_prefix) :]).with_suffix("").as_posix()
                stored = self._store(out_prefix, stem, outcome, tenant)
                self._observe(plan, outcome, started)
                emit(
                    BatchItem(
                        key,
                        stored["result"],
                        outcome.p_before_robust,
                        outcome.p_after_robust,
                        outcome.distance,
                        outcome.flipped,
                        already_target=outcome.already_target,
                    )
                )

        good = [i for i in items if not i.error]
        already = sum(i.already_target for i in good)
        # Flip rate over the images that could flip (already-target inputs cannot).
        flippable = len(good) - already
        flip_rate = sum(i.flipped for i in good) / flippable if flippable else 0.0
        mean_distance = float(np.mean([i.distance for i in good])) if good else math.nan
        summary = {
            "request_id": request_id,
            "input_prefix": in_prefix,
            "target_class": plan.target_class,
            "images": len(good),
            "failed": len(items) - len(good),
            "flip_rate": flip_rate,
            "already_target": already,
            "mean_distance": mean_distance,
            "knobs": plan.knobs,
            "seed": plan.seed,
            "models": {
                "diffusion_model": plan.denoiser.ref,
                "robust": plan.robust.ref,
                "plain": plan.plain.ref,
            },
            "items": [
                {
                    "input_key": i.input_key,
                    "result": i.result.key if i.result else None,
                    "p_target_before_robust": _json_float(i.p_before_robust),
                    "p_target_after_robust": _json_float(i.p_after_robust),
                    "distance": _json_float(i.distance),
                    "flipped": i.flipped,
                    "already_target": i.already_target,
                    "error": i.error,
                }
                for i in items
            ],
        }
        info = self.store.put_bytes(
            f"{out_prefix}summary.json",
            json.dumps(summary, indent=2).encode(),
            content_type="application/json",
            metadata=owner_metadata(tenant),
        )
        return BatchSummary(
            len(good), len(items) - len(good), flip_rate, mean_distance, info, out_prefix, already
        )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32))
    return buf.getvalue()
