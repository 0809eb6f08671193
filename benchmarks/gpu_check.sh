#!/usr/bin/env bash
# One call on a GPU machine (offline): build in place with the preinstalled torch/triton, run the
# GPU test tier, compute-sanitizer on the compiled kernels, and the benchmarks.
#   bash benchmarks/gpu_check.sh OUTDIR [benchmark args...]
# Writes to OUTDIR: env.txt, build.log, pytest.log, sanitizer_*.log, results/<device>.csv,
# bench.log, and a summary.txt listing each step's exit code. Never downloads anything.
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUTDIR [benchmark args]}"; shift || true
mkdir -p "$OUT/results"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FASTSWIN_NO_VENV=1 FASTSWIN_BUILD_CUDA=1 PIP_NO_INDEX=1
status() { echo "$1: rc=$2" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; nvcc --version; } >"$OUT/env.txt" 2>&1

( source scripts/env.sh ) >"$OUT/build.log" 2>&1; rc=$?; cat build.log >>"$OUT/build.log" 2>/dev/null
status build $rc
[ $rc = 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

timeout 300 python3 -m pytest tests -q -ra -p no:cacheprovider >"$OUT/pytest.log" 2>&1
status pytest $?
tail -5 "$OUT/pytest.log"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck initcheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 -m pytest tests -q -m gpu -k "bilinear" -x >"$OUT/sanitizer_$tool.log" 2>&1
    status "sanitizer_$tool" $?
  done
fi

timeout 420 python3 -m benchmarks.run --out "$OUT/results" "$@" >"$OUT/bench.log" 2>&1
status bench $?
tail -30 "$OUT/bench.log"
cat "$OUT/summary.txt"
