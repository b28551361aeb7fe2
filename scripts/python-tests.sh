#!/usr/bin/env bash
# The openai-client test suite (tests/python) against the real binary on the default model
# and on the Qwen and Gemma test models, and embeddings (all-MiniLM-L6-v2) beside a chat model.
# The virtualenv is cached per requirements file; the binary is the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=tests/python/requirements.txt
VENV=${WICK_CACHE:-$HOME/.cache/wick}/venv-$(sha256sum "$REQ" | cut -c1-12)
if [ ! -x "$VENV/bin/pytest" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$REQ"
fi
# The chat page's test drives Debian's chromium through its chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  fi
fi
export WICK_MODEL=${WICK_MODEL:-$(scripts/fetch-model.sh)}
export WICK_QWEN_MODEL=${WICK_QWEN_MODEL:-$(scripts/fetch-model.sh qwen)}
export WICK_GEMMA_MODEL=${WICK_GEMMA_MODEL:-$(scripts/fetch-model.sh gemma)}
export WICK_EMBED_MODEL=${WICK_EMBED_MODEL:-$(scripts/fetch-model.sh minilm)}
export WICK_BIN=${WICK_BIN:-$PWD/target/release/wick}
[ -x "$WICK_BIN" ] || cargo build --release --bin wick
cd tests/python
exec "$VENV/bin/pytest" -q "$@"
