# clinisynth — the obvious targets. `make demo` and `make test` each install what they need.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
SYSTEM_PACKAGES := dicom3tools prometheus docker-compose chromium chromium-driver orthanc orthanc-dicomweb dcmtk

.PHONY: help venv install system-deps protos lint format test test-fast demo up down status bench clean

help:
	@echo "make demo     install, start the stack, make first requests, write out/ (then stop)"
	@echo "make test     install (incl. Debian test peers) and run the whole test suite"
	@echo "make up|down|status   the local stack;  make lint|format|protos|bench|clean"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
install: $(PY)
	$(PIP) install -q torch==2.13.0 'numpy<2'
	$(PIP) install -q -e '.[server,test]'
	$(PIP) install -q --no-deps -e ./lab

# Real peers the tests talk to: dciodvfy (DICOM validator), promtool + prometheus,
# docker-compose (config validation), chromium (browser tests), Orthanc + its DICOMweb plugin
# and dcmtk's storescp (PACS-out tests). Installed only when missing.
system-deps:
	@missing=""; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null || missing="$$missing chromium chromium-driver"; \
	command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	dpkg -s orthanc-dicomweb >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	command -v storescp >/dev/null || missing="$$missing dcmtk"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

protos: $(PY)
	$(PY) scripts/gen_protos.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(PY)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: system-deps install lint
	$(PY) -m pytest -q

test-fast: $(PY)
	$(PY) -m pytest -q tests/unit

demo: install
	$(VENV)/bin/clinisynth demo --out out

up: install
	$(VENV)/bin/clinisynth up --detach

down:
	$(VENV)/bin/clinisynth down

status:
	$(VENV)/bin/clinisynth status

bench: install
	$(VENV)/bin/clinisynth benchmark generator

# The full-size (SD-1.5-shaped) benchmark on a GPU machine: installs the wheels in WHEELS (no
# index, --no-deps), runs fp16 512x512 at 30 / 50 steps, concurrency 1 / 8 / 32, writes figures
# to OUT. `make gpu-bench GPU_BENCH_ARGS=--dry-run` runs the same steps on CPU (tiny preset).
.PHONY: gpu-bench
WHEELS ?= wheels
gpu-bench:
	bash scripts/gpu_bench.sh --wheels $(WHEELS) $(if $(OUT),--out $(OUT)) $(GPU_BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache out
