"""SDK calls of the finetune service (mixed into Client / AsyncClient)."""

from __future__ import annotations

from clinisynth._transport import AsyncTransport, Transport


class FinetuneCalls:
    """Finetune calls of :class:`clinisynth.Client`."""

    _t: Transport


class AsyncFinetuneCalls:
    """Finetune calls of :class:`clinisynth.AsyncClient`."""

    _t: AsyncTransport
