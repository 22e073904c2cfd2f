"""What a job kind is (spec + trainer) and the training pieces the kinds share.

A kind declares its parameters (:class:`~clinisynth_server.finetune.params.Param`), its data-set
layout, an extra up-front check (base model exists, classes match …) and a trainer factory. The
worker (:mod:`clinisynth_server.finetune.worker`) owns the loop around the trainer: steps,
checkpoints, resume, events, cancellation. A trainer owns one optimiser step, its full resumable
state (model, optimiser, LR schedule, EMA, RNG, data position) and writing a promotable folder.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pathlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import numpy as np
import torch

from clinisynth_server.errors import FieldViolation
from clinisynth_server.finetune.datasets import DatasetReport, Source
from clinisynth_server.finetune.params import Param


@dataclass(frozen=True)
class CheckContext:
    """What a kind's up-front check may consult (service side, no training)."""

    catalog: Any
    store: Any
    model_repository: str


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


@dataclass
class TrainContext:
    """What a trainer gets in the worker."""

    job_id: str
    params: dict[str, Any]
    source: Source
    report: DatasetReport
    workdir: pathlib.Path
    store: Any
    catalog: Any
    model_repository: str
    accelerator: Any
    log: Callable[[str], None]
    save_artifact: Callable[[str, pathlib.Path], None]
    load_artifact: Callable[[str, pathlib.Path], bool]
    check_cancel: Callable[[], None] = lambda: None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def prepare(self, *objects: Any) -> Any:
        """accelerate's ``prepare`` for what trains; a module with no trainable parameter is
        only moved to the device (accelerate would wrap it in DDP on CPU, which refuses it)."""
        if self.accelerator is None:
            return objects if len(objects) > 1 else objects[0]
        frozen = [
            isinstance(o, torch.nn.Module) and not any(q.requires_grad for q in o.parameters())
            for o in objects
        ]
        trained = [o for o, f in zip(objects, frozen, strict=True) if not f]
        prepared = self.accelerator.prepare(*trained) if trained else ()
        if len(trained) == 1:
            prepared = (prepared,)
        done = iter(prepared)
        out = tuple(
            o.to(self.device) if f else next(done) for o, f in zip(objects, frozen, strict=True)
        )
        return out if len(out) > 1 else out[0]

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def update(
        self, loss: torch.Tensor, params: Any, optimizer: Any, lr: Any, max_grad_norm: float
    ) -> None:
        """One optimizer update: backward, clip, step, LR step, zero the gradients."""
        self.backward(loss)
        self.clip(params, max_grad_norm)
        optimizer.step()
        lr.step()
        optimizer.zero_grad(set_to_none=True)

    @overload
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    @overload
    def unwrap(self, model: torch.nn.Module, kind: type[ModuleT]) -> ModuleT: ...
    def unwrap(
        self, model: torch.nn.Module, kind: type[torch.nn.Module] = torch.nn.Module
    ) -> torch.nn.Module:
        """The module inside accelerate's wrapper; ``kind`` names (and checks) the class built."""
        inner = self.accelerator.unwrap_model(model) if self.accelerator is not None else model
        if not isinstance(inner, kind):
            raise TypeError(f"expected a {kind.__name__} inside the wrapper, got {type(inner)}")
        return inner

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (rank r takes rows r, r+W, …, as EpochSampler).

        Per-sample randomness (noise, timesteps) is drawn for the whole global batch on every
        rank and then sharded, so a run's numbers do not depend on how many processes share it.
        """
        return batch[self.rank :: self.world_size] if self.world_size > 1 else batch

    def clip(self, params: Any, max_norm: float) -> None:
        if max_norm <= 0:
            return
        if self.accelerator is not None:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def accumulate(
        self,
        models: Sequence[torch.nn.Module],
        micro_loss: Callable[[slice], tuple[torch.Tensor, dict[str, float]]],
        rows: int,
        params: Any,
        optimizer: Any,
        lr: Any,
        max_grad_norm: float,
    ) -> tuple[float, dict[str, float]]:
        """One optimiser step over this rank's ``rows`` in ``gradient_accumulation_steps``
        micro-batches: ``micro_loss(rows_slice)`` returns a micro-batch's mean loss (and metrics).

        Each micro-batch's loss is scaled by its share of the rows, so the summed gradients are
        those of the whole batch's mean loss; DDP all-reduces only after the last micro-batch.
        Returns the batch's loss and its metrics (micro-batch metrics averaged the same way).
        """
        steps = int(self.params.get("gradient_accumulation_steps", 1) or 1)
        if rows % steps:
            raise ValueError(f"{rows} rows do not split into {steps} micro-batches")
        size = rows // steps
        total, metrics = 0.0, dict[str, float]()
        for k in range(steps):
            last = k == steps - 1
            with contextlib.ExitStack() as stack:
                if not last and self.accelerator is not None and self.world_size > 1:
                    for model in models:
                        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                            stack.enter_context(model.no_sync())
                loss, parts = micro_loss(slice(k * size, (k + 1) * size))
                self.backward(loss / steps)
            total += float(loss.detach()) / steps
            for name, value in parts.items():
                metrics[name] = metrics.get(name, 0.0) + value / steps
        self.clip(params, max_grad_norm)
        optimizer.step()
        lr.step()
        optimizer.zero_grad(set_to_none=True)
        return total, metrics

    def scratch(self, name: str) -> pathlib.Path:
        """A local path of this process's own: ranks on one machine never share a file (one
        process keeps ``workdir/name``)."""
        folder = self.workdir / f"rank-{self.rank}" if self.world_size > 1 else self.workdir
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def fetch_model(self, ref: str, name: str, *, field_name: str) -> tuple[Any, pathlib.Path]:
        """``models.fetch`` once per machine: the local main process materialises the model
        under ``workdir/name``, the other ranks wait for it and read the same folder."""
        from clinisynth_server.finetune import models

        dest = self.workdir / name
        if self.accelerator is None or self.world_size == 1:
            return models.fetch(ref, self, dest, field_name=field_name)
        if self.accelerator.is_local_main_process:
            base, folder = models.fetch(ref, self, dest, field_name=field_name)
            self.accelerator.wait_for_everyone()
            return base, folder
        self.accelerator.wait_for_everyone()
        return models.resolve(ref, self.catalog, self.store, field_name=field_name), dest


class Trainer(Protocol):
    #: Metric of ``evaluate()`` that marks the best checkpoint ("" = the last one is best).
    best_metric: str
    best_mode: str  # "max" or "min"

    def step(self, step: int) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def save_model(self, folder: pathlib.Path) -> None: ...


Check = Callable[[dict[str, Any], DatasetReport, CheckContext], list[FieldViolation]]


@dataclass(frozen=True)
class KindSpec:
    name: str
    description: str
    dataset_layout: str
    params: tuple[Param, ...]
    trainer: Callable[[TrainContext], Trainer]
    check: Check = field(default=lambda params, report, ctx: [])
    # Training itself, for the benchmark's plain loop: (model, batch) → see kinds.


# ---------------------------------------------------------------------------------------------
# shared training pieces
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSampler:
    """Seeded shuffled batches over ``n`` items with a resumable position (epoch, offset).

    Each epoch's order depends only on (seed, epoch), so a resumed job sees exactly the batches
    an uninterrupted one would. With several ranks, rank r takes rows r, r+W, … of each global
    batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.offset = 0, 0
        self._perm: torch.Tensor | None = None

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def next(self) -> torch.Tensor:
        """Indices of the next batch (wrapping into the next epoch; always ``batch_size``)."""
        parts = []
        need = self.batch_size
        while need:
            order = self._order()
            take = order[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        batch = torch.cat(parts)
        return batch[self.rank :: self.world]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None


#: Data-loading parameters of the kinds that stream sharded sets (diffusion_pretrain, classifier).
STREAM_PARAMS = (
    Param(
        "streaming",
        "choice",
        "auto",
        "read a sharded data set through a DataLoader with worker processes (auto: when the "
        "set is sharded; off: decode it all into memory first)",
        choices=("auto", "off"),
    ),
    Param(
        "data_workers",
        "int",
        "2",
        "DataLoader worker processes per training process (0 = decode in the training process)",
        minimum=0,
        maximum=32,
    ),
    Param(
        "shard_cache",
        "int",
        "2",
        "shards each reading process keeps on local disk",
        minimum=1,
        maximum=1024,
    ),
    Param("augment", "choice", "none", "random horizontal flips", choices=("none", "hflip")),
    Param(
        "on_bad_image",
        "choice",
        "fail",
        "an image that cannot be decoded during training fails the job (fail) or is skipped, "
        "counted and named in the job's events (skip)",
        choices=("fail", "skip"),
    ),
)


def stream_batches(
    ctx: TrainContext,
    *,
    size: int,
    channels: int,
    labels: Mapping[str, int],
    exclude: frozenset[str] = frozenset(),
) -> Any:
    """This rank's endless batches of a sharded set, or None when the kind reads it in memory.

    The local batch is ``batch_size / world_size`` rows; ranks read disjoint shard ranges (see
    :mod:`clinisynth_server.finetune.shards_loader`). Skipped images go to the job's events.
    """
    from clinisynth_server.finetune import datasets, shards
    from clinisynth_server.finetune.shards_loader import (
        Batches,
        ShardStream,
        StreamConfig,
        cache_factory,
    )

    p = ctx.params
    reader = datasets.sharded(ctx.source)
    if reader is None or p.get("streaming", "off") == "off":
        return None
    fetch = shards.store_fetch(reader.store.uri(), reader.prefix)
    folder = ctx.workdir / "shard-cache" / f"rank-{ctx.rank}"
    label_map = dict(labels)

    def make(start_batch: int) -> ShardStream:
        config = StreamConfig(
            size=size,
            channels=channels,
            batch_size=p["batch_size"] // ctx.world_size,
            seed=p["seed"],
            rank=ctx.rank,
            world=ctx.world_size,
            num_workers=p["data_workers"],
            cache_shards=p["shard_cache"],
            augment=p["augment"],
            on_bad_image=p["on_bad_image"],
            start_batch=start_batch,
        )
        return ShardStream(
            reader.index, config, cache_factory(fetch, folder, p["shard_cache"]), label_map, exclude
        )

    def on_skip(paths: list[str]) -> None:
        ctx.log(
            f"on_bad_image=skip: skipped {len(paths)} unreadable image(s) "
            f"({batches.skipped} so far): {', '.join(paths)}"
        )

    batches = Batches(make, num_workers=p["data_workers"], on_skip=on_skip)
    ctx.log(
        f"streaming {reader.index.samples - len(exclude)} images from "
        f"{len(reader.index.shards)} shards: {p['data_workers']} loader worker(s) per process, "
        f"{p['shard_cache']} cached shard(s) each"
    )
    return batches


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then constant / cosine / linear decay to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def make_optimizer(
    params: Any, p: Mapping[str, Any], *, weight_decay: float | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(
        params,
        lr=p["learning_rate"],
        weight_decay=p.get("weight_decay", 0.0) if weight_decay is None else weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(p["lr_schedule"], p["lr_warmup_steps"], p["max_steps"])
    )
    return opt, sched


class EMA:
    """Exponential moving average of a module's parameters (and copied buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for param in self.shadow.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for s, m in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s.lerp_(m.detach(), 1.0 - self.decay)
        for sb, mb in zip(self.shadow.buffers(), model.buffers(), strict=True):
            sb.copy_(mb)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(grad)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _AllReduceSum.apply(tensor)
    return out


class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span the global batch of every rank.

    Per-rank statistics over ``batch_size / world_size`` rows would make a DDP run train a
    different model than one process with the same global batch; torch's ``SyncBatchNorm`` needs
    a GPU, so on CPU (gloo) the sums go through the differentiable ``all_reduce``. Same
    parameters and buffers as ``BatchNorm2d``: state dicts load either way. Two passes (mean,
    then the centred squares) keep the variance as exact as the one-process kernel's.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        c, dims, shape = input.shape[1], [0, 2, 3], (1, -1, 1, 1)
        count = torch.full((1,), input.numel() // c, dtype=input.dtype, device=input.device)
        sums = _all_reduce_sum(torch.cat([input.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:c] / n
        centered = input - mean.view(shape)
        var = _all_reduce_sum((centered * centered).sum(dims)) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        return out


def sync_batchnorm(module: ModuleT, ctx: TrainContext) -> ModuleT:
    """BatchNorm over the global batch when several processes train (nothing to do for one)."""
    if ctx.world_size == 1:
        return module
    if ctx.device.type == "cuda":
        synced: ModuleT = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return synced
    for sub in module.modules():
        if type(sub) is torch.nn.BatchNorm2d:
            sub.__class__ = CpuSyncBatchNorm  # same state, global statistics
    return module


def batched(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def violation(name: str, text: str) -> FieldViolation:
    return FieldViolation(name, text)
