#!/usr/bin/env bash
# Side by side: llama.cpp's llama-server and Wick on the same GGUF, same threads and
# parallelism, the same load from `wick bench`, alternating, several rounds. Prints each
# figure (median over rounds) and the ratio Wick / llama.cpp. The loads: REQUESTS short chats
# at each CONCURRENCY; cold prefill of 8 ~700-token prompts one at a time; and long context:
# LONG_CLIENTS clients, each with its own ~2,000-token prompt (no shared prefix), LONG_TOKENS
# output tokens. llama-server gets a context per slot that holds them (SLOT_CONTEXT, 4096:
# -c 65536 with 16 slots); Wick runs at its default settings but for --max-num-seqs.
#
#   benches/compare-llamacpp.sh            # defaults below
#   ROUNDS=3 REQUESTS=32 MAX_TOKENS=128 CONCURRENCY="1 16" benches/compare-llamacpp.sh
#   MODEL=qwen benches/compare-llamacpp.sh             # a test model (scripts/fetch-model.sh)
#   MODEL=gemma ENDPOINT=completions benches/...       # a base model: plain completions
#   MODEL=/path/to/file.gguf benches/compare-llamacpp.sh
#
# llama-server comes from scripts/build-llama.sh (built once, ~10 min; AMX off), or from
# $LLAMA_SERVER when set.
#
# Before/after a change: BASELINE_WICK=/path/to/old/wick puts an older Wick build (served
# the same way as Wick) in llama-server's place, and WICK_BIN a prebuilt Wick in place of
# this checkout's; the columns are then "baseline" and "wick".
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-32}
MAX_TOKENS=${MAX_TOKENS:-128}
CONCURRENCY=${CONCURRENCY:-"1 16"}
PARALLEL=${PARALLEL:-16}
THREADS=${THREADS:-$(nproc)}
SLOT_CONTEXT=${SLOT_CONTEXT:-4096}
LONG_CLIENTS=${LONG_CLIENTS:-16}
LONG_TOKENS=${LONG_TOKENS:-128}
LONG_WORDS=${LONG_WORDS:-1800}
OUT=${OUT:-target/compare}
mkdir -p "$OUT"

ENDPOINT=${ENDPOINT:-chat}
case "${MODEL:-default}" in
  */*|*.gguf) ;;
  *) MODEL=$(scripts/fetch-model.sh "${MODEL:-default}") ;;
esac
echo "model: $MODEL, endpoint: $ENDPOINT" >&2
if [ -z "${WICK_BIN:-}" ]; then
  cargo build --release -q --features dev --bin wick
fi
WICK=${WICK_BIN:-target/release/wick}
PEER=llama.cpp
if [ -n "${BASELINE_WICK:-}" ]; then
  PEER=baseline
else
  LLAMA=${LLAMA_SERVER:-$(scripts/build-llama.sh | tail -n 1)/llama-server}
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_healthy() {
  for _ in $(seq 1 600); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not become healthy" >&2; return 1
}

P1=$(free_port); P2=$(free_port)
if [ "$PEER" = baseline ]; then
  "$BASELINE_WICK" serve --model "$MODEL" --port "$P1" --served-model-name model \
    --max-num-seqs "$PARALLEL" >"$OUT/baseline.log" 2>&1 &
else
  "$LLAMA" -m "$MODEL" --host 127.0.0.1 --port "$P1" -t "$THREADS" -np "$PARALLEL" \
    -c $((PARALLEL * SLOT_CONTEXT)) --alias model >"$OUT/llama-server.log" 2>&1 &
fi
LPID=$!
"$WICK" serve --model "$MODEL" --port "$P2" --served-model-name model \
  --max-num-seqs "$PARALLEL" >"$OUT/wick.log" 2>&1 &
WPID=$!
trap 'kill $LPID $WPID 2>/dev/null || true' EXIT
wait_healthy "http://127.0.0.1:$P1"
wait_healthy "http://127.0.0.1:$P2"

# Long prompts for cold prefill, different in every round and request from their first
# words (no prefix-cache hit on either server).
long_prompts() { # round -> file
  python3 - "$OUT/long-prompts-r$1.txt" "$1" <<'PY'
import sys
words = "river stone lantern harbor meadow engine violin glacier canyon orchard".split()
with open(sys.argv[1], "w") as f:
    for i in range(8):
        body = " ".join(words[(i * 3 + j) % len(words)] for j in range(400))
        f.write(f"Round {sys.argv[2]} request {i}: summarize this text. {body}\n")
PY
}

# ~2,000-token prompts, one per client, each its own shuffle of the words from the first
# block on (a prefix-cache hit on neither server), new in every round.
context_prompts() { # round -> file
  python3 - "$OUT/context-prompts-r$1.txt" "$1" "$LONG_CLIENTS" "$LONG_WORDS" <<'PY'
import random, sys
path, tag, n, words_per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
words = ("river stone lantern harbor meadow engine violin glacier canyon orchard copper "
         "falcon willow thunder marble saddle quartz ember prairie beacon").split()
rng = random.Random(tag)
with open(path, "w") as f:
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(words_per))
        f.write(f"{rng.randrange(10**9)} {tag} {i}: {body}. Summarize the text above.\n")
PY
}

run() { # name url concurrency requests max_tokens extra... -> JSON file
  local name=$1 url=$2 c=$3 n=$4 mt=$5; shift 5
  "$WICK" bench --quiet --url "$url" --model model --endpoint "$ENDPOINT" --requests "$n" \
    --concurrency "$c" --max-tokens "$mt" --json "$OUT/$name.json" "$@" >/dev/null
}

for round in $(seq 1 "$ROUNDS"); do
  for server in llama wick; do
    url=http://127.0.0.1:$P1; [ "$server" = wick ] && url=http://127.0.0.1:$P2
    for c in $CONCURRENCY; do
      run "$server-c$c-r$round" "$url" "$c" "$REQUESTS" "$MAX_TOKENS"
    done
    long_prompts "$round-$server"
    run "$server-prefill-r$round" "$url" 1 8 1 --prompts "$OUT/long-prompts-r$round-$server.txt"
    context_prompts "$round-$server"
    run "$server-context-r$round" "$url" "$LONG_CLIENTS" "$LONG_CLIENTS" "$LONG_TOKENS" \
      --prompts "$OUT/context-prompts-r$round-$server.txt"
  done
  echo "round $round done" >&2
done

python3 - "$OUT" "$ROUNDS" "$CONCURRENCY" "$PEER" <<'PY'
import json, statistics, sys
out, rounds, levels, peer = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
def med(name, key):
    vals = []
    for r in range(1, rounds + 1):
        rep = json.load(open(f"{out}/{name}-r{r}.json"))[0]
        v = rep
        for k in key.split("."):
            v = v[k]
        vals.append(v)
    return statistics.median(vals)
rows = []
for c in levels:
    for label, key in [("output tokens/s", "output_tokens_per_s"), ("total tokens/s", "total_tokens_per_s"),
                       ("TTFT p50 ms", "ttft_ms.p50"), ("ITL p50 ms", "itl_ms.p50"), ("ITL p99 ms", "itl_ms.p99"),
                       ("errors", "errors")]:
        rows.append((f"c={c} {label}", med(f"llama-c{c}", key), med(f"wick-c{c}", key)))
# Cold prefill: prompt tokens / TTFT, one request at a time.
def prefill(name):
    vals = []
    for r in range(1, rounds + 1):
        rep = json.load(open(f"{out}/{name}-prefill-r{r}.json"))[0]
        tokens = rep["total_tokens_per_s"] * rep["duration_s"] - rep["output_tokens"]
        vals.append(tokens / rep["requests"] / (rep["ttft_ms"]["p50"] / 1000))
    return statistics.median(vals)
rows.append(("cold prefill tokens/s (~700-token prompts)", prefill("llama"), prefill("wick")))
for label, key in [("total tokens/s", "total_tokens_per_s"), ("output tokens/s", "output_tokens_per_s"),
                   ("TTFT p50 ms", "ttft_ms.p50"), ("ITL p99 ms", "itl_ms.p99"), ("errors", "errors")]:
    rows.append((f"long context {label}", med("llama-context", key), med("wick-context", key)))
short = "llama" if peer == "llama.cpp" else peer
print(f"{'figure':<44} {peer:>12} {'wick':>12} {'wick/' + short:>11}")
for name, l, w in rows:
    ratio = w / l if l else float("nan")
    print(f"{name:<44} {l:>12.1f} {w:>12.1f} {ratio:>11.2f}")
PY
