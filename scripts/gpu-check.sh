#!/usr/bin/env bash
# The GPU check (issues 7 and 15), meant for the GPU machine: no Rust toolchain, no network,
# CUDA 13, Python with torch, transformers and safetensors. It needs, carried from the build
# machine (`make gpu-check-bundle` puts them under target/gpu-check/, about 40 MB):
#   $WICK_BIN       the CUDA binary with the developer tools (`--features cuda,dev`), gzipped
#   $TOKENIZER_DIR  tokenizer.json + tokenizer_config.json + tokenizer.gguf
#   $KQUANT         a tiny random Llama quantized by llama.cpp's llama-quantize to Q4_K_M
#
# Steps: (1) write a random-weight Llama of a realistic size (default 1b) in the Hugging Face
# layout; (2) `wick parity`: log-probabilities on CUDA against the CPU on the same weights, in
# f32 (gate: within 0.05 nats at 99% of steps) and in bf16 (reported), then on the K-quant
# GGUF (gated) and the tiny models of every family; (3) for the 1B Llama and the K-quant
# model: serve on CUDA, batch invariance (32 greedy requests alone, then together: gate
# 32/32), the load generator at concurrency 1, 16 and 64, and `wick step-profile` (decode
# step time at batch 1, 16, 64 by phase); (4) transformers' `generate` on the 1B model and
# the same batch sizes, for the ratio. Prints every figure; exit 1 if a gate fails. Each
# step has a time limit, so that the whole stays under 10 minutes.
#
# Locally (CPU smoke test of the script itself): DEVICE=cpu SIZE=tiny CONCURRENCY="1 4"
# scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

WICK_BIN=${WICK_BIN:-target/gpu-check/wick}
TOKENIZER_DIR=${TOKENIZER_DIR:-target/gpu-check/tokenizer}
KQUANT=${KQUANT:-target/gpu-check/kquant-q4_k_m.gguf}
INVARIANCE=${INVARIANCE:-32}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1b}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
MAX_TOKENS=${MAX_TOKENS:-128}
PORT=${PORT:-18080}
WORK=${WORK:-/tmp/wick-gpu-check}
PY=${PYTHON:-python3}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
MODEL_DIR="$WORK/model-$SIZE"
status=0
say() { printf '\n== %s\n' "$*"; }

if [ ! -x "$WICK_BIN" ] && [ -f "$WICK_BIN.gz" ]; then
  gunzip -c "$WICK_BIN.gz" >"$WORK/wick" && chmod +x "$WORK/wick" && WICK_BIN="$WORK/wick"
fi
[ -x "$WICK_BIN" ] || { echo "no executable at WICK_BIN=$WICK_BIN" >&2; exit 2; }
"$WICK_BIN" parity --help >/dev/null 2>&1 || {
  echo "$WICK_BIN has no developer tools: build it with --features cuda,dev (make gpu-check-bundle)" >&2
  exit 2
}
# The wheels' CUDA libraries (torch's cuBLAS, cuRAND, NVRTC) when the system has none.
if [ "$DEVICE" = cuda ]; then
  extra=$("$PY" - <<'PYEOF' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for lib in glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True):
        dirs.add(lib)
print(":".join(sorted(dirs)))
PYEOF
)
  export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  missing=$(ldd "$WICK_BIN" | grep "not found" || true)
  [ -z "$missing" ] || { echo "missing libraries:"; echo "$missing"; }
fi

say "model: random Llama, size $SIZE"
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  "$PY" scripts/gpu/make_model.py --out "$MODEL_DIR" --tokenizer "$TOKENIZER_DIR" --size "$SIZE" || exit 2
fi

say "parity: $DEVICE f32 against cpu f32 (gate: |dlogp| <= 0.05 at 99% of steps)"
if ! "$WICK_BIN" parity --model "$MODEL_DIR" --device "$DEVICE" --dtype f32 --prompts 8 --tokens 32 \
    | tee "$OUT/parity-f32.json"; then
  status=1
fi
say "parity: $DEVICE bf16 against cpu f32 (reported, not gated)"
"$WICK_BIN" parity --model "$MODEL_DIR" --device "$DEVICE" --dtype bf16 --prompts 8 --tokens 32 \
  --min-within 0 | tee "$OUT/parity-bf16.json"

say "parity: K-quant mix (llama-quantize Q4_K_M) on $DEVICE against cpu (gated)"
if [ -f "$KQUANT" ]; then
  timeout 300 "$WICK_BIN" parity --model "$KQUANT" --device "$DEVICE" --prompts 8 --tokens 32 \
    | tee "$OUT/parity-kquant.json" || status=1
else
  echo "no $KQUANT: skipped (make gpu-check-bundle writes it)"
fi

say "families: tiny random models of every family on $DEVICE against cpu"
# The Hugging Face twins (dense f32, the same weights on both devices) are gated like the
# Llama above; the GGUF files (quantized kernels on each device, different activation
# rounding) are reported.
if [ -f "$TOKENIZER_DIR/tokenizer.gguf" ]; then
  "$WICK_BIN" tiny-models --tokenizer "$TOKENIZER_DIR/tokenizer.gguf" --out "$WORK/tiny" >/dev/null || status=1
  for g in "$WORK"/tiny/*.gguf; do
    name=$(basename "$g" .gguf)
    echo "-- $name (GGUF, reported)"
    "$WICK_BIN" parity --model "$g" --device "$DEVICE" --prompts 4 --tokens 16 --min-within 0 \
      >"$OUT/tiny-$name-gguf.json" && cat "$OUT/tiny-$name-gguf.json"
    echo "-- $name (Hugging Face twin, f32, gated)"
    "$WICK_BIN" parity --model "$WORK/tiny/$name-hf" --device "$DEVICE" --dtype f32 --prompts 4 --tokens 16 \
      >"$OUT/tiny-$name-hf.json" || status=1
    cat "$OUT/tiny-$name-hf.json"
  done
else
  echo "no $TOKENIZER_DIR/tokenizer.gguf: skipped (make gpu-check-bundle writes it)"
fi

# Serves $1 as $2 (its dtype $3: auto or f32) and runs, against it, the invariance check, the
# load generator at every concurrency, then the step profile.
serve_and_measure() {
  local model=$1 name=$2 dtype=$3
  say "$name on $DEVICE: invariance ($INVARIANCE greedy requests), load generator at concurrency $CONCURRENCY, $MAX_TOKENS output tokens"
  "$WICK_BIN" serve --model "$model" --device "$DEVICE" --dtype "$dtype" --port "$PORT" \
    --max-num-seqs "$max_c" --max-num-batched-tokens 4096 --kv-cache-memory 8GiB \
    --served-model-name gpu-check --log-level warn &
  server=$!
  for _ in $(seq 1 600); do
    curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { echo "wick exited during start-up" >&2; status=1; return; }
    sleep 0.5
  done
  timeout 180 "$PY" scripts/gpu/invariance.py --url "http://127.0.0.1:$PORT" \
    --requests "$INVARIANCE" --max-tokens 64 | tee "$OUT/invariance-$name.json" || status=1
  for c in $CONCURRENCY; do
    n=$(( c < 4 ? 8 : c * 2 ))
    timeout 180 "$WICK_BIN" bench --url "http://127.0.0.1:$PORT" --concurrency "$c" --requests "$n" \
      --max-tokens "$MAX_TOKENS" --quiet --json "$OUT/bench-$name-c$c.json" || status=1
  done
  kill -TERM $server; wait $server 2>/dev/null
  say "$name on $DEVICE: decode step profile (context 512)"
  timeout 180 "$WICK_BIN" step-profile --model "$model" --device "$DEVICE" --dtype "$dtype" \
    --batches "$(echo $CONCURRENCY | tr ' ' ',')" --context 512 --steps 16 \
    | tee "$OUT/profile-$name.jsonl" || status=1
}

max_c=$(echo "$CONCURRENCY" | tr ' ' '\n' | sort -n | tail -1)
trap 'kill $server 2>/dev/null' EXIT
serve_and_measure "$MODEL_DIR" llama auto
[ -f "$KQUANT" ] && serve_and_measure "$KQUANT" kquant auto

say "reference: transformers generate, same model, batch sizes $CONCURRENCY"
if "$PY" -c "import torch, transformers" 2>/dev/null; then
  "$PY" scripts/gpu/hf_generate.py --model "$MODEL_DIR" --batches "$(echo $CONCURRENCY | tr ' ' ',')" \
    --new-tokens "$MAX_TOKENS" | tee "$OUT/transformers.jsonl"
else
  echo "torch/transformers not installed: no reference" | tee "$OUT/transformers.jsonl"
fi

say "summary"
"$PY" - "$OUT" $CONCURRENCY <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
ref = {}
for line in (out / "transformers.jsonl").read_text().splitlines():
    try:
        r = json.loads(line)
        ref[r["batch"]] = r["output_tokens_per_s"]
    except Exception:
        pass
for name in ("parity-f32", "parity-bf16", "parity-kquant"):
    if not (out / f"{name}.json").exists():
        continue
    p = json.loads((out / f"{name}.json").read_text())
    print(f"{name}: within 0.05 nats {p['within_tolerance']*100:.1f}%, mean {p['mean_abs_dlogp']:.4f}, "
          f"max {p['max_abs_dlogp']:.4f}, argmax {p['argmax_agreement']*100:.1f}%, pass {p['pass']}")
for name in ("llama", "kquant"):
    inv = out / f"invariance-{name}.json"
    if inv.exists() and inv.read_text().strip():
        r = json.loads(inv.read_text())
        print(f"{name}: batch invariance {r['identical']}/{r['requests']}")
    print(f"{name}: {'clients':>7} {'wick out tok/s':>15} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'errors':>6} {'transformers tok/s':>19} {'ratio':>6}")
    for c in sys.argv[2:]:
        f = out / f"bench-{name}-c{c}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())[0]
        t = ref.get(int(c)) if name == "llama" else None
        ratio = f"{r['output_tokens_per_s'] / t:.2f}" if t else "-"
        print(f"{name}: {c:>7} {r['output_tokens_per_s']:>15.1f} {r['ttft_ms']['p50']:>12.1f} {r['itl_ms']['p50']:>11.1f} "
              f"{r['errors']:>6} {t if t else '-':>19} {ratio:>6}")
    prof = out / f"profile-{name}.jsonl"
    if prof.exists():
        for line in prof.read_text().splitlines():
            try:
                r = json.loads(line)
            except Exception:
                continue
            p = r["profiled_ms_per_step"]
            print(f"{name}: batch {r['batch']:>3}: {r['step_ms']:.2f} ms/step, {r['tokens_per_s']:.0f} tok/s; profiled ms: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
PYEOF
exit $status
