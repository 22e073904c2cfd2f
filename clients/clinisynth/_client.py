"""``Client`` and its asyncio twin ``AsyncClient``: one object for every clinisynth service.

with clinisynth.Client() as client:          # finds the stack started by `clinisynth up`
    result = client.generate("cells", class_name="neutrophil", n=4, seed=1)
    result.save("out/")

The methods are written once in ``_async_client`` (``AsyncClient``); ``_sync_client``
(``Client``) is generated from it by ``scripts/gen_sync_client.py``. This module keeps the
import path both have always had.
"""

from __future__ import annotations

from clinisynth._async_client import AsyncClient, AsyncScoreStream
from clinisynth._sync_client import Client, ScoreStream
from clinisynth._transport import DEFAULT_TIMEOUT

__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "AsyncScoreStream", "Client", "ScoreStream"]
