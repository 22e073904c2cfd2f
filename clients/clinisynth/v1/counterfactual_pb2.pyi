from clinisynth.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GuidanceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_MODE_UNSPECIFIED: _ClassVar[GuidanceMode]
    GUIDANCE_MODE_CONE: _ClassVar[GuidanceMode]
    GUIDANCE_MODE_ROBUST_ONLY: _ClassVar[GuidanceMode]
    GUIDANCE_MODE_PLAIN_ONLY: _ClassVar[GuidanceMode]

class DistanceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTANCE_KIND_UNSPECIFIED: _ClassVar[DistanceKind]
    DISTANCE_KIND_L2: _ClassVar[DistanceKind]
    DISTANCE_KIND_L1: _ClassVar[DistanceKind]
GUIDANCE_MODE_UNSPECIFIED: GuidanceMode
GUIDANCE_MODE_CONE: GuidanceMode
GUIDANCE_MODE_ROBUST_ONLY: GuidanceMode
GUIDANCE_MODE_PLAIN_ONLY: GuidanceMode
DISTANCE_KIND_UNSPECIFIED: DistanceKind
DISTANCE_KIND_L2: DistanceKind
DISTANCE_KIND_L1: DistanceKind

class CounterfactualRequest(_message.Message):
    __slots__ = ("image", "target_class", "diffusion_model", "robust_classifier", "plain_classifier", "start_depth", "steps", "lambda_c", "cone_angle_deg", "distance", "lambda_d", "seed", "mode", "resize", "format", "store_outputs", "request_id", "to_pacs", "domain_guard")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_MODEL_FIELD_NUMBER: _ClassVar[int]
    ROBUST_CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    PLAIN_CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    START_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_C_FIELD_NUMBER: _ClassVar[int]
    CONE_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_D_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STORE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_PACS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_GUARD_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    target_class: str
    diffusion_model: _common_pb2.ModelRef
    robust_classifier: _common_pb2.ModelRef
    plain_classifier: _common_pb2.ModelRef
    start_depth: float
    steps: int
    lambda_c: float
    cone_angle_deg: float
    distance: DistanceKind
    lambda_d: float
    seed: int
    mode: GuidanceMode
    resize: bool
    format: _common_pb2.ImageFormat
    store_outputs: bool
    request_id: str
    to_pacs: str
    domain_guard: str
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., target_class: _Optional[str] = ..., diffusion_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., robust_classifier: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., plain_classifier: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., start_depth: _Optional[float] = ..., steps: _Optional[int] = ..., lambda_c: _Optional[float] = ..., cone_angle_deg: _Optional[float] = ..., distance: _Optional[_Union[DistanceKind, str]] = ..., lambda_d: _Optional[float] = ..., seed: _Optional[int] = ..., mode: _Optional[_Union[GuidanceMode, str]] = ..., resize: _Optional[bool] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., store_outputs: _Optional[bool] = ..., request_id: _Optional[str] = ..., to_pacs: _Optional[str] = ..., domain_guard: _Optional[str] = ...) -> None: ...

class TrajectoryPoint(_message.Message):
    __slots__ = ("step", "p_target_robust", "p_target_plain", "gradient_angle_deg")
    STEP_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_ROBUST_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_PLAIN_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    step: int
    p_target_robust: float
    p_target_plain: float
    gradient_angle_deg: float
    def __init__(self, step: _Optional[int] = ..., p_target_robust: _Optional[float] = ..., p_target_plain: _Optional[float] = ..., gradient_angle_deg: _Optional[float] = ...) -> None: ...

class CounterfactualResponse(_message.Message):
    __slots__ = ("counterfactual", "difference", "overlay", "p_target_before_robust", "p_target_after_robust", "p_target_before_plain", "p_target_after_plain", "trajectory", "distance", "target_class", "provenance", "already_target", "flipped", "pacs", "domain")
    COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_BEFORE_ROBUST_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_AFTER_ROBUST_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_BEFORE_PLAIN_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_AFTER_PLAIN_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_TARGET_FIELD_NUMBER: _ClassVar[int]
    FLIPPED_FIELD_NUMBER: _ClassVar[int]
    PACS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    counterfactual: _common_pb2.Image
    difference: _common_pb2.Image
    overlay: _common_pb2.Image
    p_target_before_robust: float
    p_target_after_robust: float
    p_target_before_plain: float
    p_target_after_plain: float
    trajectory: _containers.RepeatedCompositeFieldContainer[TrajectoryPoint]
    distance: float
    target_class: str
    provenance: _common_pb2.Provenance
    already_target: bool
    flipped: bool
    pacs: _containers.RepeatedCompositeFieldContainer[_common_pb2.PacsOutboxItem]
    domain: _common_pb2.DomainCheck
    def __init__(self, counterfactual: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., difference: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., overlay: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., p_target_before_robust: _Optional[float] = ..., p_target_after_robust: _Optional[float] = ..., p_target_before_plain: _Optional[float] = ..., p_target_after_plain: _Optional[float] = ..., trajectory: _Optional[_Iterable[_Union[TrajectoryPoint, _Mapping]]] = ..., distance: _Optional[float] = ..., target_class: _Optional[str] = ..., provenance: _Optional[_Union[_common_pb2.Provenance, _Mapping]] = ..., already_target: _Optional[bool] = ..., flipped: _Optional[bool] = ..., pacs: _Optional[_Iterable[_Union[_common_pb2.PacsOutboxItem, _Mapping]]] = ..., domain: _Optional[_Union[_common_pb2.DomainCheck, _Mapping]] = ...) -> None: ...

class CounterfactualEvent(_message.Message):
    __slots__ = ("point", "progress", "done")
    POINT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    point: TrajectoryPoint
    progress: _common_pb2.Progress
    done: CounterfactualResponse
    def __init__(self, point: _Optional[_Union[TrajectoryPoint, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., done: _Optional[_Union[CounterfactualResponse, _Mapping]] = ...) -> None: ...

class CounterfactualBatchRequest(_message.Message):
    __slots__ = ("input_prefix", "output_prefix", "options", "limit")
    INPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    input_prefix: str
    output_prefix: str
    options: CounterfactualRequest
    limit: int
    def __init__(self, input_prefix: _Optional[str] = ..., output_prefix: _Optional[str] = ..., options: _Optional[_Union[CounterfactualRequest, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class CounterfactualBatchItem(_message.Message):
    __slots__ = ("input_key", "result", "p_target_before_robust", "p_target_after_robust", "distance", "flipped", "error", "already_target")
    INPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_BEFORE_ROBUST_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_AFTER_ROBUST_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    FLIPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALREADY_TARGET_FIELD_NUMBER: _ClassVar[int]
    input_key: str
    result: _common_pb2.ArtifactRef
    p_target_before_robust: float
    p_target_after_robust: float
    distance: float
    flipped: bool
    error: str
    already_target: bool
    def __init__(self, input_key: _Optional[str] = ..., result: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., p_target_before_robust: _Optional[float] = ..., p_target_after_robust: _Optional[float] = ..., distance: _Optional[float] = ..., flipped: _Optional[bool] = ..., error: _Optional[str] = ..., already_target: _Optional[bool] = ...) -> None: ...

class CounterfactualBatchSummary(_message.Message):
    __slots__ = ("images", "failed", "flip_rate", "mean_distance", "summary", "already_target")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FLIP_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ALREADY_TARGET_FIELD_NUMBER: _ClassVar[int]
    images: int
    failed: int
    flip_rate: float
    mean_distance: float
    summary: _common_pb2.ArtifactRef
    already_target: int
    def __init__(self, images: _Optional[int] = ..., failed: _Optional[int] = ..., flip_rate: _Optional[float] = ..., mean_distance: _Optional[float] = ..., summary: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., already_target: _Optional[int] = ...) -> None: ...

class CounterfactualBatchEvent(_message.Message):
    __slots__ = ("progress", "item", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    item: CounterfactualBatchItem
    done: CounterfactualBatchSummary
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., item: _Optional[_Union[CounterfactualBatchItem, _Mapping]] = ..., done: _Optional[_Union[CounterfactualBatchSummary, _Mapping]] = ...) -> None: ...
