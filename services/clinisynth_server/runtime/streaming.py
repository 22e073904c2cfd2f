"""Running domain work in a thread while a servicer streams its events."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from clinisynth_server.cancel import CancelToken

_DONE = object()
MAX_DEADLINE_S = 86_400.0


def cancel_token(context: grpc.ServicerContext) -> CancelToken:
    """A token that trips when the client cancels or the call's deadline passes."""
    remaining = context.time_remaining()
    # Without a client deadline gRPC reports ~9.2e18 s: treat anything beyond a day as none.
    deadline = (
        None if remaining is None or remaining > MAX_DEADLINE_S else (time.monotonic() + remaining)
    )
    return CancelToken(deadline=deadline, is_active=context.is_active)


def stream_events(
    work: Callable[[Callable[[Any], None]], Any], token: CancelToken
) -> Iterator[tuple[str, Any]]:
    """Run ``work(sink)`` in a thread; yield ("event", e) for each sink(e), then ("result", r).

    If the consumer stops iterating (client gone), the token is cancelled so the work stops at
    its next check. Exceptions of the work are re-raised in the consumer.
    """
    events: queue.Queue[Any] = queue.Queue(maxsize=256)
    outcome: dict[str, Any] = {}

    def sink(event: Any) -> None:
        while True:
            token.check()
            try:
                events.put(event, timeout=0.5)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            outcome["result"] = work(sink)
        except BaseException as exc:  # handed to the consumer
            outcome["error"] = exc
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=run, daemon=True, name="stream-work")
    thread.start()
    try:
        while True:
            item = events.get()
            if item is _DONE:
                break
            yield "event", item
        if "error" in outcome:
            raise outcome["error"]
        yield "result", outcome.get("result")
    finally:
        token.cancel()
        thread.join(timeout=30)
