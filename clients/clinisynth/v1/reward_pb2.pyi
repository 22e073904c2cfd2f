import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from clinisynth.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("model", "condition", "conditions", "images", "generator", "resize", "domain_guard")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_GUARD_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    condition: _common_pb2.Condition
    conditions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Condition]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    generator: _common_pb2.ModelRef
    resize: bool
    domain_guard: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., conditions: _Optional[_Iterable[_Union[_common_pb2.Condition, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., resize: _Optional[bool] = ..., domain_guard: _Optional[str] = ...) -> None: ...

class ImageScore(_message.Message):
    __slots__ = ("index", "reward", "p_aligned", "model", "name", "domain")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    P_ALIGNED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    index: int
    reward: float
    p_aligned: float
    model: _common_pb2.ModelRef
    name: str
    domain: _common_pb2.DomainCheck
    def __init__(self, index: _Optional[int] = ..., reward: _Optional[float] = ..., p_aligned: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., name: _Optional[str] = ..., domain: _Optional[_Union[_common_pb2.DomainCheck, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ImageScore]
    model: _common_pb2.ModelRef
    def __init__(self, scores: _Optional[_Iterable[_Union[ImageScore, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ScoreStreamConfig(_message.Message):
    __slots__ = ("model", "condition", "store_prefix", "generator", "resize", "batch_size", "domain_guard")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_GUARD_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    condition: _common_pb2.Condition
    store_prefix: str
    generator: _common_pb2.ModelRef
    resize: bool
    batch_size: int
    domain_guard: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., store_prefix: _Optional[str] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., resize: _Optional[bool] = ..., batch_size: _Optional[int] = ..., domain_guard: _Optional[str] = ...) -> None: ...

class NamedImage(_message.Message):
    __slots__ = ("name", "image", "condition")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: _common_pb2.Image
    condition: _common_pb2.Condition
    def __init__(self, name: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("config", "image")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    config: ScoreStreamConfig
    image: NamedImage
    def __init__(self, config: _Optional[_Union[ScoreStreamConfig, _Mapping]] = ..., image: _Optional[_Union[NamedImage, _Mapping]] = ...) -> None: ...

class ScoreSummary(_message.Message):
    __slots__ = ("scored", "mean_reward", "model")
    SCORED_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    scored: int
    mean_reward: float
    model: _common_pb2.ModelRef
    def __init__(self, scored: _Optional[int] = ..., mean_reward: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ScoreStreamEvent(_message.Message):
    __slots__ = ("score", "progress", "done")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    score: ImageScore
    progress: _common_pb2.Progress
    done: ScoreSummary
    def __init__(self, score: _Optional[_Union[ImageScore, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., done: _Optional[_Union[ScoreSummary, _Mapping]] = ...) -> None: ...

class CriterionAnswer(_message.Message):
    __slots__ = ("criterion", "satisfied")
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    SATISFIED_FIELD_NUMBER: _ClassVar[int]
    criterion: str
    satisfied: bool
    def __init__(self, criterion: _Optional[str] = ..., satisfied: _Optional[bool] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("id", "client_request_id", "rater_id", "item_id", "image", "condition", "plausible", "criteria", "comment", "time_spent_ms", "generator", "created", "image_ref")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    PLAUSIBLE_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    TIME_SPENT_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REF_FIELD_NUMBER: _ClassVar[int]
    id: str
    client_request_id: str
    rater_id: str
    item_id: str
    image: _common_pb2.Image
    condition: _common_pb2.Condition
    plausible: bool
    criteria: _containers.RepeatedCompositeFieldContainer[CriterionAnswer]
    comment: str
    time_spent_ms: int
    generator: _common_pb2.ModelRef
    created: _timestamp_pb2.Timestamp
    image_ref: _common_pb2.ArtifactRef
    def __init__(self, id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., rater_id: _Optional[str] = ..., item_id: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., plausible: _Optional[bool] = ..., criteria: _Optional[_Iterable[_Union[CriterionAnswer, _Mapping]]] = ..., comment: _Optional[str] = ..., time_spent_ms: _Optional[int] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., image_ref: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("feedback",)
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    feedback: Feedback
    def __init__(self, feedback: _Optional[_Union[Feedback, _Mapping]] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("feedback", "duplicate")
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback: Feedback
    duplicate: bool
    def __init__(self, feedback: _Optional[_Union[Feedback, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ListFeedbackRequest(_message.Message):
    __slots__ = ("condition", "rater_id", "page_size", "page_token")
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    condition: _common_pb2.Condition
    rater_id: str
    page_size: int
    page_token: str
    def __init__(self, condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., rater_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFeedbackResponse(_message.Message):
    __slots__ = ("feedback", "next_page_token", "total")
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    feedback: _containers.RepeatedCompositeFieldContainer[Feedback]
    next_page_token: str
    total: int
    def __init__(self, feedback: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class ExportFeedbackRequest(_message.Message):
    __slots__ = ("prefix", "condition", "aggregate")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    condition: _common_pb2.Condition
    aggregate: str
    def __init__(self, prefix: _Optional[str] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., aggregate: _Optional[str] = ...) -> None: ...

class ExportFeedbackResponse(_message.Message):
    __slots__ = ("prefix", "judgements", "images", "labels")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    judgements: int
    images: int
    labels: _common_pb2.ArtifactRef
    def __init__(self, prefix: _Optional[str] = ..., judgements: _Optional[int] = ..., images: _Optional[int] = ..., labels: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...

class DownloadExportRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ExportFileChunk(_message.Message):
    __slots__ = ("path", "offset", "data", "last", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    last: bool
    sha256: str
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., sha256: _Optional[str] = ...) -> None: ...

class EnqueueReviewRequest(_message.Message):
    __slots__ = ("images", "condition", "raters_per_item", "generator")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    RATERS_PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[NamedImage]
    condition: _common_pb2.Condition
    raters_per_item: int
    generator: _common_pb2.ModelRef
    def __init__(self, images: _Optional[_Iterable[_Union[NamedImage, _Mapping]]] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., raters_per_item: _Optional[int] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ReviewItem(_message.Message):
    __slots__ = ("id", "condition", "image_ref", "p_aligned", "raters_per_item", "judgements", "generator")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REF_FIELD_NUMBER: _ClassVar[int]
    P_ALIGNED_FIELD_NUMBER: _ClassVar[int]
    RATERS_PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    condition: _common_pb2.Condition
    image_ref: _common_pb2.ArtifactRef
    p_aligned: float
    raters_per_item: int
    judgements: int
    generator: _common_pb2.ModelRef
    def __init__(self, id: _Optional[str] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., image_ref: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., p_aligned: _Optional[float] = ..., raters_per_item: _Optional[int] = ..., judgements: _Optional[int] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class EnqueueReviewResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ...) -> None: ...

class NextReviewItemsRequest(_message.Message):
    __slots__ = ("rater_id", "condition", "limit")
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    rater_id: str
    condition: _common_pb2.Condition
    limit: int
    def __init__(self, rater_id: _Optional[str] = ..., condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class NextReviewItemsResponse(_message.Message):
    __slots__ = ("items", "pending")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    pending: int
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ..., pending: _Optional[int] = ...) -> None: ...

class GetChecklistRequest(_message.Message):
    __slots__ = ("condition",)
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    condition: _common_pb2.Condition
    def __init__(self, condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ...) -> None: ...

class Criterion(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Checklist(_message.Message):
    __slots__ = ("condition", "criteria")
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    condition: _common_pb2.Condition
    criteria: _containers.RepeatedCompositeFieldContainer[Criterion]
    def __init__(self, condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., criteria: _Optional[_Iterable[_Union[Criterion, _Mapping]]] = ...) -> None: ...

class GetAgreementRequest(_message.Message):
    __slots__ = ("condition",)
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    condition: _common_pb2.Condition
    def __init__(self, condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ...) -> None: ...

class RaterStats(_message.Message):
    __slots__ = ("rater_id", "judgements", "plausible_rate", "agreement_with_majority", "median_time_spent_ms")
    RATER_ID_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    PLAUSIBLE_RATE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_WITH_MAJORITY_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_TIME_SPENT_MS_FIELD_NUMBER: _ClassVar[int]
    rater_id: str
    judgements: int
    plausible_rate: float
    agreement_with_majority: float
    median_time_spent_ms: float
    def __init__(self, rater_id: _Optional[str] = ..., judgements: _Optional[int] = ..., plausible_rate: _Optional[float] = ..., agreement_with_majority: _Optional[float] = ..., median_time_spent_ms: _Optional[float] = ...) -> None: ...

class ConditionAgreement(_message.Message):
    __slots__ = ("condition", "shared_items", "raters", "kappa", "statistic", "percent_agreement")
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    SHARED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RATERS_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    PERCENT_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    condition: _common_pb2.Condition
    shared_items: int
    raters: int
    kappa: float
    statistic: str
    percent_agreement: float
    def __init__(self, condition: _Optional[_Union[_common_pb2.Condition, _Mapping]] = ..., shared_items: _Optional[int] = ..., raters: _Optional[int] = ..., kappa: _Optional[float] = ..., statistic: _Optional[str] = ..., percent_agreement: _Optional[float] = ...) -> None: ...

class GetAgreementResponse(_message.Message):
    __slots__ = ("conditions", "raters")
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    RATERS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[ConditionAgreement]
    raters: _containers.RepeatedCompositeFieldContainer[RaterStats]
    def __init__(self, conditions: _Optional[_Iterable[_Union[ConditionAgreement, _Mapping]]] = ..., raters: _Optional[_Iterable[_Union[RaterStats, _Mapping]]] = ...) -> None: ...
