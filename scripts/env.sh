# Sourced by the project's entry scripts. Makes ./.venv if absent, installs what the project
# needs (torch only when none is importable), finds the CUDA toolkit, and builds fastswin._C in
# place. Safe to source repeatedly: every step is skipped when already done.
#
# Overrides: FASTSWIN_VENV (venv folder), FASTSWIN_PYTHON (interpreter for a new venv),
# FASTSWIN_TORCH_SPEC (pip spec for torch when none is installed), FASTSWIN_BUILD_CUDA=0|1,
# FASTSWIN_NO_VENV=1 (use the current python as is: the offline GPU machine, see
# benchmarks/gpu_check.sh).
set -euo pipefail
FASTSWIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$FASTSWIN_ROOT"

_log() { printf '[fastswin] %s\n' "$*" >&2; }

if [ "${FASTSWIN_NO_VENV:-0}" = 1 ]; then
  PY="$(command -v python3)"
else
  VENV="${FASTSWIN_VENV:-$FASTSWIN_ROOT/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    # torch 2.14.1 ships wheels for CPython 3.10-3.13; prefer 3.11, whose wheels are cached here.
    base="${FASTSWIN_PYTHON:-$(command -v python3.11 || command -v python3)}"
    _log "creating $VENV with $base"
    "$base" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  PIP=("$PY" -m pip install -q --disable-pip-version-check)
  if ! "$PY" -c "import torch" 2>/dev/null; then
    spec="${FASTSWIN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
    _log "installing $spec (a CUDA build: about a minute from a local cache, several GB otherwise)"
    # shellcheck disable=SC2086
    "${PIP[@]}" $spec
  fi
  # timm and transformers are pinned: the parity tests compare against those exact releases
  # (fastswin.patch of Hugging Face Swin follows transformers 5.x's attention classes). fvcore:
  # the tests check its FLOP counts of the fused ops; matplotlib: the benchmark report's plots.
  if ! "$PY" -c "import setuptools, pybind11, ninja, pytest, pytest_benchmark, numpy, triton, timm, fvcore, matplotlib, transformers; assert timm.__version__ == '1.0.31' and transformers.__version__ == '5.23.0'" 2>/dev/null; then
    _log "installing build and test requirements"
    "${PIP[@]}" "setuptools>=70" wheel pybind11 ninja pytest pytest-benchmark "timm==1.0.31" numpy fvcore matplotlib \
      "transformers==5.23.0"
    "$PY" -c "import triton" 2>/dev/null || "${PIP[@]}" triton
  fi
fi
export PATH="$(dirname "$PY"):$PATH"

# The CUDA toolkit: CUDA_HOME must be the toolkit's own folder (a wrapper nvcc on the PATH makes
# torch guess wrong), plus the nvidia cu13 wheel's include folder for the cuSPARSE headers that
# torch's CUDA headers include.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$(readlink -f "$d")"; break; fi
  done
fi
if [ -n "${CUDA_HOME:-}" ]; then
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [ -d "$site/nvidia/cu13/include" ]; then
    export FASTSWIN_EXTRA_INCLUDE="$site/nvidia/cu13/include${FASTSWIN_EXTRA_INCLUDE:+:$FASTSWIN_EXTRA_INCLUDE}"
  fi
fi

# Build fastswin._C in place. The PEP 660 editable build compiles from scratch each time (2-3
# minutes with the CUDA sources on 2 cores), so it is skipped when nothing that goes into the
# extension changed: a stamp of the C++/CUDA sources, setup.py, torch and the build switches.
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
stamp="$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat;
           "$PY" -c 'import torch; print(torch.__version__)';
           echo "${FASTSWIN_BUILD_CUDA:-auto} ${CUDA_HOME:-} ${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -c1-16)"
if [ "$(cat "$FASTSWIN_ROOT/.build_stamp" 2>/dev/null)" = "$stamp" ] && "$PY" -c "import fastswin._C" 2>/dev/null; then
  _log "fastswin._C is up to date (stamp $stamp)"
else
  _log "building fastswin._C (CUDA_HOME=${CUDA_HOME:-none}, FASTSWIN_BUILD_CUDA=${FASTSWIN_BUILD_CUDA:-auto}); log: build.log"
  if ! "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >"$FASTSWIN_ROOT/build.log" 2>&1; then
    tail -n 60 "$FASTSWIN_ROOT/build.log" >&2
    _log "build failed; full log: $FASTSWIN_ROOT/build.log"
    exit 1
  fi
  echo "$stamp" >"$FASTSWIN_ROOT/.build_stamp"
  grep -h "fastswin: building" "$FASTSWIN_ROOT/build.log" >&2 || true
fi
"$PY" -c "import fastswin._C as c; print('[fastswin] fastswin._C loaded; CUDA kernels compiled:', c.cuda_built())" >&2
