"""Tenants: whose an object is, and who may see it. The one rule every service applies.

Every data set, job (and its checkpoints), feedback record, review item, export and stored
output belongs to the tenant of the identity that made it; the tenant is written into the
object (a record field, an export manifest field, or the ``tenant`` metadata of a stored
object) when it is made. Records written before tenancy existed carry no tenant: they belong
to tenant ``""``, the tenant of every caller when authentication is off.

A caller sees what its tenant owns; an ``admin`` sees everything. Another tenant's object is
answered exactly as a missing one (same code, same message), so its existence does not leak.

Models are shared unless their catalog record carries the label ``tenant=NAME``: then they are
private to that tenant (and admins), and every other caller is answered as for an unknown model.

No gRPC here: servicers turn the signed-in principal into a :class:`Viewer` and pass it down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clinisynth_server.errors import InvalidArgument, NotFound
from clinisynth_server.runtime.roles import ADMIN, Principal
from clinisynth_server.store.base import CALLER_READABLE_PREFIXES, DATASETS_NAMESPACE

if TYPE_CHECKING:
    from clinisynth_server.catalog import ModelRecord
    from clinisynth_server.store.base import ArtifactStore

#: The catalog label that makes a model private to one tenant.
TENANT_LABEL = "tenant"
#: Where an owned object keeps its tenant: a record / manifest field, or object metadata.
TENANT_FIELD = "tenant"


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a tenant, and whether it is an admin (who sees every tenant's objects).

    The default is tenant ``""`` without admin rights: domain code called without a viewer
    sees only what tenant ``""`` owns (everything made with authentication off) and shared
    models. With authentication off the caller is anonymous and holds every role, admin too.
    """

    tenant: str = ""
    admin: bool = False

    def sees(self, owner: str) -> bool:
        """May this viewer see an object owned by ``owner``?"""
        return self.admin or owner == self.tenant

    def sees_model(self, record: ModelRecord) -> bool:
        """May this viewer list, show and use ``record``? Unlabelled models are shared."""
        return self.sees(model_tenant(record)) if model_tenant(record) else True


def viewer_of(principal: Principal) -> Viewer:
    """The viewer a servicer passes down for the signed-in ``principal``."""
    return Viewer(principal.tenant, ADMIN in principal.roles)


def owner_of(data: Mapping[str, object] | None) -> str:
    """The tenant recorded in a stored record or manifest; none recorded → ``""``."""
    value = (data or {}).get(TENANT_FIELD, "")
    return value if isinstance(value, str) else ""


def model_tenant(record: ModelRecord) -> str:
    """The tenant a model is private to; ``""`` = shared."""
    return str(record.labels.get(TENANT_LABEL, "") or "")


def owner_metadata(tenant: str) -> dict[str, str]:
    """Object metadata that records the owner of a stored output (none for tenant ``""``).

    Object metadata is printable ASCII on S3, so a tenant outside it is recorded hex-encoded
    (``hex:<...>``); :func:`object_owner` reads both forms.
    """
    if not tenant:
        return {}
    if tenant.isascii() and tenant.isprintable() and not tenant.startswith("hex:"):
        return {TENANT_FIELD: tenant}
    return {TENANT_FIELD: "hex:" + tenant.encode().hex()}


def object_owner(store: ArtifactStore, key: str) -> str:
    """The owner tenant of a stored object (its ``tenant`` metadata; none → ``""``).

    ``NotFound`` when the object does not exist.
    """
    value = str(store.stat(key).metadata.get(TENANT_FIELD, "") or "")
    if value.startswith("hex:"):
        try:
            return bytes.fromhex(value[4:]).decode()
        except ValueError:
            return value
    return value


def sees_object(store: ArtifactStore, key: str, viewer: Viewer) -> bool:
    """Does ``key`` exist and may ``viewer`` read it? (One stat.)

    The content-addressed images of :data:`~.store.base.CALLER_READABLE_PREFIXES` are read by
    anyone who names one: naming one takes its digest, i.e. the image or a reference to it.
    """
    if key.startswith(CALLER_READABLE_PREFIXES):
        return store.exists(key)
    try:
        owner = object_owner(store, key)
    except NotFound:
        return False
    return viewer.sees(owner)


def refuse_foreign_prefix(store: ArtifactStore, marker_key: str, tenant: str, field: str) -> None:
    """Refuse to write outputs where another tenant's outputs are (it would replace them).

    ``marker_key``: the object every write under the prefix makes (a manifest). This says
    that the prefix is taken, nothing about what it holds; callers choose their prefixes.
    """
    try:
        owner = object_owner(store, marker_key)
    except NotFound:
        return
    if owner != tenant:
        raise InvalidArgument.for_field(
            field, f"{marker_key.rsplit('/', 1)[0]!r} is taken by another tenant; use another"
        )


def dataset_root(prefix: str) -> str:
    """The folder whose owner owns a data-set prefix: ``datasets/<name>/`` under the data-set
    namespace (every upload into one data set shares its owner), else the prefix itself."""
    clean = prefix.strip().strip("/")
    if clean.startswith(DATASETS_NAMESPACE):
        name = clean[len(DATASETS_NAMESPACE) :].split("/", 1)[0]
        if name:
            return f"{DATASETS_NAMESPACE}{name}/"
    return clean + "/"


def prefix_owner(store: ArtifactStore, prefix: str) -> str | None:
    """The owner of the objects under ``prefix`` (its first object's); ``None`` when empty.

    Everything a service writes under one prefix on a caller's behalf carries that caller's
    tenant, and writes into another tenant's prefix are refused, so the first object speaks
    for the prefix: one listing of one key and one stat.
    """
    for info in store.list(prefix, limit=1):
        try:
            return object_owner(store, info.key)
        except NotFound:
            return None
    return None


def sees_prefix(store: ArtifactStore, prefix: str, viewer: Viewer) -> bool:
    """May ``viewer`` read the data set (or outputs) at ``prefix``? Empty prefixes: yes (they
    answer as empty, for everyone alike)."""
    if viewer.admin:
        return True
    owner = prefix_owner(store, dataset_root(prefix))
    return owner is None or viewer.sees(owner)
