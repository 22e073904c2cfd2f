#!/usr/bin/env bash
# The full-size generator benchmark on a GPU machine, in one go:
#   1. install what the machine lacks from wheels carried in (no index, --no-deps),
#   2. check every import the run needs and the GPU, before spending time on it,
#   3. `clinisynth benchmark generator --preset sd15`: build the SD-1.5-shaped folder (random
#      weights from configs), import it through the stack with KIND_GPU float16 instances, then
#      512x512 at 30 and 50 steps, concurrency 1 / 8 / 32 (images/s, p50 / p99 latency) next to
#      diffusers' StableDiffusionPipeline in the same process, GPU memory per side,
#   4. write results.json, results.md and environment.txt into the output folder.
#
#   scripts/gpu_bench.sh [--wheels DIR] [--out DIR]      on the GPU machine
#   scripts/gpu_bench.sh --dry-run [--out DIR]            anywhere: the same steps on CPU with the
#                                                         tiny preset; installs nothing (pip --dry-run)
#
# The GPU machine is expected to have Python 3.12 with torch + CUDA, transformers, peft,
# accelerate and grpcio; diffusers, tritonclient[grpc], nvidia-pytriton (Triton itself) and any
# other missing dependency travel as py3.12 wheels in --wheels (default: ./wheels). Made here with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --no-deps -d wheels diffusers==0.42.1 tritonclient==2.73.0 nvidia-pytriton==0.7.0 \
#     python-rapidjson grpcio-status grpcio-health-checking grpcio-reflection prometheus-client \
#     pydicom==3.0.2 highdicom==0.28.2 pynetdicom==3.0.4 pyjwt pyyaml minio==7.2.20 ...
# (step 2 names every module still missing, before any time is spent on the run).
# The project itself is not installed: clients/, services/ and lab/ go on PYTHONPATH (the launcher
# hands PYTHONPATH on to Triton's python stubs), so its Python pin does not apply.
#
# Environment overrides: PYTHON (python3; the dry run: .venv/bin/python where it exists),
# STEPS (30,50), CLIENTS (1,8,32), REPEATS (1), MIN_REQUESTS (8), SEQUENTIAL_MAX (8),
# DTYPE (float16), BATCH_INVARIANT (true; false: batched U-Net forwards, no replay contract),
# TIMEOUT_S (540: the whole benchmark; the device allows 600 s a command).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/wheels"
OUT=""
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then  # the dry run uses the development venv where there is one
  PYTHON=python3
  if [ "$DRY_RUN" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; fi
fi
if [ -z "$OUT" ]; then
  OUT="$ROOT/out/gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT/clients:$ROOT/services:$ROOT/lab${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { printf '\n== %s\n' "$*"; }

if [ "$DRY_RUN" = 1 ]; then
  PRESET=tiny DEVICE=cpu DTYPE=float32
  STEPS="${STEPS:-2,3}" CLIENTS="${CLIENTS:-1,2,4}" REPEATS="${REPEATS:-1}"
  MIN_REQUESTS="${MIN_REQUESTS:-2}" SEQUENTIAL_MAX="${SEQUENTIAL_MAX:-2}"
else
  PRESET=sd15 DEVICE=gpu DTYPE="${DTYPE:-float16}"
  STEPS="${STEPS:-30,50}" CLIENTS="${CLIENTS:-1,8,32}" REPEATS="${REPEATS:-1}"
  MIN_REQUESTS="${MIN_REQUESTS:-8}" SEQUENTIAL_MAX="${SEQUENTIAL_MAX:-8}"
fi
TIMEOUT_S="${TIMEOUT_S:-540}"

say "1. install (wheels from $WHEELS, no index, no dependencies)"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -eq 0 ]; then
  echo "no wheels in $WHEELS: nothing to install"
elif [ "$DRY_RUN" = 1 ]; then
  "$PYTHON" -m pip install --dry-run --no-deps --no-index "${wheels[@]}"
else
  "$PYTHON" -m pip install --no-deps --no-index "${wheels[@]}"
fi

say "2. check the environment"
"$PYTHON" - "$DEVICE" <<'EOF' | tee "$OUT/environment.txt"
import importlib, platform, sys

need_gpu = sys.argv[1] == "gpu"
missing = []
print("python", platform.python_version(), sys.executable)
for module in ("torch", "diffusers", "transformers", "safetensors", "tritonclient.grpc",
               "pytriton", "grpc", "google.protobuf", "numpy", "PIL"):
    try:
        mod = importlib.import_module(module)
        print(f"{module:18s} {getattr(mod, '__version__', '')}")
    except ImportError as exc:
        missing.append(f"{module} ({exc})")
# The services' own imports name whatever else is missing (pydicom, prometheus_client, ...).
for module in ("clinisynth", "clinisynth_server.generator.app", "clinisynth_server.finetune.app",
               "clinisynth_lab.benchmarks.generator"):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing.append(f"{module}: {exc}")
try:
    from clinisynth_server.triton.launcher import backend_directory, pytriton_dir
    print("tritonserver      ", pytriton_dir() / "bin" / "tritonserver")
    print("python backend    ", backend_directory())
except Exception as exc:  # FailedPrecondition: no wheel, or no stub for this Python
    missing.append(f"Triton: {exc}")
try:
    import torch
    cuda = torch.cuda.is_available()
    print("cuda", cuda, torch.version.cuda, torch.cuda.get_device_name(0) if cuda else "")
    if need_gpu and not cuda:
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
except ImportError:
    pass  # already listed
if missing:
    print("MISSING:\n  " + "\n  ".join(missing))
    sys.exit(1)
print("environment ok")
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/environment.txt"
fi

say "3. benchmark: preset $PRESET on $DEVICE ($DTYPE), steps $STEPS, concurrency $CLIENTS"
# The benchmark starts Triton and the services itself and stops them when it ends (or is
# stopped: SIGTERM from timeout reaches its cleanup).
set +e
timeout --signal=TERM --kill-after=30 "$TIMEOUT_S" \
  "$PYTHON" -m clinisynth benchmark generator \
    --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --steps "$STEPS" --clients "$CLIENTS" --repeats "$REPEATS" \
    --min-requests "$MIN_REQUESTS" --sequential-max "$SEQUENTIAL_MAX" \
    --batch-invariant "${BATCH_INVARIANT:-true}" \
    --out "$OUT" 2>&1 | tee "$OUT/benchmark.log"
status=${PIPESTATUS[0]}
set -e
[ "$status" = 124 ] && echo "the benchmark ran past ${TIMEOUT_S}s and was stopped" >&2

say "4. figures in $OUT"
ls -l "$OUT"
exit "$status"
