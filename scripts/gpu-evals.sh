#!/usr/bin/env bash
# The GPU runs behind docs/results.md (real models) and the --device cuda checks of
# docs/architecture.md. Each step writes its run directory under OUTROOT and packs the
# files worth keeping (no adapters) into OUTROOT/<run>.tgz.
#
#   bash scripts/gpu-evals.sh smoke OUTROOT            tiny model: run + every eval method on CUDA
#   bash scripts/gpu-evals.sh run MODEL OUTROOT        mta run on the 72 LaMP-2 users
#   bash scripts/gpu-evals.sh lamp2 MODEL OUTROOT [ARGS]      every method, the 72 LaMP-2 users
#   bash scripts/gpu-evals.sh tune MODEL OUTROOT [ARGS]       mta tune on LaMP-2 dev persons
#   bash scripts/gpu-evals.sh movielens MODEL OUTROOT [ARGS]  every method, 160 MovieLens users
#   bash scripts/gpu-evals.sh tune-movielens MODEL OUTROOT [ARGS]  mta tune on MovieLens dev persons
#   bash scripts/gpu-evals.sh lastfm MODEL OUTROOT [ARGS]     every method, the Last.fm users
#   bash scripts/gpu-evals.sh tune-lastfm MODEL OUTROOT [ARGS]  mta tune on Last.fm dev persons
#
# ARGS go to mta as they are: e.g. the equal budgets of docs/results.md (2026-12-04) are
# `--bank-base task --fusion-weights searched --user-steps 16 --oppu-steps 16 --stack-steps 16`,
# a tune's recipe `--recipe OUTROOT/tune-lamp2-MODEL/recipe.json`. A tune packs its
# trial-values.json: unpacked into the same OUT, `mta tune` goes on where it stopped.
#
# DATA (default gpu/data) holds lamp2_users.json (../shared/data/lamp2m_movie_tagging_72users/
# users.json), movielens_users.jsonl (`mta data movielens --queries 3 --max-users 160` on
# ../shared/data/movielens_ml-latest-small_2016) and lastfm_users.jsonl (`mta data lastfm --dir
# ../shared/data/lastfm_hetrec2011`). MTA (default `python3 -m mta`) is the CLI.
set -euo pipefail
MTA=${MTA:-python3 -m mta}
DATA=${DATA:-gpu/data}
DEVICE=${DEVICE:-cuda}
step=$1
shift

pack() {  # pack RUN_DIR: the run's records, not its adapters
  local run=$1
  tar -czf "$run.tgz" -C "$(dirname "$run")" \
    $(cd "$(dirname "$run")" && ls -d "$(basename "$run")"/{config.json,metrics.json,results.md,predictions.jsonl,split.json,recipe.json,trial-values.json,run.log,*.png} 2>/dev/null)
}

case "$step" in
  smoke)
    out=$1
    $MTA data synth --out "$out/synth" --users 12 --queries 1
    tiny=(--model tiny-random-llama --embedder hashing-embedder --device "$DEVICE" --anchors 2)
    $MTA run --data "$out/synth" --out "$out/tiny-run" "${tiny[@]}"
    $MTA eval --data "$out/synth" --out "$out/tiny-eval" --methods all "${tiny[@]}"
    pack "$out/tiny-run"; pack "$out/tiny-eval" ;;
  run)
    model=$1 out=$2
    $MTA run --data "$DATA/lamp2_users.json" --out "$out/run-lamp2-$model" --model "$model" --device "$DEVICE" \
      --anchors 8 --batch-size 64
    pack "$out/run-lamp2-$model" ;;
  lamp2|tune|movielens|tune-movielens|lastfm|tune-lastfm)
    model=$1 out=$2
    shift 2
    # each data set's protocol: LaMP-2 with 3 history items as extra queries; MovieLens and
    # Last.fm targets keep their first 10 items, anchors need 20 and train on their latest 40
    case "$step" in
      lamp2|tune) name=lamp2 file=lamp2_users.json proto=(--history-queries 3) ;;
      *) name=${step#tune-} file=${step#tune-}_users.jsonl
         proto=(--target-history 10 --min-history 20 --anchor-items 40) ;;
    esac
    common=(--data "$DATA/$file" --model "$model" --device "$DEVICE" --anchors 8 --batch-size 64 "${proto[@]}")
    if [ "${step%%-*}" = tune ]; then
      run="$out/tune-$name-$model"
      $MTA tune "${common[@]}" --out "$run" "$@"
    else
      run="$out/$name-$model"
      $MTA eval "${common[@]}" --methods all,user-prior,item-prior --out "$run" "$@"
    fi
    pack "$run" ;;
  *)
    echo "unknown step $step (smoke, run, lamp2, tune, movielens, tune-movielens, lastfm, tune-lastfm)" >&2
    exit 2 ;;
esac
