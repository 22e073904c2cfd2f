"""Offset paging and the ListModels listing, shared by every service (no protobuf, no gRPC).

Each service's ListModels used to repeat (and drift on) the same token parsing, page size
bounds and "latest version" marking; this module is the one copy the servicers translate.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.tenancy import Viewer

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str  # "" = last page


def offset_page(items: Sequence[T], *, page_size: int, page_token: str) -> Page[T]:
    """One page of ``items``; the token is the offset of the next page (opaque to callers)."""
    if page_size < 0:
        raise InvalidArgument.for_field("page_size", "must be >= 0")
    start = 0
    if page_token:
        try:
            start = int(page_token, 10)
        except ValueError:
            start = -1
        if start < 0:
            raise InvalidArgument.for_field("page_token", "not a token from this API")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    end = start + size
    return Page(list(items[start:end]), str(end) if end < len(items) else "")


@dataclass(frozen=True)
class ListedModel:
    record: ModelRecord
    latest: bool  # the newest version of its name


def list_models(
    catalog: Catalog,
    *,
    kind: str = "",
    name: str = "",
    all_versions: bool = False,
    page_size: int = 0,
    page_token: str = "",
    kinds: Collection[str] | None = None,
    viewer: Viewer | None = None,
) -> Page[ListedModel]:
    """Catalog models of ``kind`` (any, or any of ``kinds`` when given), one page at a time.

    Only what ``viewer`` may see is listed (shared models and its tenant's private ones); the
    "latest" mark is the newest version it sees.
    """
    catalog = catalog.seen_by(viewer)
    records = [
        r
        for r in catalog.list(kind=kind, name=name, all_versions=all_versions)
        if kinds is None or r.kind in kinds
    ]
    page = offset_page(records, page_size=page_size, page_token=page_token)
    latest = {(r.kind, r.name): r.version for r in catalog.list()}
    return Page(
        [ListedModel(r, latest.get((r.kind, r.name)) == r.version) for r in page.items],
        page.next_page_token,
    )
