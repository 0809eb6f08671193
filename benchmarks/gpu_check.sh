#!/usr/bin/env bash
# One call on a GPU machine (offline): build in place with the preinstalled torch/triton, run the
# GPU test tier, compute-sanitizer on the compiled kernels, and the benchmarks.
#   bash benchmarks/gpu_check.sh OUTDIR [benchmark args...]
# Writes to OUTDIR: env.txt, build.log, pytest.log, sanitizer_*.log, results/<device>.csv (+ PNGs
# if matplotlib is there), bench.log, bench_flex.log, model_macs.log, README.md with the table
# (report.log), and a summary.txt listing each step's exit code. Never downloads anything.
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

# Rows are saved after every case, so a timeout keeps what was measured. flex compiles per case
# (tens of seconds each): it runs in its own call after everything else.
timeout 420 python3 -m benchmarks.run --out "$OUT/results" --skip-provider flex "$@" >"$OUT/bench.log" 2>&1
status bench $?
tail -30 "$OUT/bench.log"
if [ $# = 0 ]; then
  timeout 300 python3 -m benchmarks.run --out "$OUT/results" --provider flex >"$OUT/bench_flex.log" 2>&1
  status bench_flex $?
fi
timeout 120 python3 -m benchmarks.model_macs >"$OUT/model_macs.log" 2>&1
status model_macs $?
cp README.md "$OUT/README.md"
python3 -m benchmarks.report --results "$OUT/results" --readme "$OUT/README.md" >"$OUT/report.log" 2>&1
status report $?
cat "$OUT/summary.txt"
