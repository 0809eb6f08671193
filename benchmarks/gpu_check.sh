#!/usr/bin/env bash
# The project's GPU job, for an offline CUDA machine: build in place with the preinstalled
# torch/triton, run the GPU test tier, compute-sanitizer, and the benchmarks. Never downloads.
#
#   bash benchmarks/gpu_check.sh OUTDIR [STAGE ...]
#
# Stages (default: all, in this order): build test compile sanitize bench flex macs report.
# One device call is limited to 10 minutes, so on such a machine run the stages over a few calls
# of a warm machine (the build is kept between calls and skipped when unchanged), e.g.
#   bash benchmarks/gpu_check.sh out build test
#   bash benchmarks/gpu_check.sh out compile sanitize
#   bash benchmarks/gpu_check.sh out bench
#   bash benchmarks/gpu_check.sh out flex macs report
# Extra benchmark filters: FASTSWIN_BENCH_ARGS="--op swin_v1 --dtype fp16".
#
# Writes to OUTDIR: env.txt, build.log, pytest.log, pytest_compile.log, sanitizer_*.log, results/<device>.csv (+ PNGs
# if matplotlib is there), bench.log, bench_flex.log, model_macs.log, README.md with the table
# (report.log), and summary.txt with each stage's exit code.
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUTDIR [STAGE ...]}"; shift
STAGES="${*:-build test compile sanitize bench flex macs report}"
mkdir -p "$OUT/results"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FASTSWIN_NO_VENV=1 FASTSWIN_BUILD_CUDA=1 PIP_NO_INDEX=1
status() { echo "$(date +%H:%M:%S) $1: rc=$2" | tee -a "$OUT/summary.txt"; }
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# shellcheck disable=SC2206
BENCH_ARGS=(${FASTSWIN_BENCH_ARGS:-})

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; nvcc --version; } >"$OUT/env.txt" 2>&1

# Every stage needs the extension; env.sh skips the build when its stamp is unchanged.
( source scripts/env.sh ) >>"$OUT/build.log" 2>&1; rc=$?
[ -f build.log ] && cp build.log "$OUT/build_pip.log"
has build && status build $rc
[ $rc = 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

if has test; then
  # torch.compile's GPU tier (inductor compiles each case: tens of seconds) is its own stage.
  timeout 540 python3 -m pytest tests -q -ra -p no:cacheprovider --ignore=tests/test_compile.py >"$OUT/pytest.log" 2>&1
  status test $?
  tail -5 "$OUT/pytest.log"
fi

if has compile; then
  timeout 540 python3 -m pytest tests/test_compile.py -q -ra -p no:cacheprovider --durations=10 >"$OUT/pytest_compile.log" 2>&1
  status compile $?
  tail -5 "$OUT/pytest_compile.log"
fi

if has sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    # Small GPU tests of the compiled (CUDA C++) kernels; the caching allocator would hide
    # out-of-bounds accesses, hence PYTORCH_NO_CUDA_MEMORY_CACHING.
    for tool in memcheck racecheck initcheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        python3 -m pytest tests/test_bilinear_sample.py tests/test_window_attention_cuda.py -q -m gpu -x \
        -k "not int64" -p no:cacheprovider >"$OUT/sanitizer_$tool.log" 2>&1
      status "sanitize_$tool" $?
    done
  else
    status "sanitize (compute-sanitizer not found)" 127
  fi
fi

# Rows are saved after every case, so a timeout keeps what was measured. flex compiles per
# case (tens of seconds each): it runs as its own stage.
if has bench; then
  timeout 560 python3 -m benchmarks.run --out "$OUT/results" --skip-provider flex "${BENCH_ARGS[@]}" >"$OUT/bench.log" 2>&1
  status bench $?
  tail -30 "$OUT/bench.log"
fi
if has flex; then
  timeout 400 python3 -m benchmarks.run --out "$OUT/results" --provider flex "${BENCH_ARGS[@]}" >"$OUT/bench_flex.log" 2>&1
  status flex $?
fi
if has macs; then
  timeout 120 python3 -m benchmarks.model_macs >"$OUT/model_macs.log" 2>&1
  status macs $?
fi
if has report; then
  cp README.md "$OUT/README.md"
  python3 -m benchmarks.report --results "$OUT/results" --readme "$OUT/README.md" >"$OUT/report.log" 2>&1
  status report $?
fi
cat "$OUT/summary.txt"
