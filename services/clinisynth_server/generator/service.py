"""The generator's domain logic: validated options in, encoded images with provenance out.

Knows nothing of gRPC. Every forward pass goes to Triton through :class:`TritonClient`
(text encoder, denoiser per step, VAE decode); the sampling loop itself is
:func:`clinisynth_server.methods.sampling.sample`, shared with training-time previews and the
benchmark's in-process baseline. Concurrent requests each call Triton per step, so Triton's
dynamic batcher merges denoiser calls of requests at different steps.

Stages of one request:
  1. validate options against the catalog record (before any model work); then hold the
     tenant's quotas (:mod:`~clinisynth_server.runtime.quotas`) and wait for a sampling slot
     in the fair gate (one queue per tenant, served round-robin);
  2. encode the prompt (text models): tokenizer here, CLIP text encoder in Triton;
  3. sample: per step one denoiser call in Triton; progress / previews / cancellation between;
  4. decode latents in Triton (latent models); map to [0, 1];
  5. optionally score candidates with a reward model and keep those that pass; then the
     memorization gate (:mod:`~clinisynth_server.similarity.gate`): each image's nearest
     training distance from the model's ``similarity`` component, flagged / resampled / refused
     per the request's policy;
  6. encode (PNG / 16-bit PNG / DICOM / raw) with embedded provenance; optionally store.
"""

from __future__ import annotations

import io
import json
import pathlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from clinisynth_server import __version__
from clinisynth_server.cancel import NEVER, CancelToken
from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.generator.options import GenerateOptions, validate
from clinisynth_server.imaging import encode
from clinisynth_server.imaging.provenance import Provenance, replay_statement
from clinisynth_server.methods import sampling
from clinisynth_server.methods.schedulers import make_scheduler
from clinisynth_server.pacs.config import check_destination
from clinisynth_server.pacs.outbox import Outbox, OutboxItem
from clinisynth_server.runtime.metrics import GeneratorMetrics
from clinisynth_server.runtime.quotas import FairGate, Quotas
from clinisynth_server.similarity import component as similarity
from clinisynth_server.similarity import gate as memorization
from clinisynth_server.store.base import ArtifactStore, ObjectInfo
from clinisynth_server.tenancy import Viewer, owner_metadata, refuse_foreign_prefix
from clinisynth_server.triton.backends._base import batch_invariant
from clinisynth_server.triton.backends._entry import model_parameters
from clinisynth_server.triton.client import TritonClient

# Triton's max_batch_size for denoisers written by the registry; larger batches are split.
MAX_TRITON_BATCH = 16
# Inline payloads above this go as chunks (streams) or store references (unary).
INLINE_LIMIT = 3 * 1024 * 1024
CHUNK = 1024 * 1024
PREVIEW_SIZE = 64
# How long a component's batch_invariant / device mode is trusted before Triton is asked again.
REPLAY_TTL_S = 30.0


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    step: int
    index: int
    png: bytes


@dataclass
class GeneratedImage:
    index: int
    pixels: np.ndarray  # [H, W] or [H, W, 3], float32 in [0, 1]
    data: bytes  # encoded (PNG / DICOM); raw arrays travel as `pixels`
    format: str
    provenance: Provenance
    reward: float | None = None
    stored: ObjectInfo | None = None
    # The memorization gate's verdict (decision, distance, threshold); also in provenance.
    memorization: memorization.Verdict | None = None


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    request_id: str
    candidates: int
    provenance_ref: ObjectInfo | None = None
    # With ``to_pacs``: the outbox items of the series (pending when answered).
    pacs: list[OutboxItem] = field(default_factory=list)


Event = Progress | Preview | GeneratedImage
EventSink = Callable[[Event], None]


class RewardScorer(Protocol):
    """Scores images [N, H, W(, C)] in [0, 1] for a condition; returns P(aligned) per image.

    ``catalog`` is the caller's view of the models: an unnamed reward model defaults to the one
    the caller may see, never another tenant's private model.
    """

    def __call__(
        self, images: np.ndarray, condition: str, model: str, version: str, *, catalog: Catalog
    ) -> np.ndarray: ...


def triton_eps_fn(
    triton: TritonClient,
    model: str,
    version: int,
    *,
    cancel: CancelToken,
    on_batch: Callable[[int], None] | None = None,
) -> sampling.EpsFn:
    """ε̂(x_t, t, c) computed by the Triton denoiser ``model`` (batches split to fit)."""

    def eps(x_t: torch.Tensor, t: torch.Tensor, cond: sampling.Cond) -> torch.Tensor:
        outs = []
        for start in range(0, x_t.shape[0], MAX_TRITON_BATCH):
            cancel.check()
            sl = slice(start, start + MAX_TRITON_BATCH)
            inputs = {
                "sample": x_t[sl].detach().float().numpy(),
                "timestep": t[sl].detach().float().numpy(),
            }
            if cond.class_labels is not None:
                inputs["class_labels"] = cond.class_labels[sl].detach().long().numpy()
            if cond.encoder_hidden_states is not None:
                inputs["encoder_hidden_states"] = cond.encoder_hidden_states[sl].float().numpy()
            if on_batch is not None:
                on_batch(inputs["sample"].shape[0])
            out = triton.infer(
                model, inputs, ["noise_pred"], version=str(version), timeout_s=cancel.remaining()
            )
            outs.append(torch.from_numpy(out["noise_pred"].copy()))
        return torch.cat(outs)

    return eps


def triton_decode_fn(triton: TritonClient, model: str, version: int) -> sampling.DecodeFn:
    def decode(z: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, z.shape[0], MAX_TRITON_BATCH):
            out = triton.infer(
                model,
                {"latents": z[start : start + MAX_TRITON_BATCH].float().numpy()},
                ["image"],
                version=str(version),
            )
            outs.append(torch.from_numpy(out["image"].copy()))
        return torch.cat(outs)

    return decode


def to_hwc(images: torch.Tensor) -> list[np.ndarray]:
    """[B, C, H, W] in [0, 1] → per-image [H, W] (gray) or [H, W, 3] float32 arrays."""
    arr = images.detach().float().clamp(0, 1).numpy()
    out = []
    for img in arr:
        out.append(img[0] if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0)))
    return [np.ascontiguousarray(a, dtype=np.float32) for a in out]


def preview_png(x0: torch.Tensor) -> list[bytes]:
    """Low-resolution 8-bit PNGs of x̂₀ (pixel space, [-1, 1])."""
    small = sampling.preview(x0, size=min(PREVIEW_SIZE, int(x0.shape[-1])))
    pngs = []
    for arr in to_hwc(small):
        pngs.append(encode.encode_png(arr, None))
    return pngs


def stream_chunks(image: GeneratedImage) -> list[tuple[int, bytes, bool]]:
    """(offset, data, last) pieces of a streamed image too large to go inline; [] = inline."""
    payload = image.data if image.format != "raw" else b""
    if image.stored is not None or len(payload) <= INLINE_LIMIT:
        return []
    return [
        (offset, payload[offset : offset + CHUNK], offset + CHUNK >= len(payload))
        for offset in range(0, len(payload), CHUNK)
    ]


class Tokenizers:
    """Tokenizers fetched from the store once per model version (files only, no weights)."""

    def __init__(self, store: ArtifactStore, cache_dir: pathlib.Path) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._loaded: dict[str, Any] = {}

    def get(self, record: ModelRecord) -> Any:
        key = record.ref
        with self._lock:
            if key not in self._loaded:
                from transformers import AutoTokenizer

                local = self.cache_dir / record.name / str(record.version)
                if not (local / "tokenizer_config.json").exists():
                    self.store.download_dir(record.extra["tokenizer_prefix"], local)
                self._loaded[key] = AutoTokenizer.from_pretrained(str(local))
            return self._loaded[key]


class Generator:
    def __init__(
        self,
        catalog: Catalog,
        triton: TritonClient,
        store: ArtifactStore,
        *,
        cache_dir: pathlib.Path,
        metrics: GeneratorMetrics | None = None,
        reward_scorer: RewardScorer | None = None,
        outbox: Outbox | None = None,
        quotas: Quotas | None = None,
        gate: FairGate | None = None,
        memorization_tries: int = memorization.DEFAULT_MAX_TRIES,
    ) -> None:
        # Samples per image under memorization=regenerate before the request is refused.
        self.memorization_tries = max(1, memorization_tries)
        self.outbox = outbox
        # Per-tenant limits, checked after validation; the fair gate then orders the sampling.
        self.quotas = quotas or Quotas(service="generator")
        self.gate = gate or FairGate(0)
        self.catalog = catalog
        self.triton = triton
        self.store = store
        self.metrics = metrics
        self.tokenizers = Tokenizers(store, cache_dir / "tokenizers")
        self.reward_scorer = reward_scorer
        # (Triton model, version) → (when read, batch_invariant, on GPU).
        self._replay: dict[tuple[str, int], tuple[float, bool, bool]] = {}

    def replay(self, record: ModelRecord) -> str:
        """The provenance ``replay`` guarantee, from the serving components' Triton configs.

        Exact only when every pixel-producing component runs ``batch_invariant``. Read at most
        every ``REPLAY_TTL_S`` per component: an operator may edit and reload a config.
        """
        modes = [
            self._mode(record, role)
            for role in ("text_encoder", "denoiser", "vae_decode")
            if role in record.components
        ]
        return replay_statement(
            batch_invariant=all(m[0] for m in modes), gpu=any(m[1] for m in modes)
        )

    def _mode(self, record: ModelRecord, role: str) -> tuple[bool, bool]:
        """(batch_invariant, on GPU) of one serving component, cached for ``REPLAY_TTL_S``."""
        key = (record.components[role], int(record.component_versions[role]))
        known = self._replay.get(key)
        if known is None or time.monotonic() - known[0] > REPLAY_TTL_S:
            config = self.triton.model_config(key[0], str(key[1]))
            groups = config.get("instance_group") or [{}]
            gpu = any(str(g.get("kind", "")).endswith("GPU") for g in groups)
            exact = batch_invariant(model_parameters(config))
            known = self._replay[key] = (time.monotonic(), exact, gpu)
        return known[1], known[2]

    # -- stage 2 --------------------------------------------------------------------------
    def encode_prompts(self, record: ModelRecord, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.tokenizers.get(record)
        ids = tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=int(record.extra.get("max_length", 77)),
            return_tensors="np",
        )["input_ids"].astype(np.int64)
        out = self.triton.infer(
            record.components["text_encoder"],
            {"input_ids": ids},
            ["last_hidden_state"],
            version=str(record.component_versions["text_encoder"]),
        )
        return torch.from_numpy(out["last_hidden_state"].copy())

    # -- stages 3-4 -----------------------------------------------------------------------
    def sample(
        self,
        record: ModelRecord,
        opts: GenerateOptions,
        seeds: list[int],
        *,
        cancel: CancelToken,
        sink: EventSink | None,
        step_offset: int = 0,
        total_steps: int = 0,
    ) -> list[np.ndarray]:
        n = len(seeds)
        cond, uncond = sampling.Cond(), None
        if record.kind == "text_to_image":
            states = self.encode_prompts(record, [opts.prompt] * n + [opts.negative_prompt] * n)
            cond = sampling.Cond(encoder_hidden_states=states[:n])
            uncond = sampling.Cond(encoder_hidden_states=states[n:])
            factor = int(record.extra["vae_scale_factor"])
            shape = (
                int(record.extra["latent_channels"]),
                opts.height // factor,
                opts.width // factor,
            )
        else:
            if record.kind == "class_conditional":
                label = record.classes.index(opts.class_name)
                cond = sampling.Cond(class_labels=torch.full((n,), label, dtype=torch.long))
            shape = (record.channels, opts.height, opts.width)
        model_label = record.name
        on_batch = None
        if self.metrics is not None:
            hist = self.metrics.batch_size.labels(model_label)
            on_batch = hist.observe
        eps_fn = triton_eps_fn(
            self.triton,
            record.components["denoiser"],
            record.component_versions["denoiser"],
            cancel=cancel,
            on_batch=on_batch,
        )
        decode_fn = None
        if "vae_decode" in record.components:
            decode_fn = triton_decode_fn(
                self.triton,
                record.components["vae_decode"],
                record.component_versions["vae_decode"],
            )
        total = total_steps or opts.steps
        last = [time.perf_counter()]

        def on_step(info: sampling.StepInfo) -> bool:
            cancel.check()
            now = time.perf_counter()
            if self.metrics is not None:
                self.metrics.step_duration.labels(model_label).observe(now - last[0])
            last[0] = now
            if sink is not None:
                # PNDM makes one model call more than it has steps: count in steps.
                done = ((info.index + 1) * opts.steps + info.total - 1) // info.total
                sink(Progress("denoise", step_offset + done, total))
                if opts.preview_every and (info.index + 1) % opts.preview_every == 0:
                    x0 = decode_fn(info.x0_pred) if decode_fn is not None else info.x0_pred
                    for i, png in enumerate(preview_png(x0)):
                        sink(Preview(step_offset + info.index + 1, i, png))
            return True

        scheduler = make_scheduler(opts.sampler, record.scheduler)
        result = sampling.sample(
            eps_fn,
            scheduler,
            seeds,
            shape,
            num_inference_steps=opts.steps,
            cond=cond,
            uncond=uncond if opts.guidance_scale != 1.0 else None,
            guidance_scale=float(opts.guidance_scale or 1.0),
            eta=opts.eta,
            decode_fn=decode_fn,
            on_step=on_step,
            # A batch-invariant denoiser computes each Triton request alone: send it one image.
            per_image=self._mode(record, "denoiser")[0],
        )
        return to_hwc(result.images)

    # -- the whole request ----------------------------------------------------------------
    def generate(
        self,
        options: GenerateOptions,
        *,
        cancel: CancelToken = NEVER,
        sink: EventSink | None = None,
        tenant: str = "",
        admin: bool = False,
    ) -> GenerateResult:
        """One request of ``tenant``: its quotas are held (and the fair gate passed) throughout.

        Models private to another tenant resolve as unknown (``admin``: every model); stored
        outputs are recorded as ``tenant``'s.
        """
        catalog = self.catalog.seen_by(Viewer(tenant, admin))
        record, opts = validate(options, catalog)  # 1.
        if opts.reward.active and opts.reward.reward_model:  # another tenant's: unknown
            catalog.get(
                opts.reward.reward_model,
                opts.reward.reward_version,
                field_name="reward_filter.reward_model",
            )
        if opts.to_pacs:
            check_destination(opts.to_pacs, self.outbox.destinations if self.outbox else {})
        request_id = opts.request_id or uuid.uuid4().hex
        opts = replace(opts, request_id=request_id)
        with self.quotas.generation(tenant, opts.num_images):
            started = time.perf_counter()
            if self.metrics is not None:
                self.metrics.queue_depth.inc()
            try:
                with self.gate.held(tenant, cancel.check):
                    return self._generate(record, opts, cancel, sink, started, tenant, catalog)
            finally:
                if self.metrics is not None:
                    self.metrics.queue_depth.dec()

    def _generate(
        self,
        record: ModelRecord,
        opts: GenerateOptions,
        cancel: CancelToken,
        sink: EventSink | None,
        started: float,
        tenant: str,
        catalog: Catalog,
    ) -> GenerateResult:
        pixels, seeds, rewards, candidates = self._sample_with_filter(
            record, opts, cancel, sink, catalog
        )
        pixels, seeds, rewards, verdicts = self._memorization_gate(
            record, opts, pixels, seeds, rewards, candidates, cancel, sink
        )  # 5b.
        images = self._encode(record, opts, pixels, seeds, rewards, verdicts)  # 6.
        provenance_ref = self._store(opts, images, tenant) if opts.store_outputs else None
        pacs = self._to_pacs(record, opts, images) if opts.to_pacs else []
        if sink is not None:
            for image in images:
                sink(image)
        if self.metrics is not None:
            self.metrics.images.labels(record.name, str(record.version)).inc(len(images))
            self.metrics.request_duration.labels(record.name).observe(time.perf_counter() - started)
        return GenerateResult(images, opts.request_id, candidates, provenance_ref, pacs)

    def _sample_with_filter(
        self,
        record: ModelRecord,
        opts: GenerateOptions,
        cancel: CancelToken,
        sink: EventSink | None,
        catalog: Catalog,
    ) -> tuple[list[np.ndarray], list[int], list[float | None], int]:
        assert opts.seed is not None
        n = opts.num_images
        rf = opts.reward
        if not rf.active:
            seeds = [opts.seed + i for i in range(n)]
            return self.sample(record, opts, seeds, cancel=cancel, sink=sink), seeds, [None] * n, n
        if self.reward_scorer is None:
            raise InvalidArgument.for_field("reward_filter", "no reward scorer is configured")
        # 5. Best-of-n / threshold: rounds of candidates until enough pass or the budget ends.
        per_image = max(rf.best_of_n, 1)
        budget = rf.max_candidates * n if rf.max_candidates else max(8, 4 * per_image) * n
        condition = opts.class_name or opts.prompt
        kept: list[tuple[float, int, np.ndarray]] = []
        next_seed, made, rounds = opts.seed, 0, 0
        while made < budget:
            batch = min(per_image * n if rounds == 0 else n, budget - made)
            seeds = list(range(next_seed, next_seed + batch))
            next_seed += batch
            imgs = self.sample(
                record,
                opts,
                seeds,
                cancel=cancel,
                sink=sink,
                step_offset=rounds * opts.steps,
                total_steps=opts.steps,
            )
            scores = self.reward_scorer(
                np.stack(imgs), condition, rf.reward_model, rf.reward_version, catalog=catalog
            )
            made += batch
            rounds += 1
            kept += [
                (float(s), seed, img)
                for s, seed, img in zip(scores, seeds, imgs, strict=True)
                if s >= rf.min_reward
            ]
            if len(kept) >= n and (rounds > 0 and made >= per_image * n):
                break
        kept.sort(key=lambda item: -item[0])
        kept = kept[:n]
        return ([k[2] for k in kept], [k[1] for k in kept], [k[0] for k in kept], made)

    def _memorization_gate(
        self,
        record: ModelRecord,
        opts: GenerateOptions,
        pixels: list[np.ndarray],
        seeds: list[int],
        rewards: list[float | None],
        candidates: int,
        cancel: CancelToken,
        sink: EventSink | None,
    ) -> tuple[list[np.ndarray], list[int], list[float | None], list[memorization.Verdict]]:
        """Nearest training distance of each image (Triton ``similarity``), then the policy.

        ``regenerate`` resamples a flagged image with the next seed no candidate used (so the
        replacement is what a request with that seed gives), ``refuse`` fails the request.
        """
        policy = opts.memorization or memorization.DEFAULT_POLICY
        n = len(pixels)
        info = record.extra.get("similarity")
        if policy == "off":
            return pixels, seeds, rewards, [memorization.Verdict("off")] * n
        if "similarity" not in record.components or not isinstance(info, dict):
            self._count_memorization(record, ["no_index"] * n)
            return pixels, seeds, rewards, [memorization.Verdict(memorization.NO_INDEX)] * n
        pixels, seeds, rewards = list(pixels), list(seeds), list(rewards)
        tries = [1] * n
        checks: list[memorization.Check | None] = [None] * n
        assert opts.seed is not None
        next_seed = opts.seed + candidates
        pending = list(range(n))
        while pending:
            found = self.nearest_training(record, [pixels[i] for i in pending])
            again = []
            for i, check in zip(pending, found, strict=True):
                checks[i] = check
                action = memorization.decide(policy, check, tries[i], self.memorization_tries)
                if action == "refuse":
                    self._count_memorization(record, ["refused"])
                    raise memorization.refusal(policy, i, check, tries[i])
                if action == "resample":
                    again.append(i)
            if not again:
                break
            fresh = list(range(next_seed, next_seed + len(again)))
            next_seed += len(again)
            redo = self.sample(record, opts, fresh, cancel=cancel, sink=sink)
            for i, seed, img in zip(again, fresh, redo, strict=True):
                pixels[i], seeds[i], rewards[i] = img, seed, None
                tries[i] += 1
            pending = again
        digest, extractor = str(info.get("digest", "")), str(info.get("extractor", ""))
        verdicts = []
        for found_check, count in zip(checks, tries, strict=True):
            assert found_check is not None
            verdicts.append(memorization.verdict(policy, found_check, count, digest, extractor))
        self._count_memorization(record, [v.decision for v in verdicts])
        return pixels, seeds, rewards, verdicts

    def _count_memorization(self, record: ModelRecord, decisions: list[str]) -> None:
        if self.metrics is not None:
            for decision in decisions:
                label = decision.replace(" ", "_")
                self.metrics.memorization.labels(record.name, label).inc()

    def nearest_training(
        self, record: ModelRecord, pixels: list[np.ndarray]
    ) -> list[memorization.Check]:
        """Each image's nearest training image in the model's index (Triton ``similarity``)."""
        threshold = float(record.extra["similarity"]["memorization_threshold"])
        arr = np.stack([p[None] if p.ndim == 2 else np.transpose(p, (2, 0, 1)) for p in pixels])
        res = similarity.query(
            self.triton,
            record,
            arr,
            ["pixel_distance", "pixel_index", "embedding_distance"],
            batch=MAX_TRITON_BATCH,
        )
        return [
            memorization.Check(float(d), threshold, int(r), float(e))
            for d, r, e in zip(
                res["pixel_distance"], res["pixel_index"], res["embedding_distance"], strict=True
            )
        ]

    def _encode(
        self,
        record: ModelRecord,
        opts: GenerateOptions,
        pixels: list[np.ndarray],
        seeds: list[int],
        rewards: list[float | None],
        verdicts: list[memorization.Verdict] | None = None,
    ) -> list[GeneratedImage]:
        replay = self.replay(record)
        gate = verdicts or [memorization.Verdict("off")] * len(pixels)
        provenances = [
            Provenance(
                model_name=record.name,
                model_version=str(record.version),
                model_digest=record.digest,
                seed=int(seed),
                sampler=opts.sampler,
                steps=opts.steps,
                guidance_scale=float(opts.guidance_scale or 1.0),
                size=(opts.height, opts.width),
                request_id=opts.request_id,
                prompt=opts.prompt,
                negative_prompt=opts.negative_prompt,
                class_name=opts.class_name,
                software_version=__version__,
                replay=replay,
                extra={
                    k: v
                    for k, v in {
                        "eta": str(opts.eta) if opts.eta else "",
                        "reward": f"{reward:.4f}" if reward is not None else "",
                        "reward_model": opts.reward.reward_model,
                        "kind": record.kind,
                    }.items()
                    if v
                }
                | verdict.provenance(),
            )
            for seed, reward, verdict in zip(seeds, rewards, gate, strict=True)
        ]
        if opts.format == "dicom":
            blobs = self._dicom_series(record, opts, pixels, provenances)
        elif opts.format == "raw":
            blobs = [b"" for _ in pixels]
        else:
            bits = 16 if opts.format == "png16" and record.channels == 1 else 8
            blobs = [
                encode.encode_png(p, prov, bits=bits)
                for p, prov in zip(pixels, provenances, strict=True)
            ]
        return [
            GeneratedImage(i, p, blob, opts.format, prov, reward, memorization=verdict)
            for i, (p, blob, prov, reward, verdict) in enumerate(
                zip(pixels, blobs, provenances, rewards, gate, strict=True)
            )
        ]

    @staticmethod
    def _dicom_series(
        record: ModelRecord,
        opts: GenerateOptions,
        pixels: list[np.ndarray],
        provenances: list[Provenance],
    ) -> list[bytes]:
        return encode.encode_dicom_series(
            pixels,
            provenances,
            bits=8 if record.channels == 3 else 16,
            modality=opts.modality or "OT",
            patient_id=opts.patient_id or None,
            series_description=opts.series_description or None,
        )

    def _to_pacs(
        self, record: ModelRecord, opts: GenerateOptions, images: list[GeneratedImage]
    ) -> list[OutboxItem]:
        """The request's series, durable in the outbox before the reply (delivered later)."""
        assert self.outbox is not None  # checked with the options
        if opts.format == "dicom":
            blobs = [image.data for image in images]
        else:
            blobs = self._dicom_series(
                record, opts, [i.pixels for i in images], [i.provenance for i in images]
            )
        return self.outbox.enqueue(opts.to_pacs, opts.request_id, blobs)

    def store_if_too_large(
        self, opts: GenerateOptions, result: GenerateResult, tenant: str = ""
    ) -> None:
        """A unary reply over ``INLINE_LIMIT`` is stored and answered with references instead."""
        size = sum(len(i.data) or i.pixels.nbytes for i in result.images)
        if size > INLINE_LIMIT and not opts.store_outputs:
            result.provenance_ref = self._store(opts, result.images, tenant)

    def _store(
        self, opts: GenerateOptions, images: list[GeneratedImage], tenant: str = ""
    ) -> ObjectInfo:
        """Every stored output carries its tenant (object metadata): others read it as missing."""
        prefix = opts.output_prefix or time.strftime("outputs/%Y/%m/%d/") + opts.request_id
        prefix = prefix.rstrip("/") + "/"
        refuse_foreign_prefix(self.store, prefix + "provenance.json", tenant, "output_prefix")
        owner = owner_metadata(tenant)
        records = []
        for image in images:
            suffix = {"dicom": ".dcm", "raw": ".npy"}.get(image.format, ".png")
            key = f"{prefix}image_{image.index:03d}{suffix}"
            data = image.data
            if image.format == "raw":
                buf = io.BytesIO()
                np.save(buf, image.pixels)
                data = buf.getvalue()
            image.stored = self.store.put_bytes(key, data, metadata=owner)
            records.append(
                {
                    "key": key,
                    "sha256": image.stored.sha256,
                    "reward": image.reward,
                    **image.provenance.to_dict(),
                }
            )
        return self.store.put_bytes(
            prefix + "provenance.json",
            json.dumps(records, indent=2).encode(),
            content_type="application/json",
            metadata=owner,
        )
