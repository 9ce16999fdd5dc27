#!/usr/bin/env bash
# The GPU benchmarks behind docs/performance.md and docs/serving.md, one after another on
# one quiet GPU (never beside model jobs: the numbers are ratios within a run). Each writes
# OUT/NAME.json and OUT/NAME.log. Needs `make setup` (or the pinned packages) and CUDA.
#
#   bash scripts/gpu-benchmarks.sh OUT [STEP...]
#
# STEPs (default: all but ray-adapt): gpu-tests, dense-mix, gpu-8b, join-8b, serve-load,
# hf-decode, ray-adapt (two GPUs or more).
set -uo pipefail
out=${1:?usage: gpu-benchmarks.sh OUT [STEP...]}
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gpu-tests dense-mix gpu-8b join-8b serve-load hf-decode)
PY=${PY:-python3}
mkdir -p "$out"
run() {  # run NAME SECONDS COMMAND...: logged, killed after SECONDS
  local name=$1 t=$2
  shift 2
  echo "$(date +%T) start $name"
  timeout "$t" "$@" > "$out/$name.log" 2>&1
  echo "$(date +%T) end $name rc=$?"
}
for s in "${steps[@]}"; do
  case "$s" in
    gpu-tests) run gpu-tests 300 $PY -m pytest -m gpu tests/test_gpu.py -s -q -p no:cacheprovider ;;
    # the Triton dense-mix kernel against the torch ops it replaces, at the 8B decode shapes
    dense-mix) run dense-mix 180 $PY benchmarks/dense_mix.py --out "$out/dense-mix.json" ;;
    # every speed target at Llama-3-8B shape in one run, decode compiled; the kernel beside torch's ops
    gpu-8b) run gpu-8b 1800 $PY benchmarks/gpu.py --compile --kernel-compare --warm-compile --profile \
      --sections gen,bank,adapt,memory,adapt-last8,bank-compiled,adapt-compiled,adapt-last8-compiled \
      --out "$out/gpu-8b.json" ;;
    # one join of the server's loop at 8B, by part: repeated requests prefilled (dense, gathered) and fed,
    # after a stack load (the tables caught up against refilled whole), users' first requests of 256 tokens
    join-8b) run join-8b 600 $PY benchmarks/join.py --shape 8b --device cuda --first-prompt 256 \
      --out "$out/join-8b.json" ;;
    # the server under open-loop load at 8B (64 users, 64 new tokens), mta-base the yardstick: arrivals
    # faster than it drains them (its capacity at 64 rows), then a moderate rate (latency); the eager loop
    # at a rate it can follow. The byte tokenizer's random text: ITL from the server's own histograms
    serve-load)
      sl=(--model random-llama3-8b --embedder hashing-embedder --device cuda --clients 64 --users 64
          --max-tokens 64 --work "$out/sl" --server-arg=--max-tokens --server-arg=128)
      run serve-load-sat 900 $PY benchmarks/serve_load.py "${sl[@]}" --rate 256 --requests 1000 \
        --decoder compiled,compiled-async --out "$out/serve-load-sat.json"
      # the same after each user's first request (stacks resident, prefixes cached): the joins' share
      run serve-load-warm 900 $PY benchmarks/serve_load.py "${sl[@]}" --rate 256 --requests 1000 \
        --decoder compiled-async --warm-users --out "$out/serve-load-warm.json"
      run serve-load-32 600 $PY benchmarks/serve_load.py "${sl[@]}" --rate 32 --requests 600 --decoder compiled \
        --out "$out/serve-load-32.json"
      run serve-load-eager 900 $PY benchmarks/serve_load.py "${sl[@]}" --rate 2 --requests 120 --decoder generate \
        --out "$out/serve-load-eager.json" ;;
    hf-decode) run hf-decode 600 $PY benchmarks/hf_decode.py --sections parts --out "$out/hf-decode.json" ;;
    ray-adapt) run ray-adapt 600 $PY benchmarks/ray_adapt.py --model random-llama3-8b --device cuda --users 128 \
      --users-per-pass 16 --anchors 4 --workers 1,2 --work "$out/ray-work" --out "$out/ray-adapt.json" ;;
    *) echo "unknown step $s (gpu-tests, dense-mix, gpu-8b, join-8b, serve-load, hf-decode, ray-adapt)" >&2
       exit 2 ;;
  esac
done
