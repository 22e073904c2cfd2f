"""Counterfactual RPCs: declarations, typed results, request building and stream folding.

The calls themselves are ``Client`` / ``AsyncClient`` methods (see ``_rpc`` for the layout):

with clinisynth.Client() as client:
    cf = client.counterfactual("fundus.png", target="referable", seed=1)
    print(cf.p_target_before, "→", cf.p_target_after, "distance", cf.distance)
    cf.save("out/", stem="fundus")     # .counterfactual.png .diff.png .side_by_side.png .json
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from clinisynth import _images
from clinisynth._reward import check_domain_guard
from clinisynth._rpc import ProgressCallback, Rpc, model_ref
from clinisynth._types import PacsItem, ProgressEvent, provenance_dict
from clinisynth.v1 import common_pb2, counterfactual_pb2, counterfactual_pb2_grpc

STUB = counterfactual_pb2_grpc.CounterfactualServiceStub
SERVICE = "counterfactual"
MODES = {
    "cone": counterfactual_pb2.GUIDANCE_MODE_CONE,
    "robust_only": counterfactual_pb2.GUIDANCE_MODE_ROBUST_ONLY,
    "plain_only": counterfactual_pb2.GUIDANCE_MODE_PLAIN_ONLY,
}
DISTANCES = {"l2": counterfactual_pb2.DISTANCE_KIND_L2, "l1": counterfactual_pb2.DISTANCE_KIND_L1}
_FORMAT_NAMES = {v: k for k, v in _images.FORMATS.items()}


def _seeded(req: counterfactual_pb2.CounterfactualRequest) -> bool:
    return req.HasField("seed")  # same seed, same counterfactual: repeating it is safe


CREATE = Rpc(SERVICE, STUB, "CreateCounterfactual", idempotent=_seeded)
STREAM = Rpc(SERVICE, STUB, "CounterfactualStream", streaming="server")
BATCH = Rpc(SERVICE, STUB, "CounterfactualBatch", streaming="server")
LIST_MODELS = Rpc(SERVICE, STUB, "ListModels", idempotent=True)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrajectoryPoint:
    """P(target | x̂₀) of both classifiers at one guided step (1-based)."""

    step: int
    p_robust: float
    p_plain: float
    gradient_angle_deg: float


@dataclass
class CounterfactualResult:
    """One counterfactual: the image, the signed difference to the input, probabilities, facts.

    ``difference`` is counterfactual − input in [0, 1] pixel units (float32, [H, W] or
    [H, W, 3]); ``p_target_before`` / ``p_target_after`` are the robust classifier's, the plain
    one's are in ``p_target_*_plain``.
    """

    data: bytes  # the counterfactual, encoded (PNG / DICOM); empty for raw
    array: np.ndarray | None  # the counterfactual for format="raw"
    format: str
    difference: np.ndarray
    overlay_png: bytes
    p_target_before: float
    p_target_after: float
    p_target_before_plain: float
    p_target_after_plain: float
    trajectory: list[TrajectoryPoint]
    distance: float
    target_class: str
    provenance: dict[str, Any]
    ref: dict[str, Any] | None = None
    # The service's verdict: ``flipped`` when the robust classifier moved the input into the
    # target class (P > 0.5); ``already_target`` when the input was in it before the edit (then
    # ``flipped`` is False and the probabilities say what changed).
    flipped: bool = False
    already_target: bool = False
    # With ``to_pacs``: the outbox item of the counterfactual ("pending" when answered).
    pacs: list[PacsItem] = field(default_factory=list)
    # The out-of-domain guard on the input (see ImageScore.domain).
    domain: str = ""
    domain_score: float | None = None
    domain_threshold: float | None = None

    def to_numpy(self) -> np.ndarray:
        """The counterfactual as float32 in [0, 1]."""
        if self.array is None and not self.data:
            raise ValueError("the counterfactual was stored, not returned: fetch it by `ref`")
        if self.format == "dicom":
            raise ValueError("DICOM bytes: read them with pydicom (save() writes the .dcm)")
        return _images.to_numpy(self.data, self.array)

    def to_pil(self) -> PILImage.Image:
        return _to_pil(self.to_numpy())

    def input_array(self) -> np.ndarray:
        """The input as the model saw it (counterfactual − difference), float32 in [0, 1]."""
        return np.clip(self.to_numpy() - self.difference, 0, 1).astype(np.float32)

    def difference_image(self) -> PILImage.Image:
        """The signed difference as RGB: blue darker, white unchanged, red brighter."""
        d = self.difference if self.difference.ndim == 2 else self.difference.mean(axis=2)
        scale = max(float(np.abs(d).max()), 0.05)
        t = np.clip(d / scale, -1, 1)[..., None]
        white = np.ones((*d.shape, 3))
        red, blue = np.array([0.85, 0.1, 0.1]), np.array([0.1, 0.25, 0.85])
        rgb = np.where(t >= 0, white * (1 - t) + red * t, white * (1 + t) + blue * (-t))
        return PILImage.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")

    def overlay(self) -> PILImage.Image:
        """The service's colour overlay of the difference on the input."""
        import io

        return PILImage.open(io.BytesIO(self.overlay_png)).convert("RGB")

    def side_by_side(self, *, scale: int | None = None) -> PILImage.Image:
        """Input | counterfactual | difference | overlay, with P(target) written underneath."""
        panels = [
            _to_pil(self.input_array()).convert("RGB"),
            self.to_pil().convert("RGB"),
            self.difference_image(),
            self.overlay(),
        ]
        w, h = panels[0].size
        scale = scale or max(1, 256 // max(w, h))
        panels = [p.resize((w * scale, h * scale), PILImage.Resampling.NEAREST) for p in panels]
        pw, ph = panels[0].size
        gap, caption = 4, 30
        figure = PILImage.new("RGB", (4 * pw + 3 * gap, ph + caption), "white")
        draw = ImageDraw.Draw(figure)
        labels = [
            f"input  p={self.p_target_before:.2f}",
            f"{self.target_class}  p={self.p_target_after:.2f}",
            f"difference  d={self.distance:.3f}",
            "overlay",
        ]
        for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
            x = i * (pw + gap)
            figure.paste(panel, (x, 0))
            draw.text((x + 2, ph + 4), label, fill="black")
        return figure

    def summary(self) -> dict[str, Any]:
        """Probabilities, distance, trajectory and provenance (what ``save`` writes as JSON)."""
        return {
            "target_class": self.target_class,
            "p_target_before": {
                "robust": self.p_target_before,
                "plain": self.p_target_before_plain,
            },
            "p_target_after": {"robust": self.p_target_after, "plain": self.p_target_after_plain},
            "flipped": self.flipped,
            "already_target": self.already_target,
            "distance": self.distance,
            "trajectory": [vars(p) for p in self.trajectory],
            "provenance": self.provenance,
            "ref": self.ref,
        }

    def save_image(self, path: str | pathlib.Path) -> pathlib.Path:
        """The counterfactual as returned (PNG / DICOM bytes, or .npy for raw)."""
        path = pathlib.Path(path)
        if self.array is not None:
            path = path.with_suffix(".npy")
            np.save(path, self.array)
        else:
            path.write_bytes(self.data)
        return path

    def save_difference(self, path: str | pathlib.Path) -> pathlib.Path:
        """``.npy``: the raw signed float32 map; any other suffix: the colour rendering."""
        path = pathlib.Path(path)
        if path.suffix == ".npy":
            np.save(path, self.difference)
        else:
            self.difference_image().save(path)
        return path

    def save_side_by_side(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        self.side_by_side().save(path)
        return path

    def save(self, out_dir: str | pathlib.Path, stem: str = "image") -> dict[str, pathlib.Path]:
        """``<stem>.counterfactual.png`` (or .dcm / .npy), ``.diff.png``, ``.side_by_side.png``
        and ``.json`` in ``out_dir``."""
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        suffix = {"dicom": ".dcm", "raw": ".npy"}.get(self.format, ".png")
        paths = {
            "counterfactual": self.save_image(out / f"{stem}.counterfactual{suffix}"),
            "diff": self.save_difference(out / f"{stem}.diff.png"),
        }
        if self.format != "dicom":
            paths["side_by_side"] = self.save_side_by_side(out / f"{stem}.side_by_side.png")
        paths["json"] = out / f"{stem}.json"
        paths["json"].write_text(json.dumps(self.summary(), indent=2, default=str))
        return paths


@dataclass(frozen=True)
class CounterfactualBatchItem:
    input_key: str
    result: dict[str, Any] | None
    p_target_before: float
    p_target_after: float
    distance: float
    flipped: bool
    error: str = ""
    already_target: bool = False


@dataclass
class CounterfactualBatchResult:
    """Summary of a batch: flip rate by the robust classifier (P > 0.5) and mean distance."""

    images: int
    failed: int
    flip_rate: float
    mean_distance: float
    summary: dict[str, Any] | None
    items: list[CounterfactualBatchItem] = field(default_factory=list)
    already_target: int = 0  # inputs already in the target class (not counted in flip_rate)


def _to_pil(arr: np.ndarray) -> PILImage.Image:
    return PILImage.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


def _ref(r: common_pb2.ArtifactRef) -> dict[str, Any]:
    return {
        "key": r.key,
        "uri": r.uri,
        "sha256": r.sha256,
        "size_bytes": r.size_bytes,
        "presigned_url": r.presigned_url,
    }


def _point(p: counterfactual_pb2.TrajectoryPoint) -> TrajectoryPoint:
    return TrajectoryPoint(p.step, p.p_target_robust, p.p_target_plain, p.gradient_angle_deg)


def counterfactual_result(resp: counterfactual_pb2.CounterfactualResponse) -> CounterfactualResult:
    data, array = _images.decode_image(resp.counterfactual)
    ref = _ref(resp.counterfactual.ref) if resp.counterfactual.WhichOneof("data") == "ref" else None
    _, diff = _images.decode_image(resp.difference)
    return CounterfactualResult(
        data=data,
        array=None if array is None else array.astype(np.float32),
        format=_FORMAT_NAMES.get(resp.counterfactual.format, "png"),
        difference=np.asarray(diff, dtype=np.float32),
        overlay_png=resp.overlay.encoded,
        p_target_before=resp.p_target_before_robust,
        p_target_after=resp.p_target_after_robust,
        p_target_before_plain=resp.p_target_before_plain,
        p_target_after_plain=resp.p_target_after_plain,
        trajectory=[_point(p) for p in resp.trajectory],
        distance=resp.distance,
        target_class=resp.target_class,
        provenance=provenance_dict(resp.provenance),
        ref=ref,
        flipped=resp.flipped,
        already_target=resp.already_target,
        pacs=[PacsItem.from_proto(m) for m in resp.pacs],
        domain=resp.domain.decision,
        domain_score=resp.domain.score if resp.domain.HasField("score") else None,
        domain_threshold=resp.domain.threshold if resp.domain.HasField("score") else None,
    )


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


def _input_image(image: _images.ImageLike) -> common_pb2.Image:
    if isinstance(image, np.ndarray) and image.dtype.kind in "ui":
        top = 255.0 if image.dtype == np.uint8 else float(np.iinfo(image.dtype).max)
        image = image.astype(np.float32) / top  # the service takes raw floats in [0, 1]
    return _images.to_proto_image(image)


def counterfactual_request(
    image: _images.ImageLike | None,
    *,
    target: str,
    diffusion_model: str | None = None,
    robust_classifier: str | None = None,
    plain_classifier: str | None = None,
    start_depth: float | None = None,
    steps: int | None = None,
    lambda_c: float | None = None,
    cone_angle_deg: float | None = None,
    distance: str | None = None,
    lambda_d: float | None = None,
    seed: int | None = None,
    mode: str | None = None,
    resize: bool = False,
    format: str = "png",
    store: bool = False,
    request_id: str | None = None,
    to_pacs: str | None = None,
    domain_guard: str | None = None,
) -> counterfactual_pb2.CounterfactualRequest:
    """Build the request; knobs left ``None`` take the service's published defaults."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    if distance is not None and distance not in DISTANCES:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)}, not {distance!r}")
    if format not in _images.FORMATS:
        raise ValueError(f"format must be one of {sorted(_images.FORMATS)}, not {format!r}")
    req = counterfactual_pb2.CounterfactualRequest(
        target_class=target,
        diffusion_model=model_ref(diffusion_model),
        robust_classifier=model_ref(robust_classifier),
        plain_classifier=model_ref(plain_classifier),
        steps=steps or 0,
        distance=DISTANCES.get(distance or "", counterfactual_pb2.DISTANCE_KIND_UNSPECIFIED),
        mode=MODES.get(mode or "", counterfactual_pb2.GUIDANCE_MODE_UNSPECIFIED),
        resize=resize,
        format=_images.FORMATS[format],
        store_outputs=store,
        request_id=request_id or "",
        to_pacs=to_pacs or "",
        domain_guard=check_domain_guard(domain_guard),
    )
    if image is not None:
        req.image.CopyFrom(_input_image(image))
    for name, value in (
        ("start_depth", start_depth),
        ("lambda_c", lambda_c),
        ("cone_angle_deg", cone_angle_deg),
        ("lambda_d", lambda_d),
        ("seed", seed),
    ):
        if value is not None:
            setattr(req, name, value)
    return req


def batch_request(
    input_prefix: str,
    *,
    output_prefix: str | None,
    limit: int,
    options: counterfactual_pb2.CounterfactualRequest,
) -> counterfactual_pb2.CounterfactualBatchRequest:
    return counterfactual_pb2.CounterfactualBatchRequest(
        input_prefix=input_prefix, output_prefix=output_prefix or "", options=options, limit=limit
    )


PointCallback = Callable[[TrajectoryPoint], None]
ItemCallback = Callable[[CounterfactualBatchItem], None]


class _StreamFolder:
    """Folds stream events into a result, calling the user's callbacks on the way."""

    def __init__(self, on_point: PointCallback | None, progress: ProgressCallback | None) -> None:
        self.on_point = on_point
        self.progress = progress
        self.result: CounterfactualResult | None = None

    def feed(self, event: counterfactual_pb2.CounterfactualEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "point" and self.on_point is not None:
            self.on_point(_point(event.point))
        elif kind == "progress" and self.progress is not None:
            p = event.progress
            self.progress(ProgressEvent(p.stage, p.step, p.total_steps, p.fraction, p.message))
        elif kind == "done":
            self.result = counterfactual_result(event.done)

    def finish(self) -> CounterfactualResult:
        if self.result is None:
            raise RuntimeError("the counterfactual stream ended without a result")
        return self.result


class _BatchFolder:
    def __init__(self, on_item: ItemCallback | None, progress: ProgressCallback | None) -> None:
        self.on_item = on_item
        self.progress = progress
        self.items: list[CounterfactualBatchItem] = []
        self.result: CounterfactualBatchResult | None = None

    def feed(self, event: counterfactual_pb2.CounterfactualBatchEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "item":
            m = event.item
            item = CounterfactualBatchItem(
                m.input_key,
                _ref(m.result) if m.HasField("result") else None,
                m.p_target_before_robust,
                m.p_target_after_robust,
                m.distance,
                m.flipped,
                m.error,
                m.already_target,
            )
            self.items.append(item)
            if self.on_item is not None:
                self.on_item(item)
        elif kind == "progress" and self.progress is not None:
            p = event.progress
            self.progress(ProgressEvent(p.stage, p.step, p.total_steps, p.fraction, p.message))
        elif kind == "done":
            d = event.done
            self.result = CounterfactualBatchResult(
                images=d.images,
                failed=d.failed,
                flip_rate=d.flip_rate,
                mean_distance=d.mean_distance if not math.isnan(d.mean_distance) else math.nan,
                summary=_ref(d.summary) if d.HasField("summary") else None,
                items=self.items,
                already_target=d.already_target,
            )

    def finish(self) -> CounterfactualBatchResult:
        if self.result is None:
            raise RuntimeError("the counterfactual batch stream ended without a summary")
        return self.result
