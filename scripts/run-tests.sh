#!/usr/bin/env bash
# Run the suite; pytest's exit 5 ("no tests collected") is a failure here, not a pass,
# because a suite that silently collects nothing hides breakage.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks scripts
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
