"""The out-of-domain guard: an input far from a model's training distribution is refused or flagged.

A reward model scores, and a counterfactual model edits, only the kind of image it was trained on;
a CT slice sent to a fundus model still gets a number, and that number means nothing. So every
Score / counterfactual input gets a **domain score** against the training images of the model
that takes it — the reward model for scoring, the diffusion model for a counterfactual: the
embedding distance (:func:`.features.embed`) to the nearest training image, in units of the
training set's own 99th-percentile leave-one-out spacing (:meth:`.index.SimilarityIndex.
domain_score`). Above the index's threshold (default
:data:`~.index.DEFAULT_DOMAIN_THRESHOLD`) the input is out of domain.

Where the index comes from: the model folder's ``similarity/`` sub-folder (what training writes
beside a checkpoint, or what an operator builds for an imported model with ``python -m
clinisynth_server.similarity.guard``). The registry serves it as the model's Triton
``similarity`` component and records its digest and calibration in the catalog record; the
distances are computed there (Triton), the score and the decision here. A model without one is
not guarded, and every response says so (``decision = "no index"``) — never silently.

Per request, ``domain_guard``:

- ``refuse`` (the default) — any input out of domain fails the request with FAILED_PRECONDITION
  (reason ``OUT_OF_DOMAIN_INPUT``) naming the field, the domain score and the threshold in the
  message and the ErrorInfo metadata; nothing is scored or edited;
- ``warn`` — the request runs; each input's verdict carries the score, threshold and flag.

Refuse is the default because a score or an edit of an image the model never learnt is a
confident answer to a question it cannot answer; a caller who knows better asks for ``warn``.
Pure decisions plus one Triton call; no gRPC.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clinisynth_server.catalog import ModelRecord
from clinisynth_server.errors import FailedPrecondition, InvalidArgument
from clinisynth_server.similarity import component
from clinisynth_server.similarity.index import DEFAULT_DOMAIN_THRESHOLD

POLICIES = ("refuse", "warn")
DEFAULT_POLICY = "refuse"
REASON = "OUT_OF_DOMAIN_INPUT"
IN_DOMAIN = "in domain"
OUT_OF_DOMAIN = "out of domain"
NO_INDEX = "no index"
COMPONENT = component.COMPONENT
#: Images per Triton call (the similarity component's max batch is at least this).
MAX_BATCH = 8
_FLOOR = 1e-6  # the same floor the index puts under its scale


@dataclass(frozen=True)
class DomainCheck:
    """One input's verdict: what the response carries (never a training image or its name)."""

    decision: str  # IN_DOMAIN | OUT_OF_DOMAIN | NO_INDEX
    policy: str = DEFAULT_POLICY
    score: float | None = None
    threshold: float = 0.0
    index_digest: str = ""
    extractor: str = ""

    @property
    def out_of_domain(self) -> bool:
        return self.decision == OUT_OF_DOMAIN

    def provenance(self) -> dict[str, str]:
        """The ``domain_*`` provenance fields of an output made from this input."""
        facts = {"domain_guard": self.decision}
        if self.score is not None:
            facts.update(
                {
                    "domain_score": f"{self.score:.6f}",
                    "domain_threshold": f"{self.threshold:.6f}",
                    "domain_index": self.index_digest,
                }
            )
        return facts


def check_policy(value: str, field_name: str) -> str:
    """The request's policy ("" = :data:`DEFAULT_POLICY`); INVALID_ARGUMENT on ``field_name``."""
    policy = (value or DEFAULT_POLICY).strip().lower()
    if policy not in POLICIES:
        raise InvalidArgument.for_field(field_name, f"must be one of {POLICIES}, got {value!r}")
    return policy


def index_of(record: ModelRecord) -> Mapping[str, Any] | None:
    """The record's index facts when it can be guarded (a ``similarity`` component and its
    domain calibration), else None."""
    info = record.extra.get(COMPONENT)
    if COMPONENT not in record.components or not isinstance(info, Mapping):
        return None
    if "embedding_q99" not in info:
        return None  # an index recorded before the guard: the model counts as unindexed
    return info


def judge(
    policy: str, record: ModelRecord, distances: Sequence[float], fields: Sequence[str]
) -> list[DomainCheck]:
    """Verdicts for each input's embedding distance to its nearest training image (``record``
    has an index: :func:`index_of`); under ``refuse`` the first input out of domain raises its
    refusal, naming ``fields[i]``."""
    info = index_of(record)
    assert info is not None, "judge() needs an indexed model"
    scale = max(float(info["embedding_q99"]), _FLOOR)
    threshold = float(info.get("domain_threshold", DEFAULT_DOMAIN_THRESHOLD))
    digest, extractor = str(info.get("digest", "")), str(info.get("extractor", ""))
    out = []
    for where, distance in zip(fields, distances, strict=True):
        score = float(distance) / scale
        if not math.isfinite(score):
            score = math.inf
        decision = OUT_OF_DOMAIN if score > threshold else IN_DOMAIN
        check = DomainCheck(decision, policy, score, threshold, digest, extractor)
        if check.out_of_domain and policy == "refuse":
            raise refusal(record, where, check)
        out.append(check)
    return out


def refusal(record: ModelRecord, where: str, check: DomainCheck) -> FailedPrecondition:
    """The FAILED_PRECONDITION for an out-of-domain input under ``refuse``."""
    assert check.score is not None
    return FailedPrecondition(
        f"{where}: out of domain for {record.ref}: domain score {check.score:.3f} is above the "
        f"model's threshold {check.threshold:.3f} (the input does not look like the images the "
        "model was trained on; domain_guard=warn scores it anyway and flags it)",
        reason=REASON,
        metadata={
            "field": where,
            "domain_score": f"{check.score:.6f}",
            "threshold": f"{check.threshold:.6f}",
            "model": record.ref,
            "index_digest": check.index_digest,
            "policy": check.policy,
        },
    )


def no_index(policy: str, count: int) -> list[DomainCheck]:
    return [DomainCheck(NO_INDEX, policy)] * count


class DomainGuard:
    """Scores inputs against a model's index with its Triton ``similarity`` component."""

    def __init__(self, triton: Any) -> None:
        self.triton = triton

    def distances(
        self, record: ModelRecord, images: np.ndarray, *, timeout_s: float | None = None
    ) -> list[float]:
        """Nearest-training-image embedding distance of ``[B, C, H, W]`` images in [0, 1]."""
        arr = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
        res = component.query(
            self.triton, record, arr, ["embedding_distance"], batch=MAX_BATCH, timeout_s=timeout_s
        )
        return [float(d) for d in res["embedding_distance"]]

    def check(
        self,
        record: ModelRecord,
        images: np.ndarray,
        *,
        policy: str,
        fields: Sequence[str],
        timeout_s: float | None = None,
    ) -> list[DomainCheck]:
        """Verdicts for ``[B, C, H, W]`` images in [0, 1], ``fields[i]`` naming image ``i``
        (the refusal raised under refuse); "no index" verdicts for a model without one."""
        if index_of(record) is None:
            return no_index(policy, len(images))
        found = self.distances(record, images, timeout_s=timeout_s)
        return judge(policy, record, found, fields)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clinisynth_server.similarity.guard IMAGES_DIR MODEL_DIR``: build the index of
    an imported model's training images (PNG / JPEG files) into ``MODEL_DIR/similarity/``."""
    from PIL import Image

    from clinisynth_server.similarity.index import INDEX_DIR, build_index, save_component

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(main.__doc__, file=sys.stderr)
        return 2
    files = sorted(
        p for p in pathlib.Path(args[0]).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(files), 64):
            rows = []
            for path in files[start : start + 64]:  # grey as RGB: the same features
                with Image.open(path) as img:
                    rgb = img.convert("RGB").resize((64, 64), Image.Resampling.BOX)
                    rows.append(np.asarray(rgb, dtype=np.float32) / 255.0)
            yield np.stack(rows)

    index = build_index(
        batches(), meta={"source": pathlib.Path(args[0]).name, "images": len(files)}
    )
    save_component(index, pathlib.Path(args[1]) / INDEX_DIR)
    print(f"indexed {index.count} images into {pathlib.Path(args[1]) / INDEX_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
