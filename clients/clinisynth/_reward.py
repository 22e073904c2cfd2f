"""SDK calls of the reward scorer and expert feedback service (mixed into Client / AsyncClient)."""

from __future__ import annotations

from clinisynth._transport import AsyncTransport, Transport


class RewardCalls:
    """Reward calls of :class:`clinisynth.Client`."""

    _t: Transport


class AsyncRewardCalls:
    """Reward calls of :class:`clinisynth.AsyncClient`."""

    _t: AsyncTransport
