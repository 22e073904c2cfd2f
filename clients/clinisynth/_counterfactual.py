"""SDK calls of the counterfactual service (mixed into Client / AsyncClient)."""

from __future__ import annotations

from clinisynth._transport import AsyncTransport, Transport


class CounterfactualCalls:
    """Counterfactual calls of :class:`clinisynth.Client`."""

    _t: Transport


class AsyncCounterfactualCalls:
    """Counterfactual calls of :class:`clinisynth.AsyncClient`."""

    _t: AsyncTransport
