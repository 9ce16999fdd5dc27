#!/usr/bin/env bash
# Choosing mta's defaults on DEVELOPMENT data only (never on the users docs/results.md
# reports): synthetic users (seed 7) and MovieLens users 1-40 (the reported MovieLens
# run uses users after them). Each configuration is one `mta eval` run; the summary
# table is printed by scripts/dev-summary.py. See docs/defaults.md for the outcome.
#
#   bash scripts/dev-sweep.sh bank     # bank / per-user LoRA learning rate (1 epoch)
#   bash scripts/dev-sweep.sh stack    # stacked adapter: lr, rank, layers
set -euo pipefail
cd "$(dirname "$0")/.."
MTA=.venv/bin/mta
DEV=${DEV:-runs/dev}
SHARED=${SHARED:-../shared/data}
mkdir -p "$DEV"
[ -f "$DEV/synth/users.jsonl" ] || $MTA data synth --out "$DEV/synth" --users 32 --seed 7 --queries 2
common=(--data "$DEV/synth/users.jsonl" --anchors 4 --seed 0 --n-boot 200)
case "${1:-}" in
  bank)
    for lr in 1e-4 1e-3 3e-3 1e-2; do
      $MTA eval "${common[@]}" --methods rag-1,per-user-lora,mta-fusion --bank-epochs 1 --bank-lr "$lr" \
        --out "$DEV/bank-lr$lr"
    done ;;
  *) echo "usage: $0 bank|stack" >&2; exit 2 ;;
esac
