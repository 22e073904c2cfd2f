"""The similarity index a generator-training job stores with each promotable checkpoint.

The memorization gate compares every generated image with the images the model was trained on;
this module builds that index once per job (rank 0 only: only it writes checkpoints) and writes it
into the checkpoint's ``model/similarity/`` folder, where the checkpoint manifest lists and
hashes it like every other file and promotion carries it into the served model.

An in-memory data set is indexed from the decoded array; a sharded one is read once, image by
image, through the same shard stream training uses (bounded memory: only index rows are kept).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from clinisynth_server.similarity.index import (
    INDEX_DIR,
    SimilarityIndex,
    build_index,
    save_component,
)

#: Images per feature-extraction batch while indexing.
CHUNK = 256


def _hwc(x: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] (the training layout) → ``[N, H, W, C]`` (the extractor's)."""
    return np.transpose(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0), (0, 2, 3, 1))


def from_array(x: np.ndarray, *, seed: int = 0, source: str = "") -> SimilarityIndex | None:
    """Index decoded training images ``[N, C, H, W]`` in [0, 1] (None for fewer than two)."""
    if len(x) < 2:
        return None  # nothing to calibrate "close" against: the model is served without an index
    batches = (_hwc(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK))
    return build_index(batches, seed=seed, meta={"source": source, "images": len(x)})


def _stream_batches(
    ctx: Any, size: int, channels: int, exclude: frozenset[str]
) -> Iterator[np.ndarray]:
    from clinisynth_server.finetune import datasets, shards
    from clinisynth_server.finetune.shards_loader import ShardStream, StreamConfig, cache_factory

    p = ctx.params
    reader = datasets.sharded(ctx.source)
    assert reader is not None
    total = reader.index.samples - len(exclude)
    fetch = shards.store_fetch(reader.store.uri(), reader.prefix)
    folder = ctx.workdir / "shard-cache" / "similarity-index"
    config = StreamConfig(
        size=size,
        channels=channels,
        batch_size=1,
        seed=p["seed"],
        cache_shards=p.get("shard_cache", 2),
        # An unreadable image is never trained on: under on_bad_image=fail training fails the job
        # at the step whose batch holds it (the checkpoints before stay), so the index skips it.
        on_bad_image="skip",
    )
    stream = ShardStream(
        reader.index, config, cache_factory(fetch, folder, config.cache_shards), {}, exclude
    )
    rows: list[np.ndarray] = []
    for batch in stream:  # one epoch: every sample once (skipped ones counted)
        rows.append(batch["x"].numpy()[0])
        if len(rows) == CHUNK:
            yield _hwc(np.stack(rows))
            rows = []
        if stream.stats.decoded + len(stream.stats.skipped) >= total:
            break
    if rows:
        yield _hwc(np.stack(rows))


def from_stream(
    ctx: Any, *, size: int, channels: int, exclude: frozenset[str] = frozenset()
) -> SimilarityIndex:
    """Index a sharded training set in one pass (memory: the index rows only)."""
    index = build_index(
        _stream_batches(ctx, size, channels, exclude),
        seed=ctx.params["seed"],
        meta={"source": f"job {ctx.job_id} (sharded)"},
    )
    ctx.log(f"similarity index: {index.count} training images")
    return index


def write(index: SimilarityIndex | None, model_folder: pathlib.Path) -> None:
    """Store ``index`` in a promotable model folder (nothing when the job has none)."""
    if index is not None:
        save_component(index, pathlib.Path(model_folder) / INDEX_DIR)
