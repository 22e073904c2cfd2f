"""The memorization gate: what a generation request does with an image too close to training data.

Pure decisions, no model work and no gRPC: the generator asks the model's ``similarity`` Triton
component for each image's nearest training distance, turns the answers into :class:`Check`
values and lets :func:`decide` say what happens under the request's policy:

- ``off`` — nothing is computed; provenance says the gate was off;
- ``flag`` — computed and returned; flagged images are kept (an auditor's view);
- ``regenerate`` — a flagged image is resampled with the next unused seed, up to ``max_tries``
  samples per image, then the request is refused;
- ``refuse`` — any flagged image fails the request (FAILED_PRECONDITION naming distance and
  threshold).

The default is ``regenerate``: a hospital releasing synthetic images wants no near-copy of a
patient's training image to leave the service, and wants the request to succeed when the model is
merely unlucky on one seed; a model that keeps producing copies is refused, not shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clinisynth_server.errors import FailedPrecondition

POLICIES = ("off", "flag", "regenerate", "refuse")
DEFAULT_POLICY = "regenerate"
#: Samples per image under ``regenerate`` (the first one included) before the request is refused.
DEFAULT_MAX_TRIES = 3
NO_INDEX = "no index"
REASON = "MEMORIZED_IMAGE"

Action = Literal["keep", "resample", "refuse"]


@dataclass(frozen=True)
class Check:
    """One image against the model's index: nearest thumbnail distance and the threshold."""

    distance: float
    threshold: float
    row: int
    embedding_distance: float

    @property
    def flagged(self) -> bool:
        return self.distance < self.threshold


@dataclass(frozen=True)
class Verdict:
    """What provenance records for one image (never the training image or its name)."""

    decision: str  # "off" | "no index" | "passed" | "flagged" | "regenerated"
    check: Check | None = None
    tries: int = 1
    index_digest: str = ""
    extractor: str = ""

    def provenance(self) -> dict[str, str]:
        """The ``memorization*`` provenance fields (PNG text chunk / DICOM)."""
        out = {"memorization": self.decision}
        if self.check is not None:
            out.update(
                {
                    "memorization_distance": f"{self.check.distance:.6f}",
                    "memorization_threshold": f"{self.check.threshold:.6f}",
                    "memorization_index": self.index_digest,
                    "memorization_extractor": self.extractor,
                    "memorization_tries": str(self.tries),
                }
            )
        return out


def check_policy(policy: str) -> str:
    """The policy named in a request ("" = the default); ValueError for an unknown one."""
    value = (policy or DEFAULT_POLICY).strip().lower()
    if value not in POLICIES:
        raise ValueError(f"must be one of {POLICIES}, got {policy!r}")
    return value


def decide(policy: str, check: Check, tries: int, max_tries: int = DEFAULT_MAX_TRIES) -> Action:
    """The action for an image that took ``tries`` samples so far (1 = its first seed)."""
    if not check.flagged or policy in ("off", "flag"):
        return "keep"
    if policy == "refuse":
        return "refuse"
    return "resample" if tries < max_tries else "refuse"


def verdict(policy: str, check: Check, tries: int, digest: str, extractor: str) -> Verdict:
    """The provenance verdict of a kept image."""
    if check.flagged:
        decision = "flagged"
    elif tries > 1:
        decision = "regenerated"
    else:
        decision = "passed"
    return Verdict(decision, check, tries, digest, extractor)


def refusal(policy: str, index: int, check: Check, tries: int) -> FailedPrecondition:
    """The FAILED_PRECONDITION for a near-copy that the policy does not let out."""
    after = f" after {tries} samples" if policy == "regenerate" else ""
    return FailedPrecondition(
        f"image {index} is a near-copy of a training image{after}: nearest distance "
        f"{check.distance:.6f} is below the model's memorization threshold {check.threshold:.6f} "
        f"(memorization={policy})",
        reason=REASON,
        metadata={
            "image": str(index),
            "distance": f"{check.distance:.6f}",
            "threshold": f"{check.threshold:.6f}",
            "policy": policy,
            "tries": str(tries),
        },
    )
