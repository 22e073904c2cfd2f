"""Prompt → fixed vector for the text-conditioned reward model (numpy only, no weights).

Why a hashing embedding: no sentence-encoder weights can be downloaded at run time, and the reward
model's label branch is a single ``Linear(text_dim, 100)`` that learns what matters from expert
labels. Hashed word unigrams + bigrams (signed, l2-normalised) keep findings ("effusion",
"no effusion") apart, are identical in the trainer and the scorer, and need nothing installed.
A reward folder names its encoder in ``clinisynth.json`` (``"text_encoder": "hashing-v1"``) so a
learned encoder can be added later without ambiguity.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence

import numpy as np

ENCODER = "hashing-v1"
_TOKEN = re.compile(r"[a-z0-9]+")


def _bucket(token: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return h % dim, 1.0 if (h >> 63) & 1 else -1.0


def embed_text(prompts: Sequence[str], dim: int) -> np.ndarray:
    """``[N, dim]`` float32: signed hashed uni/bigram counts, each row l2-normalised."""
    out = np.zeros((len(prompts), dim), dtype=np.float32)
    for i, prompt in enumerate(prompts):
        words = _TOKEN.findall(prompt.lower())
        for token in [*words, *(f"{a}_{b}" for a, b in itertools.pairwise(words))]:
            j, sign = _bucket(token, dim)
            out[i, j] += sign
        norm = float(np.linalg.norm(out[i]))
        if norm > 0:
            out[i] /= norm
    return out
