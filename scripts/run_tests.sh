#!/usr/bin/env bash
# The README's test command: sets up .venv and the build (scripts/env.sh), then runs every test
# tier this machine can run:
#   CPU tier          always (reference vs loops/timm/DAT math, gradcheck, opcheck, bad inputs, C++ kernels)
#   Triton tier       on a GPU; on a CPU machine under TRITON_INTERPRET=1 (set here, before any
#                     Triton import, since Triton picks the interpreter at decoration time)
#   GPU tier          when torch.cuda.is_available()
# Extra arguments go to pytest (e.g. -k swin, -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export FASTSWIN_CHECK_FINITE="${FASTSWIN_CHECK_FINITE:-1}"
echo "[fastswin] pytest (TRITON_INTERPRET=${TRITON_INTERPRET:-0})" >&2
exec "$PY" -m pytest tests -q -ra "$@"
