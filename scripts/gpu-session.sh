#!/usr/bin/env bash
# One GPU session, run in the background on a 2-GPU machine (one GPU also works: set
# GPUS=0) while the real models' pieces are still being carried there. Each step's log
# goes to RES/<step>.log and a line per start/end to RES/progress; a step that fails does
# not stop the others. Phases:
#   1. no real weights needed: the `gpu` tests, transformers' decode fast paths and the
#      engine's compiled path, sharded adaptation on Ray (two GPUs), `mta serve` under load
#      (SERVE_LOAD=1), at Llama-3-8B shape with random weights;
#   2. meanwhile, on the CPUs, as the pieces become whole (marker files MODELS/<name>.ok,
#      written by the carrying calls after their sha256 check): convert the models;
#   3. two streams, one per GPU: Qwen2.5-Coder-1.5B (mta tune, LaMP-2 and MovieLens
#      evals with the tuned recipe) and Qwen2.5-Coder-0.5B (the same).
#
#   setsid nohup bash scripts/gpu-session.sh > /root/res/session.log 2>&1 &
#
# Durations seen on the H200 (2026-11-29): model pieces ~3.5 min; conversions ~2 min (in
# the background); gpu tests 47 s; hf_decode ~5.5 min; serve load 9 min; mta run 1.5B
# 1.8 min; a tune trial ~37 s with 0.5B (the quick space is 12 trials + a final
# ablation: ~10 min; about twice that with 1.5B); per-user LoRAs for 80 users with 1.5B
# ~100 s per fold. RUN_15B=run adds `mta run` with 1.5B to its stream.
#
# How the 2026-11-29 session got everything there (each a device call, issued back to back,
# since a machine idle for 30 s is given back): (1) carry .whl/ (pip download of gguf,
# bm25s, nltk, rouge_score, pydantic(+core), fastapi, starlette, uvicorn, httpx2, httpcore2,
# truststore, jsonschema(+specifications), referencing, rpds-py, opentelemetry-api for
# cp312 manylinux) and install with `pip install --no-index --no-deps --target /root/site`;
# (2) the ray cp312 wheel split in two 40 MB pieces (gpu/r/), joined, sha256-checked and
# installed the same way; copy src/ scripts/ benchmarks/ tests/ pyproject.toml and
# gpu/data/ to /root/work and start this script there; (3) one call per 58 MiB piece of the
# GGUFs / the MiniLM tar (gpu/p/, `split -b 58M`), appended under /root/m, the last piece
# of each checked against the registry's sha256 before touching MODELS/<name>.ok. About
# 3.5 minutes of device time for 32 calls. Keep every step's limit above its worst case:
# a step killed by its limit loses its whole result.
set -uo pipefail
RES=${RES:-/root/res}
MODELS=${MODELS:-/root/m}
GPUS=${GPUS:-0,1}
mkdir -p "$RES"
export PYTHONPATH=${SITE:-/root/site}:$PWD/src MTA_HOME=${MTA_HOME:-/root/mtahome} RAY_AUTH_MODE=disabled \
  PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpu_a=${GPUS%%,*}
gpu_b=${GPUS##*,}

step() {  # [T=SECONDS] step NAME GPU COMMAND...: run one step, logged, killed after T s (default 1800)
  local name=$1 gpu=$2
  shift 2
  echo "$(date +%T) start $name" >> "$RES/progress"
  CUDA_VISIBLE_DEVICES=$gpu timeout "${T:-1800}" "$@" > "$RES/$name.log" 2>&1
  local rc=$?  # before $(date), which would reset it
  echo "$(date +%T) end $name rc=$rc" >> "$RES/progress"
}

wait_for() {  # wait_for NAME: until the carrying calls have marked NAME whole
  until [ -e "$MODELS/$1.ok" ]; do sleep 2; done
}

convert() {  # convert REGISTRY_NAME SOURCE
  step "fetch-$1" "" python3 -m mta models fetch "$1" --from "$2"
}

# -- phase 2 starts first, on the CPUs: the real models, converted as their pieces become whole -------
(wait_for minilm && convert minilm-l6 "$MODELS/minilm-l6") &
(wait_for q5 && convert qwen2.5-coder-0.5b "$MODELS/q5.gguf") &
(wait_for q15 && convert qwen2.5-coder-1.5b "$MODELS/q15.gguf") &

# -- phase 1: random weights ------------------------------------------------------------------------
phase1_a() {
  T=300 step gpu-tests "$gpu_a" python3 -m pytest -m gpu tests/test_gpu.py -s -q -p no:cacheprovider
  T=480 step hf-decode-8b "$gpu_a" python3 benchmarks/hf_decode.py --out "$RES/hf-decode-8b.json"
}
phase1_b() {
  [ "${SERVE_LOAD:-0}" = 1 ] || return 0  # measured 2026-11-29 (docs/serving.md): SERVE_LOAD=1 to repeat
  T=1200 step serve-load-8b "$gpu_b" python3 benchmarks/serve_load.py --model random-llama3-8b --embedder hashing-embedder \
    --device cuda --clients 16 --users 16 --requests 200 --max-tokens 16 --work "$RES/serve-work" \
    --out "$RES/serve-load-8b.json"
}
phase1_a &
pa=$!
phase1_b &
pb=$!
wait $pa $pb
if [ "$gpu_a" != "$gpu_b" ]; then  # one worker per GPU: it needs two
  T=600 step ray-adapt-8b "$GPUS" python3 benchmarks/ray_adapt.py --model random-llama3-8b --device cuda --users 128 \
    --users-per-pass 16 --anchors 4 --workers 1,2 --work "$RES/ray-work" --out "$RES/ray-adapt-8b.json"
fi

wait  # the conversions

# -- phase 3: the evaluations -------------------------------------------------------------------------
stream() {  # stream GPU MODEL [run]
  local gpu=$1 model=$2 recipe=$RES/tune-lamp2-$2/recipe.json
  [ "${3:-}" = run ] && step "run-$model" "$gpu" bash scripts/gpu-evals.sh run "$model" "$RES"
  step "tune-$model" "$gpu" bash scripts/gpu-evals.sh tune "$model" "$RES" --space quick
  local with=()
  [ -e "$recipe" ] && with=(--recipe "$recipe")
  step "lamp2-$model" "$gpu" bash scripts/gpu-evals.sh lamp2 "$model" "$RES" --history-queries 3 "${with[@]}"
  step "movielens-$model" "$gpu" bash scripts/gpu-evals.sh movielens "$model" "$RES" "${with[@]}"
}
stream "$gpu_a" qwen2.5-coder-1.5b "${RUN_15B:-}" &
stream "$gpu_b" qwen2.5-coder-0.5b &
wait
echo "$(date +%T) session done" >> "$RES/progress"
