#!/usr/bin/env bash
# The GPU check on a lent H100/H200 (issue 18), one command from the repository root:
#
#   bash bench/gpu/run.sh            # on the lent machine: $OUT set by the device tool, .gpu-wheels carried
#   bash bench/gpu/run.sh --dry      # here, no GPU (make gpu-check DRY=1, and make test)
#
# 1. installs the carried wheels (.gpu-wheels, made by `make gpu-wheels`) for the machine's own
#    python3 (the image's CUDA torch), without network access, into a folder put on PYTHONPATH;
# 2. builds the loader extension with that machine's nvcc for sm_90 (review finding F14);
# 3. runs python -m bench.gpu.check (its docstring lists the phases), which writes gpu-check.json,
#    gpu-check.png and the benchmarks' PNGs to $OUT; this script adds log.txt there.
# Extra arguments go to the check (e.g. --phases coldstart_1b,migration for a rerun).
# The dry run uses .venv/bin/python (make install) and checks the bundle instead of installing it.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
OUT="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
WHEELS="${WHEELS:-.gpu-wheels}"
SITE="${SITE:-/tmp/sllm-gpu-site}"
export PYTHONUNBUFFERED=1
step() { echo "== $(date -u +%H:%M:%S) $*"; }

if [[ $DRY == 1 ]]; then
  PY="${PY:-.venv/bin/python}"
  step "dry run: the wheel bundle is complete for CPython 3.12 and installs offline"
  "$PY" -m bench.gpu.wheels check --dest "$WHEELS" || exit 1
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "$WHEELS"/*.whl || { echo "the bundle does not install offline"; exit 1; }
  rm -rf "$SITE"
  step "dry run: the check, on the CPU"
  exec "$PY" -m bench.gpu.check --dry --out "$OUT" "$@"
fi

PY="${PY:-python3}"
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
df -h "$PWD" /dev/shm | tail -n +2
step "the image's packages (to update bench/gpu/image-packages.txt)"
"$PY" -m pip list --format=freeze 2>/dev/null | tr '\n' ' ' || true
echo
step "installing $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) carried wheels into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
  || { echo "FAILED: installing the carried wheels (make gpu-wheels here, carry .gpu-wheels)"; exit 1; }
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
step "building the loader extension for sm_90 with $(command -v nvcc || echo 'nvcc from CUDA_HOME or /usr/local/cuda')"
SLLM_CUDA_ARCHS=90 CI=true "$PY" setup.py -q build_ext --inplace \
  || { echo "FAILED: building cuda_ext with nvcc (see above); set CUDA_HOME to the toolkit"; exit 1; }
step "the check"
"$PY" -m bench.gpu.check --out "$OUT" "$@"
rc=$?
step "done (rc $rc): $(ls "$OUT" | tr '\n' ' ')"
exit $rc
