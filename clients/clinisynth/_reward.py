"""Reward scorer and expert feedback RPCs: declarations, typed results, builders, parsers.

The calls themselves are ``Client`` / ``AsyncClient`` methods (see ``_rpc`` for the layout):

with clinisynth.Client() as client:
    scores = client.score(["a.png", "b.png"], "neutrophil", model="cells-reward")
    client.feedback.submit("a.png", rater_id="dr_a", plausible=True, class_name="neutrophil")
    client.review.enqueue(images, class_name="neutrophil", raters_per_item=2)
    print(client.agreement())
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from clinisynth import _images
from clinisynth._rpc import ProgressCallback, Rpc, model_ref, ref_text
from clinisynth._types import ProgressEvent
from clinisynth.v1 import common_pb2, reward_pb2, reward_pb2_grpc

STUB = reward_pb2_grpc.RewardServiceStub
SERVICE = "reward"
SCORE_CHUNK = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".npy")

# Every reward RPC is safe to repeat: scores are pure, feedback is idempotent on its
# client_request_id, an export / enqueue of the same input gives the same records.
SCORE = Rpc(SERVICE, STUB, "Score", idempotent=True)
SCORE_STREAM = Rpc(SERVICE, STUB, "ScoreStream", streaming="server")
GET_CHECKLIST = Rpc(SERVICE, STUB, "GetChecklist", idempotent=True)
GET_AGREEMENT = Rpc(SERVICE, STUB, "GetAgreement", idempotent=True)
SUBMIT_FEEDBACK = Rpc(SERVICE, STUB, "SubmitFeedback", idempotent=True)
LIST_FEEDBACK = Rpc(SERVICE, STUB, "ListFeedback", idempotent=True)
EXPORT_FEEDBACK = Rpc(SERVICE, STUB, "ExportFeedback", idempotent=True)
DOWNLOAD_EXPORT = Rpc(SERVICE, STUB, "DownloadExport", streaming="server")
ENQUEUE_REVIEW = Rpc(SERVICE, STUB, "EnqueueReview", idempotent=True)
NEXT_REVIEW_ITEMS = Rpc(SERVICE, STUB, "NextReviewItems", idempotent=True)


# ---------------------------------------------------------------------------------------------
# typed results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScore:
    """One scored image: ``p_aligned`` = P(aligned) in [0, 1] by ``model_version`` ("name@version").

    ``reward`` equals ``p_aligned`` (kept for existing code; the proto field is deprecated).
    """

    index: int
    reward: float
    p_aligned: float
    model_version: str
    name: str = ""
    # The out-of-domain guard: "in domain", "out of domain" (kept under domain_guard="warn") or
    # "no index" (the model has none: not guarded), with the domain score (None when not
    # computed) against ``domain_threshold``.
    domain: str = ""
    domain_score: float | None = None
    domain_threshold: float | None = None


@dataclass(frozen=True)
class ScoreSummary:
    scored: int
    mean_reward: float
    model_version: str


@dataclass(frozen=True)
class Feedback:
    """One stored expert judgement."""

    id: str
    client_request_id: str
    rater_id: str
    plausible: bool
    condition: dict[str, str]
    criteria: dict[str, bool]
    comment: str
    time_spent_ms: int
    item_id: str
    image_key: str
    image_sha256: str
    generator: str
    created: float
    duplicate: bool = False


@dataclass(frozen=True)
class FeedbackExport:
    """An exported data set: ``<prefix>/labels.jsonl`` + ``images/`` (+ local copy in ``out``)."""

    prefix: str
    judgements: int
    images: int
    labels_key: str
    out: pathlib.Path | None = None
    files: list[pathlib.Path] = field(default_factory=list)


@dataclass(frozen=True)
class ReviewItem:
    id: str
    condition: dict[str, str]
    image_key: str
    image_sha256: str
    p_aligned: float | None
    raters_per_item: int
    judgements: int
    generator: str


@dataclass(frozen=True)
class ReviewBatch:
    items: list[ReviewItem]
    pending: int


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str


@dataclass(frozen=True)
class ConditionAgreement:
    condition: dict[str, str]
    shared_items: int
    raters: int
    kappa: float  # NaN when undefined
    statistic: str  # "cohen" | "fleiss"
    percent_agreement: float


@dataclass(frozen=True)
class RaterStats:
    rater_id: str
    judgements: int
    plausible_rate: float
    agreement_with_majority: float
    median_time_spent_ms: float


@dataclass(frozen=True)
class Agreement:
    conditions: list[ConditionAgreement]
    raters: list[RaterStats]


# ---------------------------------------------------------------------------------------------
# request building / parsing (shared by the sync and async twins)
# ---------------------------------------------------------------------------------------------


def condition_msg(
    condition: str | dict[str, str] | None = None,
    *,
    class_name: str | None = None,
    prompt: str | None = None,
) -> common_pb2.Condition | None:
    """``condition`` as a class name (str) or {"class_name"|"prompt": ...}; or the keywords."""
    if isinstance(condition, dict):
        class_name = condition.get("class_name") or class_name
        prompt = condition.get("prompt") or prompt
    elif condition:
        class_name = class_name or condition
    if class_name and prompt:
        raise ValueError("pass a class_name or a prompt, not both")
    if class_name:
        return common_pb2.Condition(class_name=class_name)
    if prompt:
        return common_pb2.Condition(prompt=prompt)
    return None


def _cond_dict(c: common_pb2.Condition) -> dict[str, str]:
    kind = c.WhichOneof("value")
    return {kind: getattr(c, kind)} if kind else {}


def image_list(images: Any) -> list[Any]:
    """A list of images; a numpy batch ``[N, H, W]`` / ``[N, H, W, C]`` is split.

    A 3-D array whose last axis is 3 is one RGB image; a 2-D array is one gray image.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] == 3):
            return [images]
        return list(images)
    if isinstance(images, (str, os.PathLike, bytes, common_pb2.Image, _images.PacsRef)):
        return [images]
    return list(images)


def _name_of(image: Any) -> str:
    """The name sent for a local file: its base name only.

    Why: the name is stored and shown to raters; a full path (``/home/<user>/<study>/...``)
    would leak the caller's machine layout and often a patient or study name.
    ``PureWindowsPath`` splits on both ``/`` and ``\\``, so Windows paths lose theirs too.
    """
    if not isinstance(image, (str, os.PathLike)) or _images.is_pacs_url(image):
        return ""  # a PACS reference's UIDs identify a patient's study: never an item name
    return pathlib.PureWindowsPath(os.fspath(image)).name


def _to_image(image: Any) -> common_pb2.Image:
    if isinstance(image, (str, os.PathLike)) and str(image).endswith(".npy"):
        image = np.load(image)
    return _images.to_proto_image(image)


def image_score(s: reward_pb2.ImageScore, offset: int = 0) -> ImageScore:
    return ImageScore(
        index=s.index + offset,
        reward=s.p_aligned,  # the proto's `reward` is a deprecated alias of p_aligned
        p_aligned=s.p_aligned,
        model_version=f"{s.model.name}@{s.model.version}",
        name=s.name,
        domain=s.domain.decision,
        domain_score=s.domain.score if s.domain.HasField("score") else None,
        domain_threshold=s.domain.threshold if s.domain.HasField("score") else None,
    )


def feedback_from(f: reward_pb2.Feedback, duplicate: bool = False) -> Feedback:
    gen = ref_text(f.generator)
    return Feedback(
        id=f.id,
        client_request_id=f.client_request_id,
        rater_id=f.rater_id,
        plausible=f.plausible,
        condition=_cond_dict(f.condition),
        criteria={a.criterion: a.satisfied for a in f.criteria},
        comment=f.comment,
        time_spent_ms=f.time_spent_ms,
        item_id=f.item_id,
        image_key=f.image_ref.key,
        image_sha256=f.image_ref.sha256,
        generator=gen,
        created=f.created.ToNanoseconds() / 1e9,
        duplicate=duplicate,
    )


def review_item(m: reward_pb2.ReviewItem) -> ReviewItem:
    gen = ref_text(m.generator)
    return ReviewItem(
        id=m.id,
        condition=_cond_dict(m.condition),
        image_key=m.image_ref.key,
        image_sha256=m.image_ref.sha256,
        p_aligned=m.p_aligned if m.HasField("p_aligned") else None,
        raters_per_item=m.raters_per_item,
        judgements=m.judgements,
        generator=gen,
    )


def agreement_from(resp: reward_pb2.GetAgreementResponse) -> Agreement:
    return Agreement(
        conditions=[
            ConditionAgreement(
                condition=_cond_dict(c.condition),
                shared_items=c.shared_items,
                raters=c.raters,
                kappa=c.kappa,
                statistic=c.statistic,
                percent_agreement=c.percent_agreement,
            )
            for c in resp.conditions
        ],
        raters=[
            RaterStats(
                rater_id=r.rater_id,
                judgements=r.judgements,
                plausible_rate=r.plausible_rate,
                agreement_with_majority=r.agreement_with_majority,
                median_time_spent_ms=r.median_time_spent_ms,
            )
            for r in resp.raters
        ],
    )


#: The out-of-domain guard's policies (the server's default, "" here, is "refuse").
DOMAIN_GUARD_POLICIES = ("refuse", "warn")


def check_domain_guard(policy: str | None) -> str:
    """``policy`` as the request field ("" = the server's default); ValueError when unknown."""
    if policy and policy not in DOMAIN_GUARD_POLICIES:
        raise ValueError(f"domain_guard must be one of {DOMAIN_GUARD_POLICIES}, not {policy!r}")
    return policy or ""


def score_requests(
    images: Any,
    condition: Any,
    class_name: str | None,
    prompt: str | None,
    model: str | None,
    resize: bool,
    generator: str | None,
    domain_guard: str | None = None,
) -> list[tuple[int, reward_pb2.ScoreRequest]]:
    items = image_list(images)
    guard = check_domain_guard(domain_guard)
    if not items:
        raise ValueError("no images to score")
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    out = []
    for start in range(0, len(items), SCORE_CHUNK):
        req = reward_pb2.ScoreRequest(
            model=model_ref(model),
            images=[_to_image(im) for im in items[start : start + SCORE_CHUNK]],
            resize=resize,
            domain_guard=guard,
        )
        if cond is not None:
            req.condition.CopyFrom(cond)
        if generator:
            req.generator.CopyFrom(model_ref(generator))
        out.append((start, req))
    return out


def _with_names(resp: reward_pb2.ScoreResponse, items: list[Any], start: int) -> list[ImageScore]:
    scores = []
    for s in resp.scores:
        score = image_score(s, start)
        if not score.name:
            score = replace(score, name=_name_of(items[score.index]))
        scores.append(score)
    return scores


def stream_requests(
    images: Iterable[Any],
    *,
    condition: common_pb2.Condition | None,
    model: str | None,
    resize: bool,
    store_prefix: str | None,
    batch_size: int,
    generator: str | None,
    domain_guard: str | None = None,
) -> Iterator[reward_pb2.ScoreStreamRequest]:
    config = reward_pb2.ScoreStreamConfig(
        model=model_ref(model),
        store_prefix=store_prefix or "",
        resize=resize,
        batch_size=batch_size,
        domain_guard=check_domain_guard(domain_guard),
    )
    if condition is not None:
        config.condition.CopyFrom(condition)
    if generator:
        config.generator.CopyFrom(model_ref(generator))
    yield reward_pb2.ScoreStreamRequest(config=config)
    for item in images:
        cond = None
        if isinstance(item, tuple):
            name, image, *rest = item
            cond = condition_msg(rest[0]) if rest else None
        else:
            name, image = _name_of(item), item
        msg = reward_pb2.NamedImage(name=str(name), image=_to_image(image))
        if cond is not None:
            msg.condition.CopyFrom(cond)
        yield reward_pb2.ScoreStreamRequest(image=msg)


def folder_images(
    folder: str | os.PathLike[str], class_name: str | None, prompt: str | None
) -> list[tuple[str, pathlib.Path, dict[str, str] | None]]:
    """(relative name, path, condition) for every image under ``folder``, sorted.

    Without a class or prompt, the first sub-folder names the class (ImageFolder layout).
    """
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = path.relative_to(root).as_posix()
        cond = None
        if not class_name and not prompt and "/" in rel:
            cond = {"class_name": rel.split("/", 1)[0]}
        out.append((rel, path, cond))
    return out


class StreamFolder:
    """Folds ScoreStreamEvents: scores to the caller, progress to a callback, summary kept."""

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self.on_progress = on_progress
        self.summary: ScoreSummary | None = None

    def feed(self, event: reward_pb2.ScoreStreamEvent) -> ImageScore | None:
        kind = event.WhichOneof("event")
        if kind == "score":
            return image_score(event.score)
        if kind == "progress" and self.on_progress is not None:
            p = event.progress
            self.on_progress(ProgressEvent(p.stage, p.step, p.total_steps, p.fraction, p.message))
        elif kind == "done":
            d = event.done
            self.summary = ScoreSummary(
                d.scored, d.mean_reward, f"{d.model.name}@{d.model.version}"
            )
        return None


def submit_request(
    image: Any,
    *,
    rater_id: str,
    plausible: bool,
    condition: Any,
    class_name: str | None,
    prompt: str | None,
    item_id: str | None,
    criteria: dict[str, bool] | None,
    comment: str,
    time_spent_ms: int,
    generator: str | None,
    client_request_id: str | None,
) -> reward_pb2.SubmitFeedbackRequest:
    f = reward_pb2.Feedback(
        client_request_id=client_request_id or uuid.uuid4().hex,
        rater_id=rater_id,
        item_id=item_id or "",
        plausible=plausible,
        criteria=[
            reward_pb2.CriterionAnswer(criterion=k, satisfied=bool(v))
            for k, v in (criteria or {}).items()
        ],
        comment=comment,
        time_spent_ms=time_spent_ms,
    )
    if image is not None:
        f.image.CopyFrom(_to_image(image))
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        f.condition.CopyFrom(cond)
    if generator:
        f.generator.CopyFrom(model_ref(generator))
    return reward_pb2.SubmitFeedbackRequest(feedback=f)


def list_request(
    condition: Any,
    class_name: str | None,
    prompt: str | None,
    rater_id: str | None,
    page_size: int,
    token: str,
) -> reward_pb2.ListFeedbackRequest:
    req = reward_pb2.ListFeedbackRequest(
        rater_id=rater_id or "", page_size=page_size, page_token=token
    )
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        req.condition.CopyFrom(cond)
    return req


def export_request(
    prefix: str | None,
    condition: Any,
    class_name: str | None,
    prompt: str | None,
    aggregate: str,
) -> reward_pb2.ExportFeedbackRequest:
    req = reward_pb2.ExportFeedbackRequest(prefix=prefix or "", aggregate=aggregate)
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        req.condition.CopyFrom(cond)
    return req


class ExportWriter:
    """Writes DownloadExport chunks under ``out``, checking each file's sha256."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = pathlib.Path(out)
        self.files: list[pathlib.Path] = []
        self._digest = hashlib.sha256()
        self._fh: Any = None

    def feed(self, chunk: reward_pb2.ExportFileChunk) -> None:
        rel = pathlib.PurePosixPath(chunk.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"refusing to write outside {self.out}: {chunk.path!r}")
        dest = self.out.joinpath(*rel.parts)
        if self._fh is None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(dest.with_name(dest.name + ".part"), "wb")  # noqa: SIM115
            self._digest = hashlib.sha256()
        self._fh.write(chunk.data)
        self._digest.update(chunk.data)
        if chunk.last:
            self._fh.close()
            self._fh = None
            part = dest.with_name(dest.name + ".part")
            if chunk.sha256 and self._digest.hexdigest() != chunk.sha256:
                part.unlink()
                raise ValueError(f"{chunk.path}: sha256 mismatch while downloading")
            part.replace(dest)
            self.files.append(dest)


def export_result(
    resp: reward_pb2.ExportFeedbackResponse, writer: ExportWriter | None
) -> FeedbackExport:
    return FeedbackExport(
        prefix=resp.prefix,
        judgements=resp.judgements,
        images=resp.images,
        labels_key=resp.labels.key,
        out=writer.out if writer is not None else None,
        files=list(writer.files) if writer is not None else [],
    )


def enqueue_request(
    images: Any,
    condition: Any,
    class_name: str | None,
    prompt: str | None,
    raters_per_item: int,
    generator: str | None,
    names: Sequence[str] | None,
) -> reward_pb2.EnqueueReviewRequest:
    items = image_list(images)
    names = list(names or [_name_of(i) for i in items])
    req = reward_pb2.EnqueueReviewRequest(
        images=[
            reward_pb2.NamedImage(name=n, image=_to_image(i))
            for n, i in zip(names, items, strict=True)
        ],
        raters_per_item=raters_per_item,
    )
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        req.condition.CopyFrom(cond)
    if generator:
        req.generator.CopyFrom(model_ref(generator))
    return req


def next_request(
    rater_id: str, condition: Any, class_name: str | None, prompt: str | None, limit: int
) -> reward_pb2.NextReviewItemsRequest:
    req = reward_pb2.NextReviewItemsRequest(rater_id=rater_id, limit=limit)
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        req.condition.CopyFrom(cond)
    return req


def checklist_request(
    condition: Any, class_name: str | None, prompt: str | None
) -> reward_pb2.GetChecklistRequest:
    req = reward_pb2.GetChecklistRequest()
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        req.condition.CopyFrom(cond)
    return req


def agreement_request(
    condition: Any, class_name: str | None, prompt: str | None
) -> reward_pb2.GetAgreementRequest:
    req = reward_pb2.GetAgreementRequest()
    cond = condition_msg(condition, class_name=class_name, prompt=prompt)
    if cond is not None:
        req.condition.CopyFrom(cond)
    return req
