"""clinisynth: the Python SDK of the clinically aligned synthetic medical image services.

import clinisynth
with clinisynth.Client() as client:
    print(client.list_models())
"""

from clinisynth._client import AsyncClient, AsyncScoreStream, Client, ScoreStream
from clinisynth._counterfactual import (
    CounterfactualBatchItem,
    CounterfactualBatchResult,
    CounterfactualResult,
    TrajectoryPoint,
)
from clinisynth._discovery import Endpoints
from clinisynth._errors import (
    AlreadyExistsError,
    CancelledError,
    ClinisynthError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StackNotFoundError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from clinisynth._finetune import (
    Checkpoint,
    DatasetReport,
    FinetuneJob,
    JobEvent,
    JobKind,
    JobParam,
    PromoteResult,
)
from clinisynth._images import PacsRef
from clinisynth._models import ModelComponent, ModelDetails
from clinisynth._reward import (
    Agreement,
    ConditionAgreement,
    Criterion,
    Feedback,
    FeedbackExport,
    ImageScore,
    RaterStats,
    ReviewBatch,
    ReviewItem,
    ScoreSummary,
)
from clinisynth._types import (
    AuditEntry,
    GeneratedImage,
    GenerationResult,
    ModelInfo,
    PacsItem,
    ProgressEvent,
)

__version__ = "0.1.0"

__all__ = [
    "Agreement",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncScoreStream",
    "AuditEntry",
    "CancelledError",
    "Checkpoint",
    "Client",
    "ClinisynthError",
    "ConditionAgreement",
    "CounterfactualBatchItem",
    "CounterfactualBatchResult",
    "CounterfactualResult",
    "Criterion",
    "DatasetReport",
    "DeadlineExceededError",
    "Endpoints",
    "FailedPreconditionError",
    "Feedback",
    "FeedbackExport",
    "FieldViolation",
    "FinetuneJob",
    "GeneratedImage",
    "GenerationResult",
    "ImageScore",
    "InternalError",
    "InvalidArgumentError",
    "JobEvent",
    "JobKind",
    "JobParam",
    "ModelComponent",
    "ModelDetails",
    "ModelInfo",
    "NotFoundError",
    "PacsItem",
    "PacsRef",
    "PermissionDeniedError",
    "ProgressEvent",
    "PromoteResult",
    "RaterStats",
    "ResourceExhaustedError",
    "ReviewBatch",
    "ReviewItem",
    "ScoreStream",
    "ScoreSummary",
    "StackNotFoundError",
    "TrajectoryPoint",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
]
