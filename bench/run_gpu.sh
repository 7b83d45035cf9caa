#!/usr/bin/env bash
# The GPU machine's part of `make bench` and the GPU tests, in one call (see bench/README.md).
# Wheels the image lacks (wasmtime, zstandard) travel in .whl/; results land in bench/results/*-gpu.json
# and, with logs, in $OUT. Steps: GPU_STEPS (default: tests snapshot gpu_http density gpu).
set -uo pipefail
OUT=${OUT:-/tmp/tw-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/runtime:$PWD/operator:$PWD/api:$PWD/dev${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  python3 -c 'import sys, cuda.bindings, wasmtime, zstandard, aiohttp; print(sys.version, cuda.bindings.__version__)'
} 2>&1 | tee "$OUT/env.log"
export TENSORWASM_BENCH_DENSITY_MPS_PROCESSES=${TENSORWASM_BENCH_DENSITY_MPS_PROCESSES:-4}
for step in ${GPU_STEPS:-tests snapshot gpu_http density gpu}; do
  echo "== $step $(date -u +%T)"
  if [ "$step" = tests ]; then
    python3 -m pytest tests/gpu/test_snapshot_gpu.py tests/gpu/test_cuda_kernels.py tests/gpu/test_cuda_caps.py \
      tests/gpu/test_cuda_health.py tests/gpu/test_runtime_poison.py -q -rA -p no:cacheprovider 2>&1 \
      | tee "$OUT/tests.log" | tail -25
  else
    python3 bench/run.py --only "$step" --suffix gpu 2>&1 | tee -a "$OUT/bench.log" | tail -5
    cp "bench/results/$step-gpu.json" "$OUT/" 2>/dev/null
  fi
done
echo "== done $(date -u +%T)"
