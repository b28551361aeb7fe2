#!/usr/bin/env bash
# The default model re-quantized by llama.cpp's llama-quantize to every weight type Wick
# loads, each checked against llama.cpp's own numerics on that file (the model-families
# issue's teacher-forced bounds). Outside CI: it needs llama.cpp (built by
# scripts/build-llama.sh, about 10 minutes once).
#   scripts/requant-check.sh            quantize (cached), record references, run the test
#   REFERENCES=0 scripts/requant-check.sh   use the committed tests/data/requant references
# The re-quantized files live in $WICK_CACHE/requant (llama-quantize is deterministic, so
# they match the committed references' sha256).
set -euo pipefail
cd "$(dirname "$0")/.."
TYPES=${TYPES:-"Q4_0 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K F16 BF16"}
SERVER=${LLAMA_SERVER:-$(scripts/build-llama.sh | tail -1)/llama-server}
QUANTIZE=$(dirname "$SERVER")/llama-quantize
SRC=$(scripts/fetch-model.sh)
DIR=${WICK_CACHE:-$HOME/.cache/wick}/requant
mkdir -p "$DIR"
for t in $TYPES; do
  out="$DIR/smollm2-135m-$t.gguf"
  [ -f "$out" ] || "$QUANTIZE" --allow-requantize "$SRC" "$out" "$t" >/dev/null 2>&1
  if [ "${REFERENCES:-1}" = 1 ]; then
    scripts/make-reference.py "$SERVER" "$out" \
      tests/data/requant/prompts.json "tests/data/requant/smollm2-135m-$t.llamacpp.json" 2>/dev/null
  fi
done
WICK_REQUANT_DIR=$DIR cargo test --release -p wick --test requant -- --ignored --nocapture
