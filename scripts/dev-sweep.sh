#!/usr/bin/env bash
# Choosing mta's defaults on DEVELOPMENT data only: synthetic users (seed 7), never the
# LaMP-2 or MovieLens users that docs/results.md reports. Each configuration is one
# `mta eval` run (SmolLM2-135M, fp32, CPU); `python scripts/dev-summary.py DIR` prints
# the table that docs/defaults.md records.
#
#   bash scripts/dev-sweep.sh lr       # one learning rate for bank/per-user LoRA and stack
#   bash scripts/dev-sweep.sh layers   # stack in all blocks vs the last 8 (at LR)
set -euo pipefail
cd "$(dirname "$0")/.."
MTA=.venv/bin/mta
DEV=${DEV:-runs/dev}
LR=${LR:-1e-3}
mkdir -p "$DEV"
[ -f "$DEV/synth/users.jsonl" ] || $MTA data synth --out "$DEV/synth" --users 24 --seed 7 --queries 2
common=(--data "$DEV/synth/users.jsonl" --anchors 3 --seed 0 --n-boot 1000 --bank-epochs 1 --stack-epochs 1)
case "${1:-}" in
  lr)
    for lr in 1e-4 1e-3 3e-3; do
      $MTA eval "${common[@]}" --methods rag-1,per-user-lora,mta-fusion,mta-stack,mta --bank-lr "$lr" \
        --stack-lr "$lr" --stack-layers 30 --out "$DEV/lr$lr"
    done ;;
  layers)
    $MTA eval "${common[@]}" --methods rag-1,mta-stack,mta --bank-lr "$LR" --stack-lr "$LR" --stack-layers 8 \
      --out "$DEV/layers8-lr$LR" ;;
  *) echo "usage: $0 lr|layers" >&2; exit 2 ;;
esac
