#!/usr/bin/env bash
# Regenerates tests/data/tiny/NAME.llamacpp.json: llama.cpp's numerics (greedy ids and top
# log-probabilities through llama-server) on each tiny random model that
# `wick_runner::testing` writes (the tokenizer taken from the default model). The test
# (tests/tiny_models.rs) regenerates the same files and checks their sha256 against these.
# Needs llama-server: scripts/build-llama.sh builds it (LLAMA_SERVER to use another). CI does not run this; the JSON files are committed.
set -euo pipefail
cd "$(dirname "$0")/../../.."
SERVER=${LLAMA_SERVER:-$(scripts/build-llama.sh | tail -1)/llama-server}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cargo run --release -q -p wick-runner --features testing --example tiny_models -- "$(scripts/fetch-model.sh)" "$OUT"
for g in "$OUT"/*.gguf; do
  name=$(basename "$g" .gguf)
  scripts/make-reference.py "$SERVER" "$g" tests/data/tiny/prompts.json "tests/data/tiny/$name.llamacpp.json"
done
