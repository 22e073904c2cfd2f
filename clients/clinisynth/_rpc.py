"""What the SDK knows about an RPC, declared once and shared by ``Client`` and ``AsyncClient``.

Why this shape: the blocking and the asyncio client differ only in how bytes move (grpc vs
grpc.aio, ``time.sleep`` vs ``asyncio.sleep``). Everything else about a call (which service and
stub method, whether a retry is safe, how a request is built and a reply parsed, how progress is
shown) is plain code here and in the per-service modules (``_generator``, ``_reward``,
``_counterfactual``, ``_finetune``). The transports (``_transport``) own channels, deadlines,
retries and error mapping with only the I/O twinned; the public methods are written once, in the
asyncio form (``_async_client``), and ``scripts/gen_sync_client.py`` derives the blocking client
(``_sync_client``) by token rewriting, so the two cannot drift (a unit test regenerates it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from clinisynth._types import ProgressEvent
from clinisynth.v1 import common_pb2

ProgressCallback = Callable[[ProgressEvent], None]
Streaming = Literal["unary", "client", "server"]


@dataclass(frozen=True)
class Rpc:
    """One RPC: where it goes and whether repeating it is safe.

    ``idempotent`` is a bool or a predicate on the request (a generate call is repeatable only
    when it carries a seed). Client-streaming requests are iterators, consumed by the first
    attempt, so they are never retried whatever the declaration says.
    """

    service: str
    stub: Callable[[Any], Any]
    method: str
    idempotent: bool | Callable[[Any], bool] = False
    streaming: Streaming = "unary"

    def retryable(self, request: Any) -> bool:
        """Whether a failed attempt of this request may be repeated."""
        if self.streaming == "client":
            return False
        if callable(self.idempotent):
            return bool(self.idempotent(request))
        return self.idempotent


def model_ref(model: str | None) -> common_pb2.ModelRef:
    """``"name"`` or ``"name@version"`` (``None`` / ``""``: the service's default)."""
    name, _, version = (model or "").partition("@")
    return common_pb2.ModelRef(name=name, version=version)


def ref_text(ref: common_pb2.ModelRef) -> str:
    """The inverse of :func:`model_ref`: ``"name@version"``, or ``"name"`` without a version."""
    return f"{ref.name}@{ref.version}" if ref.version else ref.name


@contextlib.contextmanager
def progress_sink(
    progress: ProgressCallback | bool | None, *, desc: str, unit: str = "step", total: int = 0
) -> Iterator[ProgressCallback | None]:
    """The one progress helper: a user callback as is, ``True`` → a tqdm bar, else ``None``.

    The bar follows ``ProgressEvent.total_steps`` / ``step`` and shows ``message`` as postfix;
    it is closed when the block ends, however it ends.
    """
    if callable(progress):
        yield progress
        return
    if not progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit=unit, desc=desc)

    def update(event: ProgressEvent) -> None:
        if event.total_steps and bar.total != event.total_steps:
            bar.total = event.total_steps
        if event.step > bar.n:
            bar.update(event.step - bar.n)
        if event.message:
            bar.set_postfix_str(event.message)

    try:
        yield update
    finally:
        bar.close()
