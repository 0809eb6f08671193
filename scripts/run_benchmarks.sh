#!/usr/bin/env bash
# The README's main command: sets up .venv and the build (scripts/env.sh), then runs the
# benchmark on the present device (see `scripts/run_benchmarks.sh --help`). Results go to
# benchmarks/results/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m benchmarks.run "$@"
