import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_TEXT_TO_IMAGE: _ClassVar[ModelKind]
    MODEL_KIND_CLASS_CONDITIONAL: _ClassVar[ModelKind]
    MODEL_KIND_UNCONDITIONAL: _ClassVar[ModelKind]
    MODEL_KIND_REWARD: _ClassVar[ModelKind]
    MODEL_KIND_CLASSIFIER: _ClassVar[ModelKind]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG16: _ClassVar[ImageFormat]
    IMAGE_FORMAT_DICOM: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW: _ClassVar[ImageFormat]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_TEXT_TO_IMAGE: ModelKind
MODEL_KIND_CLASS_CONDITIONAL: ModelKind
MODEL_KIND_UNCONDITIONAL: ModelKind
MODEL_KIND_REWARD: ModelKind
MODEL_KIND_CLASSIFIER: ModelKind
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_PNG16: ImageFormat
IMAGE_FORMAT_DICOM: ImageFormat
IMAGE_FORMAT_RAW: ImageFormat

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "classes", "width", "height", "channels", "digest", "samplers", "default_sampler", "default_steps", "default_guidance_scale", "max_images", "description", "created", "labels", "latest")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: ModelKind
    classes: _containers.RepeatedScalarFieldContainer[str]
    width: int
    height: int
    channels: int
    digest: str
    samplers: _containers.RepeatedScalarFieldContainer[str]
    default_sampler: str
    default_steps: int
    default_guidance_scale: float
    max_images: int
    description: str
    created: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    latest: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., classes: _Optional[_Iterable[str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., digest: _Optional[str] = ..., samplers: _Optional[_Iterable[str]] = ..., default_sampler: _Optional[str] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., max_images: _Optional[int] = ..., description: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., latest: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("kind", "name", "all_versions", "page_size", "page_token")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: ModelKind
    name: str
    all_versions: bool
    page_size: int
    page_token: str
    def __init__(self, kind: _Optional[_Union[ModelKind, str]] = ..., name: _Optional[str] = ..., all_versions: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RawArray(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("key", "uri", "sha256", "size_bytes", "presigned_url")
    KEY_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRESIGNED_URL_FIELD_NUMBER: _ClassVar[int]
    key: str
    uri: str
    sha256: str
    size_bytes: int
    presigned_url: str
    def __init__(self, key: _Optional[str] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., presigned_url: _Optional[str] = ...) -> None: ...

class PacsRef(_message.Message):
    __slots__ = ("pacs", "study_uid", "series_uid", "sop_uid")
    PACS_FIELD_NUMBER: _ClassVar[int]
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_UID_FIELD_NUMBER: _ClassVar[int]
    pacs: str
    study_uid: str
    series_uid: str
    sop_uid: str
    def __init__(self, pacs: _Optional[str] = ..., study_uid: _Optional[str] = ..., series_uid: _Optional[str] = ..., sop_uid: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "dicom", "raw", "ref", "pacs", "width", "height", "channels", "format")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    PACS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    dicom: bytes
    raw: RawArray
    ref: ArtifactRef
    pacs: PacsRef
    width: int
    height: int
    channels: int
    format: ImageFormat
    def __init__(self, encoded: _Optional[bytes] = ..., dicom: _Optional[bytes] = ..., raw: _Optional[_Union[RawArray, _Mapping]] = ..., ref: _Optional[_Union[ArtifactRef, _Mapping]] = ..., pacs: _Optional[_Union[PacsRef, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("image_index", "offset", "data", "last", "format")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    offset: int
    data: bytes
    last: bool
    format: ImageFormat
    def __init__(self, image_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("model", "model_digest", "seed", "sampler", "steps", "guidance_scale", "prompt", "negative_prompt", "class_name", "width", "height", "software_version", "created", "request_id", "extra", "replay")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    model_digest: str
    seed: int
    sampler: str
    steps: int
    guidance_scale: float
    prompt: str
    negative_prompt: str
    class_name: str
    width: int
    height: int
    software_version: str
    created: _timestamp_pb2.Timestamp
    request_id: str
    extra: _containers.ScalarMap[str, str]
    replay: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., model_digest: _Optional[str] = ..., seed: _Optional[int] = ..., sampler: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., class_name: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., software_version: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ..., replay: _Optional[str] = ...) -> None: ...

class DomainCheck(_message.Message):
    __slots__ = ("decision", "score", "threshold", "policy", "index_digest", "extractor")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INDEX_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    decision: str
    score: float
    threshold: float
    policy: str
    index_digest: str
    extractor: str
    def __init__(self, decision: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., policy: _Optional[str] = ..., index_digest: _Optional[str] = ..., extractor: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "fraction", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total_steps: int
    fraction: float
    message: str
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("class_name", "prompt")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    prompt: str
    def __init__(self, class_name: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class PacsOutboxItem(_message.Message):
    __slots__ = ("destination", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "request_id", "status", "attempts", "last_error", "enqueued_at", "delivered_at", "next_attempt_at", "origin")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    destination: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    request_id: str
    status: str
    attempts: int
    last_error: str
    enqueued_at: _timestamp_pb2.Timestamp
    delivered_at: _timestamp_pb2.Timestamp
    next_attempt_at: _timestamp_pb2.Timestamp
    origin: str
    def __init__(self, destination: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., request_id: _Optional[str] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., enqueued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delivered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., origin: _Optional[str] = ...) -> None: ...

class ListPacsOutboxRequest(_message.Message):
    __slots__ = ("status", "destination", "limit")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    status: str
    destination: str
    limit: int
    def __init__(self, status: _Optional[str] = ..., destination: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListPacsOutboxResponse(_message.Message):
    __slots__ = ("items", "destinations")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PacsOutboxItem]
    destinations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[PacsOutboxItem, _Mapping]]] = ..., destinations: _Optional[_Iterable[str]] = ...) -> None: ...
