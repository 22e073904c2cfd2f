from clinisynth.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RewardFilter(_message.Message):
    __slots__ = ("reward_model", "min_reward", "best_of_n", "max_candidates")
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_REWARD_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_N_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    reward_model: _common_pb2.ModelRef
    min_reward: float
    best_of_n: int
    max_candidates: int
    def __init__(self, reward_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., min_reward: _Optional[float] = ..., best_of_n: _Optional[int] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class DicomOptions(_message.Message):
    __slots__ = ("modality", "patient_id", "series_description")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    PATIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    modality: str
    patient_id: str
    series_description: str
    def __init__(self, modality: _Optional[str] = ..., patient_id: _Optional[str] = ..., series_description: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "class_name", "num_images", "width", "height", "steps", "guidance_scale", "sampler", "seed", "eta", "format", "dicom", "store_outputs", "output_prefix", "preview_every", "reward_filter", "request_id", "to_pacs", "memorization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    STORE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    REWARD_FILTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_PACS_FIELD_NUMBER: _ClassVar[int]
    MEMORIZATION_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    prompt: str
    negative_prompt: str
    class_name: str
    num_images: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    eta: float
    format: _common_pb2.ImageFormat
    dicom: DicomOptions
    store_outputs: bool
    output_prefix: str
    preview_every: int
    reward_filter: RewardFilter
    request_id: str
    to_pacs: str
    memorization: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., class_name: _Optional[str] = ..., num_images: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., eta: _Optional[float] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., dicom: _Optional[_Union[DicomOptions, _Mapping]] = ..., store_outputs: _Optional[bool] = ..., output_prefix: _Optional[str] = ..., preview_every: _Optional[int] = ..., reward_filter: _Optional[_Union[RewardFilter, _Mapping]] = ..., request_id: _Optional[str] = ..., to_pacs: _Optional[str] = ..., memorization: _Optional[str] = ...) -> None: ...

class MemorizationCheck(_message.Message):
    __slots__ = ("decision", "distance", "threshold", "tries", "index_digest", "extractor")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TRIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    decision: str
    distance: float
    threshold: float
    tries: int
    index_digest: str
    extractor: str
    def __init__(self, decision: _Optional[str] = ..., distance: _Optional[float] = ..., threshold: _Optional[float] = ..., tries: _Optional[int] = ..., index_digest: _Optional[str] = ..., extractor: _Optional[str] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "image", "provenance", "reward", "memorization")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    MEMORIZATION_FIELD_NUMBER: _ClassVar[int]
    index: int
    image: _common_pb2.Image
    provenance: _common_pb2.Provenance
    reward: float
    memorization: MemorizationCheck
    def __init__(self, index: _Optional[int] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., provenance: _Optional[_Union[_common_pb2.Provenance, _Mapping]] = ..., reward: _Optional[float] = ..., memorization: _Optional[_Union[MemorizationCheck, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "request_id", "candidates", "provenance_ref", "pacs")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_REF_FIELD_NUMBER: _ClassVar[int]
    PACS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    request_id: str
    candidates: int
    provenance_ref: _common_pb2.ArtifactRef
    pacs: _containers.RepeatedCompositeFieldContainer[_common_pb2.PacsOutboxItem]
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., request_id: _Optional[str] = ..., candidates: _Optional[int] = ..., provenance_ref: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., pacs: _Optional[_Iterable[_Union[_common_pb2.PacsOutboxItem, _Mapping]]] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "index", "png")
    STEP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    index: int
    png: bytes
    def __init__(self, step: _Optional[int] = ..., index: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "preview", "image", "chunk", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    preview: Preview
    image: GeneratedImage
    chunk: _common_pb2.ImageChunk
    done: GenerateResponse
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.ImageChunk, _Mapping]] = ..., done: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
