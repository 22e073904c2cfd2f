"""Cancellation and deadlines for domain code, without importing grpc.

Long loops call ``token.check()`` between units of work (a denoising step, a training step): it
raises :class:`Cancelled` or :class:`DeadlineExceeded` once the caller gave up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from clinisynth_server.errors import Cancelled, DeadlineExceeded


class CancelToken:
    def __init__(
        self,
        *,
        deadline: float | None = None,
        is_active: Callable[[], bool] | None = None,
    ) -> None:
        # deadline: time.monotonic() value after which work must stop.
        self._deadline = deadline
        self._is_active = is_active
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self._is_active is not None and not self._is_active())

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("the call was cancelled")
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise DeadlineExceeded("the call's deadline passed")


NEVER = CancelToken()
