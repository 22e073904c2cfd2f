"""Provenance of a generated image: what made it, from what, and when.

Every image the services hand out carries one of these (as a PNG iTXt chunk, a DICOM private
block + ImageComments, or next to a raw array) so that a synthetic image can always be traced
back to the model weights, seed and conditioning that produced it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clinisynth_server import __version__

#: Written into every serialised record; the major version changes only on breaking edits.
PROVENANCE_SCHEMA = "clinisynth.provenance/1"

_MAX_SEED = 2**64 - 1


def utc_now_iso() -> str:
    """Now, as the canonical ISO-8601 UTC string used in provenance (``...Z``)."""
    return _format_utc(datetime.now(UTC))


def _format_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_utc(text: str) -> datetime:
    """Parse an ISO-8601 timestamp that must be UTC (``Z`` or ``+00:00``)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"created must be a non-empty ISO-8601 UTC string, got {text!r}")
    candidate = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        moment = datetime.fromisoformat(candidate)
    except ValueError as exc:
        raise ValueError(f"created is not ISO-8601: {text!r}") from exc
    offset = moment.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError(f"created must carry a UTC offset (Z or +00:00), got {text!r}")
    return moment


#: ``replay`` values: what re-running the same request (same seed, settings and model version)
#: is guaranteed to give. README "Replay contract" explains each.
REPLAY_EXACT_CPU = (
    "bit-identical: the same request, seed and model version give these pixels whatever else "
    "was batched, on the same CPU class (ISA), software build and Triton thread settings"
)
REPLAY_EXACT_GPU = (
    "bit-identical intended, not verified: requests computed alone with deterministic CUDA "
    "algorithms; needs the same GPU model, driver, software build and settings"
)
REPLAY_BATCHED = (
    "close: rows share batched kernels with other requests, so float pixels may differ by "
    "rounding (~1e-5) and encoded pixels by one level between runs"
)


def replay_statement(*, batch_invariant: bool, gpu: bool) -> str:
    """The ``replay`` guarantee of an image served by components in these modes."""
    if not batch_invariant:
        return REPLAY_BATCHED
    return REPLAY_EXACT_GPU if gpu else REPLAY_EXACT_CPU


@dataclass(frozen=True)
class Provenance:
    """Everything needed to reproduce (or at least identify the origin of) one generated image.

    ``size`` is ``(height, width)`` of the image as generated. ``created`` is normalised to
    ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. ``extra`` holds free string pairs (e.g. the digest of the
    source image of a counterfactual) that do not deserve a field of their own. ``replay`` says
    what a re-run reproduces (:func:`replay_statement`; empty = not stated).
    """

    model_name: str
    model_version: str
    model_digest: str
    seed: int
    sampler: str
    steps: int
    guidance_scale: float
    size: tuple[int, int]
    request_id: str
    prompt: str = ""
    negative_prompt: str = ""
    class_name: str = ""
    software_name: str = "clinisynth"
    software_version: str = __version__
    created: str = field(default_factory=utc_now_iso)
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)
    replay: str = ""

    def __post_init__(self) -> None:
        for name in (
            "model_name",
            "model_version",
            "model_digest",
            "sampler",
            "request_id",
            "prompt",
            "negative_prompt",
            "class_name",
            "software_name",
            "software_version",
            "replay",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(
            self.guidance_scale, (int, float)
        ):
            raise ValueError(f"guidance_scale must be a number, got {self.guidance_scale!r}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale!r}")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        size = tuple(self.size)
        if len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size
        ):
            raise ValueError(f"size must be (height, width) of positive ints, got {self.size!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "created", _format_utc(_parse_utc(self.created)))
        extra = dict(self.extra)
        for key, value in extra.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"extra must map str to str, got {key!r}: {value!r}")
        object.__setattr__(self, "extra", extra)

    @property
    def created_datetime(self) -> datetime:
        """``created`` as an aware UTC datetime (for DICOM dates and times)."""
        return _parse_utc(self.created)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``size`` becomes ``[height, width]``."""
        return {
            "schema": PROVENANCE_SCHEMA,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_digest": self.model_digest,
            "seed": self.seed,
            "sampler": self.sampler,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "class_name": self.class_name,
            "size": [self.size[0], self.size[1]],
            "software_name": self.software_name,
            "software_version": self.software_version,
            "created": self.created,
            "request_id": self.request_id,
            "extra": dict(self.extra),
            "replay": self.replay,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        """Inverse of :meth:`to_dict`. Unknown keys are ignored (forward compatible); a record
        of another major schema version, a missing required key or a bad value raises
        ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"provenance must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema", PROVENANCE_SCHEMA)
        if not isinstance(schema, str) or not schema.startswith("clinisynth.provenance/1"):
            raise ValueError(f"unsupported provenance schema {schema!r}")
        required = (
            "model_name",
            "model_version",
            "model_digest",
            "seed",
            "sampler",
            "steps",
            "guidance_scale",
            "size",
            "request_id",
        )
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"provenance is missing {', '.join(missing)}")
        optional = (
            "prompt",
            "negative_prompt",
            "class_name",
            "software_name",
            "software_version",
            "created",
            "extra",
            "replay",
        )
        kwargs: dict[str, Any] = {key: data[key] for key in required}
        kwargs.update({key: data[key] for key in optional if key in data})
        size = kwargs["size"]
        if not isinstance(size, (list, tuple)):
            raise ValueError(f"size must be [height, width], got {size!r}")
        kwargs["size"] = tuple(size)
        if not isinstance(kwargs.get("extra", {}), Mapping):
            raise ValueError(f"extra must be an object, got {kwargs['extra']!r}")
        return cls(**kwargs)

    def to_json(self) -> str:
        """Compact, key-sorted UTF-8 JSON (what goes into PNG chunks and DICOM private tags)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        """Parse :meth:`to_json` output; ``ValueError`` on malformed input."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"provenance is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
