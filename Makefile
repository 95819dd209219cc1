# sllm-knative: the two commands a newcomer needs are `make demo` and `make test`.
# Both build on `make install`, which creates .venv, installs the pinned CPU torch
# first (a CPU wheel is on disk on these machines; an unpinned torch would pull
# several GB of CUDA wheels), then the project and its dev extras without build
# isolation so the build never re-downloads torch.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard cuda_ext/src/*) $(wildcard loader_sidecar/*.proto)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q $(TORCH) pybind11 grpcio-tools
	$(VPY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VPY) -m sllm_knative.demo

test: install
	$(VPY) -m pytest -q -n 2 tests

lint: install
	$(VPY) -m ruff check .
	$(VPY) -m mypy sllm_knative functions

# Benchmarks need fio (the disk limit) and nginx (the HTTP store / proxy baseline).
bench-deps: install
	@command -v fio >/dev/null || (apt-get update -qq && apt-get install -y -qq fio)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light || apt-get install -y -qq nginx)
	$(VPY) -m pip install -q --no-build-isolation -e '.[dev,bench]'

bench: bench-deps
	$(VPY) -m bench.loading --model-gb 2.5 --out out/bench

clean:
	rm -rf build $(VENV) *.egg-info cuda_ext/*.so
