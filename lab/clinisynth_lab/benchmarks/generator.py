"""Generator benchmark: clinisynth (gRPC + Triton) vs diffusers' ``StableDiffusionPipeline``.

One run, same Stable Diffusion folder, prompt, seeds, steps, size and guidance on both sides; the
folder is built from configs (random weights, nothing downloaded) and served the way a user's
checkpoint is: imported through the finetune service's ImportModel RPC (chunked upload,
validation, Triton load), then generated through the generator service. The two sides run
interleaved, one measurement each in turn (A B A B … per repeat), so load on the host that comes
and goes hits both alike; ratios are taken between medians.

  1. one request: gRPC + Triton latency ÷ the pipeline's (goal ≤ 1.05);
  2. ``--clients`` concurrent requests: clinisynth images/s ÷ the pipeline run that many times in
     a row, and ÷ the pipeline at that batch size (``num_images_per_prompt``; goal ≥ 1);
  3. time per stage (text encoder, denoiser, VAE decode: Triton's compute time for one request,
     the pipeline's module time), the import's stages, peak RSS per process and of the host
     (and GPU memory per process where ``nvidia-smi`` is present).

``--background-load N`` runs N niced (19) busy processes during both sides, as a ``nice`` job
started from the same shell would. ``--out DIR`` writes ``results.json`` and ``results.md``.

    clinisynth benchmark generator [--preset small|tiny|sd15] [--steps 20] [--repeats 3]
        [--clients 8] [--background-load 1] [--device cpu|gpu --dtype float16] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinisynth_lab.benchmarks import hostload

PROMPT = "a chest x-ray with a small left pleural effusion"
GUIDANCE = 7.5
MODEL_NAME = "bench-sd"
# An SD-1.5 guided step (two U-Net passes at 64×64 latents) is ≈ 1.6 TFLOP.
SD15_GUIDED_STEP_TFLOP = 1.6


@dataclass(frozen=True)
class Preset:
    """A model shape and the run a preset makes by default."""

    name: str
    description: str
    size: int
    steps: tuple[int, ...]
    repeats: int
    clients: tuple[int, ...]
    build: str  # the builder call (see :func:`build_folder`), run in a child process
    step_tflop: float | None = None  # per guided step, where known


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        "the tests' Stable Diffusion folder: U-Net 32,64, CLIP text 32-d, 32×32 RGB",
        size=32,
        steps=(4,),
        repeats=2,
        clients=(4,),
        build="build_text_to_image(folder, size=32, image_channels=3)",
    ),
    "small": Preset(
        "small",
        "Stable Diffusion folder: U-Net 64,128, CLIP text 64-d, 64×64 RGB (32×32 latents)",
        size=64,
        steps=(20,),
        repeats=3,
        clients=(8,),
        build="build_text_to_image(folder, size=64, image_channels=3, unet_channels=(64, 128), "
        "text_dim=64)",
    ),
    "sd15": Preset(
        "sd15",
        "SD-1.5-shaped: U-Net 320,640,1280,1280 (≈860 M), CLIP ViT-L/14 text, SD VAE, 512×512",
        size=512,
        steps=(2,),
        repeats=1,
        clients=(),
        build="build_sd15_shaped(folder)",
        step_tflop=SD15_GUIDED_STEP_TFLOP,
    ),
}


def build_folder(preset: Preset, folder: pathlib.Path) -> dict[str, int]:
    """Build the preset's folder in a child process (its peak memory is not this process's);
    returns parameter counts per component."""
    code = (
        "import json, pathlib, sys\n"
        "from clinisynth_lab.builders import build_text_to_image, build_sd15_shaped\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        f"{preset.build}\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return parameter_counts(folder)


def parameter_counts(folder: pathlib.Path) -> dict[str, int]:
    """Parameters per component, read from the safetensors headers (no weights loaded)."""
    counts = {}
    for sub in ("unet", "text_encoder", "vae"):
        total = 0
        for path in sorted((folder / sub).glob("*.safetensors")):
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    total += math.prod(entry["shape"])
        counts[sub] = total
    return counts


# -- measurements -------------------------------------------------------------------------------
@dataclass
class Side:
    """One side's samples: single-request latencies, per-level throughputs, stage seconds."""

    latency: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    concurrent: dict[int, list[float]] = field(default_factory=dict)  # images/s per repeat
    request_latency: dict[int, list[float]] = field(default_factory=dict)  # every request
    denoiser_rows: dict[int, list[float]] = field(default_factory=dict)  # per execution
    sequential: dict[int, list[float]] = field(default_factory=dict)
    batched: dict[int, list[float]] = field(default_factory=dict)

    def add_stages(self, stages: dict[str, float]) -> None:
        for name, seconds in stages.items():
            self.stages.setdefault(name, []).append(seconds)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Pipeline:
    """diffusers' ``StableDiffusionPipeline`` in this process, timing its three modules."""

    def __init__(self, folder: pathlib.Path, device: str, dtype: str) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        self.device = "cuda" if device == "gpu" else "cpu"
        self.pipe = StableDiffusionPipeline.from_pretrained(
            str(folder),
            safety_checker=None,
            requires_safety_checker=False,
            dtype=getattr(torch, dtype),
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.seconds: dict[str, float] = {}
        self._wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self._wrap(self.pipe.unet, "forward", "denoiser")
        self._wrap(self.pipe.vae, "decode", "vae_decode")

    def _wrap(self, module: Any, method: str, stage: str) -> None:
        original = getattr(module, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        setattr(module, method, timed)

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def __call__(self, seeds: Sequence[int], steps: int, size: int) -> tuple[float, np.ndarray]:
        """One call generating ``len(seeds)`` images as one batch; (seconds, images)."""
        self.seconds = {}
        generators = [self.torch.Generator().manual_seed(s) for s in seeds]
        start = time.perf_counter()
        images = self.pipe(
            PROMPT,
            num_images_per_prompt=len(seeds),
            generator=generators if len(seeds) > 1 else generators[0],
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=size,
            width=size,
            output_type="np",
        ).images
        self._sync()
        return time.perf_counter() - start, np.asarray(images)

    def peak_gpu_mb(self) -> float:
        if self.device != "cuda":
            return float("nan")
        return float(self.torch.cuda.max_memory_allocated()) / 2**20


class Stack:
    """Triton + the finetune (import) and generator services, as child processes."""

    COMPONENTS = ("text_encoder", "denoiser", "vae_decode")

    def __init__(self, work: pathlib.Path, own_session: bool) -> None:
        from clinisynth_server.triton.launcher import TritonServer

        self.work = work
        self.repo = work / "triton-models"
        self.repo.mkdir(parents=True, exist_ok=True)
        self.triton = TritonServer(
            self.repo,
            log_path=work / "triton.log",
            strict=False,
            startup_timeout_s=600,
            own_session=own_session,
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        from clinisynth_server.triton.client import TritonClient

        with self.triton:
            try:
                for service in ("finetune", "generator"):
                    self._start(service)
                with TritonClient(self.triton.grpc_url, timeout_s=600) as client:
                    self.client = client
                    yield self
            finally:
                for proc in self.procs.values():
                    proc.terminate()
                for proc in self.procs.values():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(30)

    def _start(self, service: str) -> None:
        from clinisynth_server.stack import wait_serving

        env = {
            **os.environ,
            "CLINISYNTH_TRITON_URL": self.triton.grpc_url,
            "CLINISYNTH_TRITON_KEY_FILE": str(self.triton.key_file or ""),
            "CLINISYNTH_STORE_URL": str(self.work / "store"),
            "CLINISYNTH_HOME": str(self.work),
            "CLINISYNTH_FINETUNE_MODEL_REPOSITORY": str(self.repo),
            "CLINISYNTH_FINETUNE_WORKDIR": str(self.work / "finetune-work"),
            f"CLINISYNTH_{service.upper()}_CACHE_DIR": str(self.work / f"{service}-cache"),
        }
        log_path = self.work / f"{service}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "clinisynth_server.serve",
                    service,
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs[service] = proc
        port = _wait_port(log_path, proc, service)
        self.addresses[service] = f"127.0.0.1:{port}"
        if not wait_serving(self.addresses[service], 120):
            raise RuntimeError(f"{service} is not serving; see {log_path}")

    def set_parameter(self, name: str, key: str, value: str) -> None:
        """Set a ``config.pbtxt`` parameter of every component of ``name`` and reload them
        (the operator's way, docs/OPERATIONS.md: e.g. ``batch_invariant`` false)."""
        for role in self.COMPONENTS:
            path = self.repo / f"{name}.{role}" / "config.pbtxt"
            line = f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
            kept = [ln for ln in path.read_text().splitlines() if f'key: "{key}"' not in ln]
            path.write_text("\n".join([*kept, line]) + "\n")
            self.client.load_model(f"{name}.{role}")

    def denoiser_counts(self, name: str) -> tuple[int, int]:
        """(batch rows, executions) of the denoiser so far: their ratio is how many rows the
        dynamic batcher merged into one execution."""
        stats = self.client.statistics(f"{name}.denoiser")
        return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)

    def compute_seconds(self, name: str) -> dict[str, float]:
        """Triton's cumulative compute + queue time per component of model ``name``."""
        out = {}
        for role in self.COMPONENTS:
            stats = self.client.statistics(f"{name}.{role}")
            out[role] = sum(s.compute_infer_ns + s.queue_ns for s in stats) / 1e9
        return out

    def memory(self) -> dict[str, float]:
        """Peak RSS (MB) of Triton, each python-backend stub (by model) and each service."""
        rss: dict[str, float] = {}
        if self.triton.pid is not None:
            for pid, cmd in hostload.process_tree(self.triton.pid).items():
                label = _stub_label(cmd, self.repo) or (
                    "tritonserver" if "tritonserver" in cmd else ""
                )
                if label:
                    rss[label] = max(rss.get(label, 0.0), hostload.peak_rss_mb(pid))
        for service, proc in self.procs.items():
            rss[f"{service} service"] = hostload.peak_rss_mb(proc.pid)
        return rss

    def gpu_memory(self) -> dict[str, float]:
        usage = hostload.gpu_memory_mb()
        if not usage or self.triton.pid is None:
            return {}
        out: dict[str, float] = {}
        for pid, cmd in hostload.process_tree(self.triton.pid).items():
            if pid in usage:
                label = _stub_label(cmd, self.repo) or "tritonserver"
                out[label] = out.get(label, 0.0) + usage[pid]
        return out


def _stub_label(cmdline: str, repo: pathlib.Path) -> str:
    """``bench-sd.denoiser`` from a python-backend stub's command line (its model.py path)."""
    marker = str(repo) + os.sep
    if "triton_python_backend_stub" not in cmdline or marker not in cmdline:
        return ""
    return cmdline.split(marker, 1)[1].split(os.sep, 1)[0]


def _wait_port(log_path: pathlib.Path, proc: subprocess.Popen[bytes], service: str) -> int:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(f"READY {service} "):
                return int(line.split("grpc=")[1].split()[0])
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text(errors="replace")[-4000:])
        time.sleep(0.2)
    raise RuntimeError(f"{service} did not start; see {log_path}")


def import_stages(
    start: float, events: list[tuple[float, str]], end: float
) -> list[tuple[str, float]]:
    """(stage, seconds) from the import's timestamped progress events, in order.

    Upload events (one per file) merge into one "upload" stage; each server stage lasts until
    the next event (the last one until the call returned)."""
    stages: list[tuple[str, float]] = []
    marks = [(start, "upload")] + [(t, s) for t, s in events if s != "upload"]
    last_upload = max((t for t, s in events if s == "upload"), default=start)
    for i, (t, stage) in enumerate(marks):
        until = marks[i + 1][0] if i + 1 < len(marks) else end
        if stage == "upload":
            until = last_upload if len(marks) > 1 else end
        stages.append((stage, max(0.0, until - t)))
    return stages


def run_concurrent(call: Callable[[int], Any], clients: int, seeds: Sequence[int]) -> list[float]:
    """``call(seed)`` for every seed from ``clients`` threads; each request's seconds."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    queue = list(seeds)

    def worker() -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                seed = queue.pop(0)
            start = time.perf_counter()
            try:
                call(seed)
            except BaseException as exc:  # re-raised below, in the caller's thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return latencies


# -- the run ---------------------------------------------------------------------------------------
def _levels(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` → (1, 8, 32); ``""`` or ``"0"``: none."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"each value must be ≥ 0: {text!r}")
    return tuple(v for v in values if v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clinisynth benchmark generator",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=_levels, help="sampler steps, e.g. 20 or 30,50")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (medians over them)")
    parser.add_argument(
        "--clients", type=_levels, help="concurrency levels, e.g. 8 or 1,8,32 (0: none)"
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=0,
        help="requests per concurrency level: the level, or this many if more (for p50 / p99)",
    )
    parser.add_argument(
        "--sequential-max",
        type=int,
        default=1_000_000,
        help="run the pipeline N× in a row only for levels up to this",
    )
    parser.add_argument("--no-batch", action="store_true", help="skip the batched pipeline")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--instances", type=int, default=1, help="Triton instances per component")
    parser.add_argument("--max-batch", type=int, default=16, help="Triton max_batch_size")
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="N niced CPU-bound processes during both sides",
    )
    parser.add_argument(
        "--triton-own-session",
        action="store_true",
        help="start Triton in a session of its own (the launcher's old behaviour, to compare)",
    )
    parser.add_argument(
        "--batch-invariant",
        choices=("true", "false"),
        default="true",
        help="the components' batch_invariant mode (false: batched forwards, no replay contract)",
    )
    parser.add_argument("--out", type=pathlib.Path, help="write results.json / results.md here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    ns = parser.parse_args(argv)
    preset = PRESETS[ns.preset]
    ns.steps = ns.steps or preset.steps
    ns.repeats = ns.repeats or preset.repeats
    ns.clients = preset.clients if ns.clients is None else ns.clients
    if not ns.steps:
        parser.error("--steps needs at least one step count")
    if ns.repeats < 1 or ns.background_load < 0 or ns.min_requests < 0:
        parser.error("--repeats must be ≥ 1, --background-load and --min-requests ≥ 0")
    return ns


def same_openmp_settings() -> dict[str, str]:
    """Give this process (the in-process pipeline) and the services the OpenMP settings the
    launcher gives Triton's stubs, unless the environment sets them: the comparison is then of
    the stack, not of two spin policies. Before torch loads (libgomp reads them once)."""
    from clinisynth_server.triton.launcher import KMP_BLOCKTIME_MS, OMP_SPIN_COUNT

    if "torch" in sys.modules:
        raise RuntimeError("OpenMP settings must be made before torch is imported")
    os.environ.setdefault("GOMP_SPINCOUNT", str(OMP_SPIN_COUNT))
    os.environ.setdefault("KMP_BLOCKTIME", str(KMP_BLOCKTIME_MS))
    return {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME")}


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: Triton and the services are stopped on the way


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    preset = PRESETS[ns.preset]
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    same_openmp_settings()
    work = pathlib.Path(tempfile.mkdtemp(prefix="clinisynth-bench-"))
    try:
        results = run(ns, preset, work)
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_figures(ns.out, results, report(results))
    return 0


def write_figures(out: pathlib.Path | None, results: Any, text: str) -> None:
    """Print the report; with ``--out``, also write results.json and results.md there."""
    print(text, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        (out / "results.md").write_text(text + "\n")
        print(f"figures written to {out}", flush=True)


def run(ns: argparse.Namespace, preset: Preset, work: pathlib.Path) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    import clinisynth

    for library in (diffusers, transformers):  # no progress bars or notices between the rows
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()

    folder = work / "model"
    t0 = time.perf_counter()
    params = build_folder(preset, folder)
    build_s = time.perf_counter() - t0
    machine = (
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads, GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}), load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    if ns.device == "gpu" and torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    print(
        f"{preset.name}: {preset.description}; parameters "
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items())
        + f"; built in {build_s:.1f} s. Machine: {machine}",
        flush=True,
    )
    results: dict[str, Any] = {
        "preset": preset.name,
        "description": preset.description,
        "parameters": params,
        "size": preset.size,
        "device": ns.device,
        "dtype": ns.dtype,
        "instances": ns.instances,
        "batch_invariant": ns.batch_invariant,
        "background_load": ns.background_load,
        "triton_own_session": ns.triton_own_session,
        "machine": machine,
        "repeats": ns.repeats,
        "guidance_scale": GUIDANCE,
        "build_s": build_s,
        "runs": {},
    }
    gpu_before = hostload.gpu_used_total_mb()
    with (
        hostload.HostMemory() as host,
        hostload.GpuMemory() as gpu,
        Stack(work, ns.triton_own_session).running() as stack,
    ):
        sdk = clinisynth.Client(endpoints=stack.addresses, timeout=3600)
        events: list[tuple[float, str]] = []
        start = time.perf_counter()
        details = sdk.import_model(
            folder,
            name=MODEL_NAME,
            dtype=ns.dtype,
            device=ns.device,
            instances=ns.instances,
            max_batch_size=ns.max_batch,
            progress=lambda e: events.append((time.perf_counter(), e.stage)),
        )
        end = time.perf_counter()
        results["import"] = {
            "seconds": end - start,
            "stages": import_stages(start, events, end),
            "model": details.ref,
            "sampler": details.scheduler,
        }
        print(f"imported {details.ref} in {end - start:.1f} s ({details.scheduler})", flush=True)
        if ns.batch_invariant == "false":
            stack.set_parameter(MODEL_NAME, "batch_invariant", "false")
        gpu_served = hostload.gpu_used_total_mb()
        pipeline = Pipeline(folder, ns.device, ns.dtype)
        with hostload.BackgroundLoad(ns.background_load):
            for steps in ns.steps:
                results["runs"][str(steps)] = measure(ns, preset, sdk, stack, pipeline, steps)
                if ns.out is not None:  # what a run cut short by a time limit still leaves
                    ns.out.mkdir(parents=True, exist_ok=True)
                    partial = json.dumps(results, indent=2, default=float)
                    (ns.out / "results.partial.json").write_text(partial)
        results["memory_mb"] = {
            **stack.memory(),
            "benchmark process (in-process pipeline)": hostload.peak_rss_mb(os.getpid()),
        }
        results["gpu_memory_mb"] = {
            **stack.gpu_memory(),
            "stack after import (nvidia-smi, all processes, above the start)": (
                gpu_served - gpu_before
            ),
            "in-process pipeline (torch max allocated)": pipeline.peak_gpu_mb(),
        }
        sdk.close()
    results["gpu_memory_mb"]["peak in use during the run (nvidia-smi, all processes)"] = gpu.peak_mb
    results["host_peak_mb"] = host.peak_mb
    results["host_peak_above_start_mb"] = host.peak_above_baseline_mb
    return results


def measure(
    ns: argparse.Namespace,
    preset: Preset,
    sdk: Any,
    stack: Stack,
    pipeline: Pipeline,
    steps: int,
) -> dict[str, Any]:
    """Both sides, interleaved, at one step count."""
    size = preset.size

    def generate(seed: int) -> np.ndarray:
        res = sdk.generate(
            MODEL_NAME,
            prompt=PROMPT,
            seed=seed,
            steps=steps,
            width=size,
            height=size,
            guidance_scale=GUIDANCE,
            format="raw",
        )
        return np.asarray(res.images[0].to_numpy())

    ours, theirs = Side(), Side()
    # Warm-up: Triton's first executions, caches, the tokenizer fetch, the first touch of the
    # stubs' memory-mapped weights; the pipeline's first calls. Once for the full-size model on
    # a CPU, where one call takes half a minute.
    for seed in (0,) if preset.size >= 512 and ns.device == "cpu" else (0, 1):
        generate(seed)
        pipeline([seed], steps, size)
    diff = float("nan")
    for rep in range(ns.repeats):
        seed = 1000 * (rep + 1)
        before = stack.compute_seconds(MODEL_NAME)
        t = time.perf_counter()
        served = generate(seed)
        total = time.perf_counter() - t
        after = stack.compute_seconds(MODEL_NAME)
        stages = {k: after[k] - before[k] for k in after}
        stages["other"] = total - sum(stages.values())
        ours.latency.append(total)
        ours.add_stages(stages)

        seconds, local = pipeline([seed], steps, size)
        if rep == 0:  # the same seed on both sides: the same image, up to float rounding
            diff = float(np.abs(served.astype(np.float64) - local[0].reshape(served.shape)).max())
        theirs.latency.append(seconds)
        theirs.add_stages({**pipeline.seconds, "other": seconds - sum(pipeline.seconds.values())})
        print(
            f"  repeat {rep + 1}: one request {total:.2f} s (stack) vs {seconds:.2f} s (pipeline)",
            flush=True,
        )
        for level in ns.clients:
            seeds = [seed + 1 + i for i in range(max(level, ns.min_requests))]
            rows, runs = stack.denoiser_counts(MODEL_NAME)
            t = time.perf_counter()
            lat = run_concurrent(generate, level, seeds)
            wall = time.perf_counter() - t
            rows_after, runs_after = stack.denoiser_counts(MODEL_NAME)
            merged = (rows_after - rows) / max(1, runs_after - runs)
            ours.concurrent.setdefault(level, []).append(len(seeds) / wall)
            ours.request_latency.setdefault(level, []).extend(lat)
            ours.denoiser_rows.setdefault(level, []).append(merged)
            line = (
                f"  repeat {rep + 1}, {level} clients: {ours.concurrent[level][-1]:.3f} img/s "
                f"({merged:.1f} rows per denoiser execution)"
            )
            if 1 < level <= ns.sequential_max:
                t = time.perf_counter()
                for s in seeds[:level]:
                    pipeline([s], steps, size)
                rate = level / (time.perf_counter() - t)
                theirs.sequential.setdefault(level, []).append(rate)
                line += f"; pipeline {level}× in a row {rate:.3f} img/s"
            if not ns.no_batch and level > 1:
                seconds, _ = pipeline(seeds[:level], steps, size)
                theirs.batched.setdefault(level, []).append(level / seconds)
                line += f"; pipeline batch {level} {level / seconds:.3f} img/s"
            print(line, flush=True)
    return {"stack": _summary(ours), "pipeline": _summary(theirs), "pixel_max_diff": diff}


def _summary(side: Side) -> dict[str, Any]:
    return {
        "latency_s": median(side.latency),
        "latency_samples_s": side.latency,
        "stages_s": {k: median(v) for k, v in side.stages.items()},
        "concurrent": {
            str(level): {
                "images_per_s": median(rates),
                "p50_s": percentile(side.request_latency.get(level, []), 50),
                "p99_s": percentile(side.request_latency.get(level, []), 99),
                "rows_per_execution": median(side.denoiser_rows.get(level, [])),
                "samples": rates,
            }
            for level, rates in side.concurrent.items()
        },
        "sequential_images_per_s": {str(k): median(v) for k, v in side.sequential.items()},
        "batched_images_per_s": {str(k): median(v) for k, v in side.batched.items()},
    }


# -- the report -----------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "—"


def report(r: dict[str, Any]) -> str:
    lines = [
        "",
        f"preset {r['preset']} ({r['description']}), {r['size']}×{r['size']}, guidance "
        f"{r['guidance_scale']}, {r['device']} {r['dtype']}, {r['instances']} Triton instance(s) "
        f"per component, batch_invariant {r.get('batch_invariant', 'true')}; background load: "
        f"{r['background_load']} niced busy process(es)"
        + (", Triton in its own session" if r["triton_own_session"] else "")
        + f"; {r['machine']}",
        "",
        "| steps | measure | clinisynth (gRPC + Triton) | in-process diffusers | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for steps, run in r["runs"].items():
        ours, theirs = run["stack"], run["pipeline"]
        lines.append(
            f"| {steps} | one request, latency (median of {r['repeats']}) | "
            f"{ours['latency_s']:.2f} s | {theirs['latency_s']:.2f} s | "
            f"{_ratio(ours['latency_s'], theirs['latency_s'])} | ≤ 1.05 |"
        )
        for level, conc in ours["concurrent"].items():
            rate = conc["images_per_s"]
            lines.append(
                f"| {steps} | {level} concurrent requests, images/s (p50 {conc['p50_s']:.2f} s, "
                f"p99 {conc['p99_s']:.2f} s; {conc['rows_per_execution']:.1f} rows per "
                f"denoiser execution) | "
                f"{rate:.3f} | — | — | — |"
            )
            seq = theirs["sequential_images_per_s"].get(level)
            if seq is not None:
                lines.append(
                    f"| {steps} | {level} requests ÷ the pipeline {level}× in a row | "
                    f"{rate:.3f} img/s | {seq:.3f} img/s | {_ratio(rate, seq)} | ≥ 1 |"
                )
            batch = theirs["batched_images_per_s"].get(level)
            if batch is not None:
                lines.append(
                    f"| {steps} | {level} requests ÷ the pipeline at batch {level} | "
                    f"{rate:.3f} img/s | {batch:.3f} img/s | {_ratio(rate, batch)} | ≥ 1 |"
                )
        for stage in ("text_encoder", "denoiser", "vae_decode", "other"):
            a, b = ours["stages_s"].get(stage), theirs["stages_s"].get(stage)
            if a is None and b is None:
                continue
            lines.append(
                f"| {steps} | one request: {stage.replace('_', ' ')} | {a or 0:.2f} s | "
                f"{b or 0:.2f} s | — | — |"
            )
        lines.append(
            f"| {steps} | max pixel difference, same seed | {run['pixel_max_diff']:.1e} | | | |"
        )
    imp = r.get("import")
    if imp:
        stages = ", ".join(f"{s} {sec:.1f} s" for s, sec in imp["stages"])
        lines += ["", f"import through ImportModel: {imp['seconds']:.1f} s ({stages})"]
    lines += ["", "peak RSS (VmHWM): " + ", ".join(f"{k} {v:.0f} MB" for k, v in _mem(r))]
    lines.append(
        f"host memory in use, peak: {r['host_peak_mb'] / 1024:.1f} GB "
        f"({r['host_peak_above_start_mb'] / 1024:.1f} GB above the start)"
    )
    gpu = {k: v for k, v in r.get("gpu_memory_mb", {}).items() if not math.isnan(v)}
    if gpu:
        lines.append("GPU memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in gpu.items()))
    flop = PRESETS[r["preset"]].step_tflop
    if flop:
        for steps, run in r["runs"].items():
            for level, conc in run["stack"]["concurrent"].items():
                tflops = conc["images_per_s"] * int(steps) * flop
                lines.append(
                    f"steps {steps}, {level} clients: ≈ {tflops:.1f} TFLOP/s in the U-Net "
                    f"({flop} TFLOP per guided step)"
                )
    return "\n".join(lines)


def _mem(r: dict[str, Any]) -> list[tuple[str, float]]:
    return [(k, v) for k, v in r.get("memory_mb", {}).items() if not math.isnan(v)]


if __name__ == "__main__":
    sys.exit(main())
