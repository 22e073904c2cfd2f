"""Training batches streamed from a sharded data set by a torch DataLoader with worker processes.

Each epoch's order depends only on (seed, epoch): shards are permuted, then the samples inside
each shard. The resulting sequence is padded (wrapping) to a multiple of the world size and cut
into one contiguous range per rank, so ranks read disjoint shards (sharing at most the two at
their range's ends) and together see every sample once per epoch; each rank's range is cut
again into one contiguous range per DataLoader worker. Workers decode (PNG / JPEG / DICOM with
:mod:`clinisynth_server.imaging.decode`), crop, resize and augment, and yield whole batches, so
the stream is endless (epochs roll over inside a worker) and every rank yields a full batch at
every step, also when an image is skipped.

Memory per process: the shard cache (``cache_shards`` files on local disk, one member read at a
time), at most one batch being assembled per worker, and the DataLoader's ``prefetch_factor``
batches per worker in flight — never the set's size. :class:`StreamStats` counts it.
"""

from __future__ import annotations

import hashlib
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clinisynth_server.errors import ClinisynthError, InvalidArgument
from clinisynth_server.finetune.shards import Index, ShardCache

ON_BAD_IMAGE = ("fail", "skip")
AUGMENT = ("none", "hflip")


@dataclass(frozen=True)
class StreamConfig:
    size: int
    channels: int
    batch_size: int  # this rank's rows per step
    seed: int
    rank: int = 0
    world: int = 1
    num_workers: int = 0
    cache_shards: int = 2
    augment: str = "none"
    on_bad_image: str = "fail"
    start_batch: int = 0  # batches this rank already consumed (resume)


@dataclass
class StreamStats:
    """Counters of one process's stream (the bounded-memory claim is asserted on these)."""

    decoded: int = 0
    held: int = 0
    max_held: int = 0
    skipped: list[str] = field(default_factory=list)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def epoch_order(index: Index, seed: int, epoch: int, exclude: frozenset[str]) -> list[str]:
    """Every sample of the set in this epoch's order (shards permuted, then their members)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    out: list[str] = []
    for s in torch.randperm(len(index.shards), generator=g).tolist():
        paths = [p for p in index.shards[s].paths if p not in exclude]
        out += [paths[i] for i in torch.randperm(len(paths), generator=g).tolist()]
    return out


def rank_range(order: Sequence[str], rank: int, world: int) -> list[str]:
    """This rank's contiguous range of the epoch, after padding to a multiple of ``world``."""
    if not order:
        return []
    per = -(-len(order) // world)
    padded = list(order) + list(order[: per * world - len(order)])
    return padded[rank * per : (rank + 1) * per]


def worker_range(paths: Sequence[str], worker: int, workers: int) -> list[str]:
    n = len(paths)
    return list(paths[n * worker // workers : n * (worker + 1) // workers])


def to_sample(arr: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A decoded HxW / HxWx3 image → ``(channels, size, size)`` float32 in [0, 1] (centre crop)."""
    from clinisynth_server.imaging.decode import resize_to

    if arr.ndim == 2 and channels == 3:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and channels == 1:
        arr = arr.mean(axis=2)
    if arr.shape[0] != arr.shape[1]:
        side = min(arr.shape[:2])
        top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
        arr = arr[top : top + side, left : left + side]
    arr = resize_to(arr, (size, size), resample="area" if arr.shape[0] > size else "bilinear")
    out = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.clip(out.astype(np.float32), 0.0, 1.0)


class ShardStream(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Endless batches ``{"x": (B, C, S, S) in [0, 1], "y": (B,), "paths", "skipped"}``.

    ``labels`` maps a member path to its class index (0 when the kind has none); ``exclude``
    names paths held out (a validation split). ``cache`` builds one process's shard cache.
    """

    def __init__(
        self,
        index: Index,
        config: StreamConfig,
        cache: Callable[[int], ShardCache],
        labels: dict[str, int],
        exclude: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.index, self.config, self.make_cache = index, config, cache
        self.labels, self.exclude = labels, exclude
        self.stats = StreamStats()
        self.cache: ShardCache | None = None

    def _decode(self, path: str) -> np.ndarray:
        from clinisynth_server.imaging.decode import decode_image

        assert self.cache is not None
        data = self.cache.read(self.index.shards[self.index.where[path]], path)
        return decode_image(data, field=path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.config
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.cache = self.make_cache(worker)
        # Batch j of this rank comes from worker j % workers (the DataLoader's round robin).
        skip_batches = max(0, -(-(cfg.start_batch - worker) // workers))
        skip = skip_batches * cfg.batch_size
        epoch = 0
        xs: list[np.ndarray] = []
        ys: list[int] = []
        names: list[str] = []
        skipped: list[str] = []
        while True:
            order = epoch_order(self.index, cfg.seed, epoch, self.exclude)
            mine = worker_range(rank_range(order, cfg.rank, cfg.world), worker, workers)
            if not mine:
                raise InvalidArgument.for_field(
                    "dataset", "no samples for this process (fewer samples than processes)"
                )
            rng = np.random.default_rng([cfg.seed, epoch, cfg.rank, worker])
            for path in mine:
                flip = cfg.augment == "hflip" and bool(rng.integers(2))
                if skip:
                    skip -= 1
                    continue
                try:
                    sample = to_sample(self._decode(path), cfg.size, cfg.channels)
                except (ClinisynthError, ValueError, OSError) as exc:
                    if cfg.on_bad_image != "skip" or path not in self.index.where:
                        message = exc.message if isinstance(exc, ClinisynthError) else str(exc)
                        raise InvalidArgument.for_field(
                            "dataset", f"{path}: unreadable image ({message})"
                        ) from None
                    skipped.append(path)
                    self.stats.skipped.append(path)
                    continue
                if flip:
                    sample = np.ascontiguousarray(sample[:, :, ::-1])
                self.stats.decoded += 1
                xs.append(sample)
                ys.append(self.labels.get(path, 0))
                names.append(path)
                self.stats.held = len(xs)
                self.stats.max_held = max(self.stats.max_held, len(xs))
                if len(xs) == cfg.batch_size:
                    batch = {
                        "x": torch.from_numpy(np.stack(xs)),
                        "y": torch.tensor(ys, dtype=torch.long),
                        "paths": names,
                        "skipped": skipped,
                    }
                    xs, ys, names, skipped = [], [], [], []
                    self.stats.held = 0
                    yield batch
            epoch += 1


class Batches:
    """A rank's endless batch iterator over a :class:`ShardStream`, resumable by batch count.

    ``state()`` is the number of batches consumed; ``load_state`` restarts the DataLoader
    there (the skipped samples are counted, not decoded). Skipped images are reported through
    ``on_skip`` with their paths.
    """

    def __init__(
        self,
        make: Callable[[int], ShardStream],
        *,
        num_workers: int,
        on_skip: Callable[[list[str]], None] = lambda paths: None,
    ) -> None:
        self.make, self.num_workers, self.on_skip = make, num_workers, on_skip
        self.consumed = 0
        self.skipped = 0
        #: Seconds the last ``next`` waited for its batch (decoding not hidden by prefetch).
        self.last_wait_s = 0.0
        self._it: Iterator[dict[str, Any]] | None = None
        self.stream: ShardStream | None = None

    def _start(self) -> Iterator[dict[str, Any]]:
        self.stream = self.make(self.consumed)
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
            persistent_workers=False,
            multiprocessing_context="fork" if self.num_workers else None,
        )
        return iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self.last_wait_s = time.perf_counter() - t0
        self.consumed += 1
        self.last_paths: list[str] = list(batch["paths"])
        if batch["skipped"]:
            self.skipped += len(batch["skipped"])
            self.on_skip(list(batch["skipped"]))
        return batch["x"], batch["y"]

    def state(self) -> dict[str, int]:
        return {"batches": self.consumed, "skipped": self.skipped}

    def load_state(self, state: dict[str, int]) -> None:
        self.consumed, self.skipped = int(state["batches"]), int(state.get("skipped", 0))
        self._it = None


def holdout(paths: Sequence[str], fraction: float, seed: int, limit: int) -> list[str]:
    """A stable validation split by path hash (at most ``limit`` paths, so it fits in memory)."""
    if fraction <= 0:
        return []
    cut = int(fraction * 2**32)
    out = []
    for p in paths:
        h = int.from_bytes(hashlib.sha256(f"{seed}\x00{p}".encode()).digest()[:4], "big")
        if h < cut:
            out.append(p)
            if len(out) >= limit:
                break
    return out


def cache_factory(
    fetch: Callable[[str, pathlib.Path], None], folder: pathlib.Path, max_shards: int
) -> Callable[[int], ShardCache]:
    """One cache folder per DataLoader worker of this process."""

    def make(worker: int) -> ShardCache:
        return ShardCache(fetch, folder / f"worker-{worker}", max_shards=max_shards)

    return make
