#!/usr/bin/env bash
# The last call of a GPU session: packs RES (default /root/res) for the trip back into OUT
# (default $OUT, the device tool's folder): everything but adapters, banks, user stores,
# Ray's work folder and raw profiler dumps, in pieces of 15 MiB (at most 8 files of 16 MiB
# come back). Here: cat res.tgz.* | tar -xzf - -C SOMEWHERE.
#
#   bash scripts/gpu-collect.sh [RES] [OUT]
set -euo pipefail
RES=${1:-/root/res}
OUT=${2:-${OUT:?no OUT folder}}
tar -czf - -C "$RES" --exclude='*.safetensors' --exclude='ray-work' --exclude='banks' --exclude='store*' \
  --exclude='users' --exclude='*.out' . | split -b 15M -d - "$OUT/res.tgz."
n=$(ls "$OUT"/res.tgz.* | wc -l)
if [ "$n" -gt 8 ]; then
  echo "warning: $n pieces; only 8 files come back: pack less (e.g. without predictions)" >&2
fi
ls -la "$OUT"
