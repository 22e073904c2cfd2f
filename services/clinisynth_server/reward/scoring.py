"""Scoring images with a reward model served by Triton (role ``reward_scorer``).

The reward service, the generator's reward-filtered sampling (``runtime/dependencies.py``) and the
benchmarks all score through here, so they agree on preprocessing:

1. resolve the reward model (catalog record, kind ``reward``);
2. images ``[H, W]`` / ``[H, W, C]`` float in [0, 1] → the model's channels and size
   (resized only when asked; the generator always asks) → ``[B, C, H, W]``;
3. condition → ``class_label`` (index into the record's classes) or ``text_embedding``
   (:func:`clinisynth_server.reward.text.embed_text`);
4. Triton calls in batches of the Triton model's ``max_batch_size``; ``p_aligned`` back.

Caller images are decoded by :func:`decode_inputs`: every image's declared size is checked (per
image and against the request's :class:`~clinisynth_server.imaging.decode.PixelBudget`) before
any is decoded, then each is decoded and fitted to the model right away, so a request holds one
full-size image at a time whatever its length.

**Default reward model** (``model=""``): the newest-registered reward model that can judge the
condition — for a class name, one whose ``classes`` include it; for a prompt, a text-conditioned
one. Ties go to the most recently created record, so a reward model promoted by the finetune
service becomes the default without a restart.
"""

from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.imaging import decode as imdecode
from clinisynth_server.imaging.decode import ImageHeader, PixelBudget, resize_to
from clinisynth_server.reward import images as imgs
from clinisynth_server.reward.text import ENCODER, embed_text
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.triton.client import TritonClient

if TYPE_CHECKING:
    from clinisynth_server.methods.reward_model import RewardModel

ROLE = "reward_scorer"
COMPONENT = "scorer"
DEFAULT_TRITON_BATCH = 16
MAX_TRITON_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class Condition:
    """A class name or a prompt (exactly one is set)."""

    class_name: str = ""
    prompt: str = ""

    @property
    def label(self) -> str:
        """Bounded metrics label: the class, or "prompt"."""
        return self.class_name or ("prompt" if self.prompt else "")

    @property
    def key(self) -> str:
        return f"class:{self.class_name}" if self.class_name else f"prompt:{self.prompt}"

    def to_json(self) -> dict[str, str]:
        return {"class_name": self.class_name} if self.class_name else {"prompt": self.prompt}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Condition:
        return cls(class_name=data.get("class_name", ""), prompt=data.get("prompt", ""))


def conditioning(record: ModelRecord) -> str:
    """ "class" or "text" for a reward record."""
    return str(record.extra.get("conditioning", "class" if record.classes else "text"))


def can_judge(record: ModelRecord, condition: Condition) -> bool:
    if condition.class_name:
        return conditioning(record) == "class" and condition.class_name in record.classes
    return conditioning(record) == "text" and bool(condition.prompt)


def resolve_model(
    catalog: Catalog,
    model: str,
    version: str,
    condition: Condition | None,
    *,
    field: str = "model",
) -> ModelRecord:
    """The reward model to use (see the module doc for the default); INVALID_ARGUMENT if none."""
    if model:
        record = catalog.get(model, version, field_name=field)
        if record.kind != "reward":
            raise InvalidArgument.for_field(
                f"{field}.name", f"{record.ref} is a {record.kind} model, not a reward model"
            )
        return record
    candidates = [r for r in catalog.list(kind="reward")]
    if condition is not None:
        candidates = [r for r in candidates if can_judge(r, condition)]
    if not candidates:
        what = f" for {condition.key}" if condition is not None else ""
        raise InvalidArgument.for_field(
            f"{field}.name", f"no reward model is registered{what}; name one or register one"
        )
    return max(candidates, key=lambda r: (r.created, r.name))


def check_condition(record: ModelRecord, condition: Condition, field: str) -> None:
    """The condition must be one the model was trained on (class) or a prompt (text)."""
    if conditioning(record) == "class":
        if condition.prompt or not condition.class_name:
            raise InvalidArgument.for_field(
                f"{field}.class_name",
                f"{record.ref} is class-conditioned: a class is required, one of {record.classes}",
            )
        if condition.class_name not in record.classes:
            raise InvalidArgument.for_field(
                f"{field}.class_name",
                f"unknown class {condition.class_name!r} for {record.ref}; one of {record.classes}",
            )
    elif not condition.prompt.strip():
        raise InvalidArgument.for_field(
            f"{field}.prompt", f"{record.ref} is text-conditioned: a prompt is required"
        )


def model_size(record: ModelRecord) -> tuple[int, int]:
    """(height, width) the reward model scores."""
    return (record.height or record.width, record.width)


def fit_to_model(img: np.ndarray, record: ModelRecord, *, resize: bool, field: str) -> np.ndarray:
    """One float image ``[H, W]`` / ``[H, W, C]`` → ``[C, H, W]`` at the model's channels, size."""
    size = model_size(record)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidArgument.for_field(
            field, f"expected [H, W] or [H, W, 3], got shape {list(arr.shape)}"
        )
    if arr.ndim == 3:
        arr = arr[:, :, :3]
        if record.channels == 1:
            arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.shape[:2] != size:
        if not resize and size[0] and size[1]:
            raise InvalidArgument.for_field(
                field,
                f"image is {arr.shape[0]}x{arr.shape[1]}, {record.ref} scores "
                f"{size[0]}x{size[1]}: resize it or pass resize=true",
            )
        if size[0] and size[1]:
            arr = resize_to(arr, size)
    if arr.ndim == 2:
        arr = arr[None] if record.channels == 1 else np.repeat(arr[None], 3, axis=0)
    else:
        arr = np.transpose(arr, (2, 0, 1))
    return np.clip(arr, 0.0, 1.0)


def to_model_input(
    images: Sequence[np.ndarray], record: ModelRecord, *, resize: bool, field: str = "images"
) -> np.ndarray:
    """Per-image float arrays → ``[B, C, H, W]`` float32 at the model's channels and size."""
    out = np.empty((len(images), record.channels, *model_size(record)), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = fit_to_model(img, record, resize=resize, field=f"{field}[{i}]")
    return out


def declared_size(
    image: imgs.ImageInput, field: str, *, max_bytes: int, max_pixels: int
) -> ImageHeader | None:
    """An inline image's declared size from its header (None: a reference, read when decoded)."""
    where = f"{field}.{image.kind}"
    if image.kind in ("encoded", "dicom"):
        imgs.check_size(image, where, max_bytes)
        return imdecode.inspect_image(image.data, field=where, max_pixels=max_pixels)
    if image.kind == "raw" and len(image.shape) in (2, 3) and all(d > 0 for d in image.shape):
        samples = image.shape[2] if len(image.shape) == 3 else 1
        return ImageHeader("raw", image.shape[0], image.shape[1], 1, samples, 4)
    return None


def decode_inputs(
    images: Sequence[imgs.ImageInput],
    record: ModelRecord,
    *,
    store: ArtifactStore,
    max_bytes: int,
    resize: bool,
    errors: ValidationErrors,
    budget: PixelBudget,
    field: str = "images",
    offset: int = 0,
    max_pixels: int = imdecode.DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Caller images → ``[B, C, H, W]`` model input, holding one full-size image at a time.

    1. Every inline image's declared size is checked against ``max_pixels`` and the request's
       ``budget`` from its header; any violation is added to ``errors`` and nothing is decoded.
    2. Each image is decoded (charged to ``budget``: references are sized only once read) and
       fitted to the model at once, its full-size array dropped before the next is decoded.

    Violations go to ``errors`` (the caller raises them all at once); failed images stay zero.
    """
    out = np.zeros((len(images), record.channels, *model_size(record)), dtype=np.float32)
    precheck = PixelBudget(budget.limit)
    before = len(errors.violations)
    for i, image in enumerate(images):
        where = f"{field}[{offset + i}]"
        try:
            header = declared_size(image, where, max_bytes=max_bytes, max_pixels=max_pixels)
            if header is not None:
                precheck.charge(f"{where}.{image.kind}", header)
        except InvalidArgument as exc:
            errors.violations.extend(exc.violations)
            if precheck.exceeded:
                break
    if len(errors.violations) > before:
        return out
    for i, image in enumerate(images):
        where = f"{field}[{offset + i}]"
        try:
            arr = imgs.decode(
                image,
                field=where,
                store=store,
                max_bytes=max_bytes,
                channels=record.channels,
                budget=budget,
            )
            out[i] = fit_to_model(arr, record, resize=resize, field=where)
            del arr
        except InvalidArgument as exc:
            errors.violations.extend(exc.violations)
            if budget.exceeded:
                break
    return out


class Scorer:
    """Batched reward-model calls to Triton; caches each Triton model's batch limit."""

    def __init__(self, catalog: Catalog, triton: TritonClient) -> None:
        self.catalog = catalog
        self.triton = triton
        self._lock = threading.Lock()
        self._max_batch: dict[str, int] = {}

    def max_batch(self, record: ModelRecord) -> int:
        name = record.components[COMPONENT]
        with self._lock:
            cached = self._max_batch.get(name)
        if cached is None:
            try:
                cached = int(self.triton.model_config(name).get("max_batch_size", 0))
            except Exception:  # the inference itself will report what is wrong
                cached = 0
            cached = cached or DEFAULT_TRITON_BATCH
            with self._lock:
                self._max_batch[name] = cached
        return cached

    def condition_inputs(
        self, record: ModelRecord, conditions: Sequence[Condition]
    ) -> dict[str, np.ndarray]:
        if conditioning(record) == "class":
            return {
                "class_label": np.array(
                    [record.classes.index(c.class_name) for c in conditions], dtype=np.int64
                )
            }
        dim = int(record.extra["text_dim"])
        return {"text_embedding": embed_text([c.prompt for c in conditions], dim)}

    def score(
        self,
        record: ModelRecord,
        pixels: np.ndarray,
        conditions: Sequence[Condition],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """P(aligned) per image for ``[B, C, H, W]`` pixels, one condition per image."""
        if len(conditions) != len(pixels):
            raise InvalidArgument.for_field("conditions", "one condition per image")
        if timeout_s is not None and timeout_s > MAX_TRITON_TIMEOUT_S:
            timeout_s = None  # no client deadline (gRPC reports ~9e18 s): the client default
        out = np.empty(len(pixels), dtype=np.float32)
        if not len(pixels):
            return out
        cond = self.condition_inputs(record, conditions)
        step = self.max_batch(record)
        name = record.components[COMPONENT]
        version = str(record.component_versions[COMPONENT])
        for start in range(0, len(pixels), step):
            sl = slice(start, start + step)
            inputs = {"image": pixels[sl], **{k: v[sl] for k, v in cond.items()}}
            res = self.triton.infer(
                name, inputs, ["p_aligned"], version=version, timeout_s=timeout_s
            )
            out[sl] = res["p_aligned"].reshape(-1)
        return out


def parse_condition(record: ModelRecord, condition: str) -> Condition:
    """A bare string from the generator: a class for class models, else a prompt."""
    if conditioning(record) == "class":
        return Condition(class_name=condition)
    return Condition(prompt=condition)


def score_arrays(
    catalog: Catalog,
    triton: TritonClient,
    images: np.ndarray,
    condition: str,
    *,
    model: str = "",
    version: str = "",
) -> np.ndarray:
    """P(aligned) per image of ``images`` ``[N, H, W(, C)]`` in [0, 1], resized to the model.

    ``condition`` is a class name or a prompt; ``model=""`` picks the default reward model (see
    the module doc).
    """
    record: ModelRecord | None = None
    if model:
        record = resolve_model(catalog, model, version, None, field="reward_filter.reward_model")
    else:
        for guess in (Condition(class_name=condition), Condition(prompt=condition)):
            try:
                record = resolve_model(catalog, "", "", guess, field="reward_filter.reward_model")
                break
            except InvalidArgument:
                continue
    if record is None:
        raise InvalidArgument.for_field(
            "reward_filter.reward_model",
            f"no reward model is registered for {condition!r}; name one or register one",
        )
    cond = parse_condition(record, condition)
    check_condition(record, cond, "reward_filter.condition")
    pixels = to_model_input(list(images), record, resize=True)
    return Scorer(catalog, triton).score(record, pixels, [cond] * len(pixels))


def write_reward_folder(
    model: RewardModel,
    folder: str | pathlib.Path,
    *,
    classes: Sequence[str] = (),
    width: int,
    height: int | None = None,
    labels: Mapping[str, str] | None = None,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write a trained RewardModel as a folder ``registry.register_folder`` serves in Triton.

    The folder holds the checkpoint (``config.json`` + ``model.safetensors``) and
    ``clinisynth.json`` (kind ``reward``, role ``reward_scorer``, classes, size, channels,
    conditioning). Class-conditioned models need ``classes`` in label order.
    """
    cfg = model.config
    if cfg.conditioning == "class" and len(classes) != cfg.num_classes:
        raise InvalidArgument.for_field(
            "classes", f"{len(classes)} names for a reward model with {cfg.num_classes} classes"
        )
    folder = pathlib.Path(folder)
    model.save(folder)
    meta_extra: dict[str, Any] = {"conditioning": cfg.conditioning, "backbone": cfg.backbone}
    if cfg.conditioning == "text":
        meta_extra.update({"text_dim": cfg.text_dim, "text_encoder": ENCODER})
    meta_extra.update(dict(extra or {}))
    meta = {
        "kind": "reward",
        "triton_role": ROLE,
        "component": COMPONENT,
        "classes": list(classes) if cfg.conditioning == "class" else [],
        "width": int(width),
        "height": int(height or width),
        "channels": cfg.in_channels,
        "labels": dict(labels or {}),
        "description": description,
        "extra": meta_extra,
    }
    (folder / "clinisynth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
