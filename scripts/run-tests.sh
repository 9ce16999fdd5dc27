#!/usr/bin/env bash
# Lint, then the suite by tier: the unit tier (not `integration`, not `gpu`: pure functions
# and the tiny model in this process), then the integration tier (other processes, servers,
# Ray, a browser, benchmarks, real model weights; `gpu` tests skip without CUDA).
#
#   bash scripts/run-tests.sh            both tiers, unit first (make test)
#   bash scripts/run-tests.sh unit       the unit tier alone (make test-fast)
#   bash scripts/run-tests.sh integration
#
# Further arguments go to pytest. pytest's exit 5 ("no tests collected") is a failure here,
# not a pass: a tier that silently collects nothing hides breakage.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=${1:-all}
case "$tier" in unit|integration|all) shift || true ;; *) tier=all ;; esac
.venv/bin/ruff check src tests benchmarks scripts
run() {  # run NAME MARKEXPR ARGS...
  local name=$1 expr=$2
  shift 2
  echo "== $name tier ($expr)"
  set +e
  .venv/bin/python -m pytest -m "$expr" "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no $name tests: treating as failure" >&2
    exit 1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
}
# one BLAS/OpenMP thread per process: pytest's workers and the CLIs, servers and Ray workers the
# tests start run side by side on CI's 2 cores, where torch's default (a thread per core each)
# oversubscribes them. Measured on this project's 2-core machine, 2026-12-04: the unit tier 170 s
# in one process, 128 s on two workers of one thread; the integration tier 486 s, then 411 s
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
[ "$tier" = integration ] || run unit "not integration and not gpu" -n "${MTA_TEST_WORKERS:-2}" "$@"
# the integration tier mostly waits on other processes (servers, Ray, CLIs): two pytest
# workers, one test file each at a time (module fixtures stay per file), MTA_TEST_WORKERS
# to change (the unit tier spreads test by test). Tests spread one by
# one (--dist loadgroup, servers' files grouped) were tried: the browser test's adapt job
# then missed its wait beside the kill tests on 2 cores
[ "$tier" = unit ] || run integration "integration or gpu" -n "${MTA_TEST_WORKERS:-2}" --dist loadfile "$@"
