"""Who may call what: one table mapping every fully-qualified RPC to the roles allowed.

Every call passes :func:`authorize` in the server interceptor (and the review page's HTTP routes,
which name the RPC they stand for), so no servicer checks roles itself and a new RPC without an
entry is refused to everyone but ``admin`` (a unit test fails first: every RPC of every proto
service must be listed). ``admin`` may call everything. Health and reflection are open.

Why the rater is bound here too: a judgement is evidence about a person, so the rater of a
feedback is the authenticated principal, never a name the request body claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from clinisynth_server.errors import PermissionDenied

REQUESTER = "requester"  # generate, counterfactuals
SCORER = "scorer"  # score images with reward models
EXPERT = "expert"  # judge images: feedback, the review queue
TRAINER = "trainer"  # data sets, fine-tuning jobs, promotion, exports
ADMIN = "admin"  # models (import / delete / alias), the audit trail and everything else
ROLES: tuple[str, ...] = (REQUESTER, SCORER, EXPERT, TRAINER, ADMIN)
ALL_ROLES: frozenset[str] = frozenset(ROLES)

# Calls anyone may make, token or not: probes and discovery.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_ANY = frozenset({REQUESTER, SCORER, EXPERT, TRAINER})  # read-only catalogue calls
_G = "/clinisynth.v1.GeneratorService/"
_C = "/clinisynth.v1.CounterfactualService/"
_R = "/clinisynth.v1.RewardService/"
_F = "/clinisynth.v1.FinetuneService/"
_A = "/clinisynth.v1.AuditService/"  # served by every service

# ``admin`` is added to every entry by :func:`roles_for`; listed here: the other roles allowed.
RPC_ROLES: Mapping[str, frozenset[str]] = {
    _G + "Generate": frozenset({REQUESTER}),
    _G + "GenerateStream": frozenset({REQUESTER}),
    _G + "ListModels": _ANY,
    _G + "ListPacsOutbox": frozenset({REQUESTER}),  # outbox state of pushed images
    _C + "CreateCounterfactual": frozenset({REQUESTER}),
    _C + "CounterfactualStream": frozenset({REQUESTER}),
    _C + "CounterfactualBatch": frozenset({REQUESTER}),
    _C + "ListModels": _ANY,
    _R + "Score": frozenset({SCORER}),
    _R + "ScoreStream": frozenset({SCORER}),
    _R + "SubmitFeedback": frozenset({EXPERT}),
    _R + "ListFeedback": frozenset({EXPERT, TRAINER}),
    _R + "ExportFeedback": frozenset({TRAINER}),
    _R + "DownloadExport": frozenset({TRAINER}),
    _R + "EnqueueReview": frozenset({TRAINER}),
    _R + "NextReviewItems": frozenset({EXPERT}),
    _R + "GetChecklist": frozenset({EXPERT}),
    _R + "GetAgreement": frozenset({EXPERT, TRAINER}),
    _R + "ListModels": _ANY,
    _F + "CreateJob": frozenset({TRAINER}),
    _F + "GetJob": frozenset({TRAINER}),
    _F + "ListJobs": frozenset({TRAINER}),
    _F + "CancelJob": frozenset({TRAINER}),
    _F + "WatchJob": frozenset({TRAINER}),
    _F + "ListCheckpoints": frozenset({TRAINER}),
    _F + "PromoteCheckpoint": frozenset({TRAINER}),
    _F + "ListJobKinds": frozenset({TRAINER}),
    _F + "UploadDatasetFile": frozenset({TRAINER}),
    _F + "ValidateDataset": frozenset({TRAINER}),
    _F + "ListDatasetFiles": frozenset({TRAINER}),
    _F + "UploadModelFile": frozenset(),
    _F + "ListModelUpload": frozenset(),
    _F + "ImportModel": frozenset(),
    _F + "ImportModelStream": frozenset(),
    _F + "GetModel": _ANY,
    _F + "DeleteModel": frozenset(),
    _F + "SetModelAlias": frozenset(),
    _A + "ListAudit": frozenset(),  # who did what: admins only
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``name`` (a JWT's ``sub`` or a service account), roles and tenant.

    ``personal`` is false for the two callers that are nobody in particular: authentication
    off, and a legacy static token without a mapping. Only they may still name a rater in a
    request body (the behaviour before identities existed).
    """

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    tenant: str = ""
    via: str = "jwt"  # jwt | service-account | mtls | legacy-token | anonymous
    personal: bool = True


ANONYMOUS = Principal("anonymous", ALL_ROLES, via="anonymous", personal=False)
PUBLIC = Principal("public", frozenset(), via="anonymous", personal=False)


def is_public(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


def roles_for(method: str) -> frozenset[str]:
    """The roles that may call ``method``; unknown methods: ``admin`` only."""
    return RPC_ROLES.get(method, frozenset()) | {ADMIN}


def authorize(method: str, principal: Principal) -> None:
    """Raise PERMISSION_DENIED unless ``principal`` holds a role allowed for ``method``."""
    if is_public(method):
        return
    allowed = roles_for(method)
    if principal.roles & allowed:
        return
    raise PermissionDenied(
        f"{method}: needs one of the roles {sorted(allowed)}; {principal.name!r} has "
        f"{sorted(principal.roles) or 'none'}",
        reason="ROLE_REQUIRED",
        metadata={"method": method, "roles": ",".join(sorted(allowed))},
    )


def bind_rater(principal: Principal, rater_id: str, field_name: str) -> str:
    """The rater of a judgement: the principal. Empty → the principal's name; another → denied."""
    if not principal.personal:
        return rater_id
    if rater_id and rater_id != principal.name:
        raise PermissionDenied(
            f"{field_name}: {rater_id!r} is not you ({principal.name!r}); judgements are "
            "recorded under the signed-in identity",
            reason="RATER_IS_PRINCIPAL",
            metadata={"field": field_name},
        )
    return principal.name


def markdown_table() -> str:
    """The role × RPC table as Markdown (docs/SECURITY.md embeds it; a test keeps it in sync)."""
    head = "| RPC | " + " | ".join(ROLES) + " |"
    rule = "|---|" + "---|" * len(ROLES)
    rows = [head, rule]
    for method in sorted(RPC_ROLES):
        allowed = roles_for(method)
        marks = " | ".join("✓" if role in allowed else "" for role in ROLES)
        rows.append(f"| `{method.lstrip('/')}` | {marks} |")
    return "\n".join(rows) + "\n"
