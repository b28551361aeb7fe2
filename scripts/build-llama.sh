#!/usr/bin/env bash
# Builds the peer the benchmarks and the reference recordings compare Wick with: llama.cpp's
# llama-server, llama-bench and llama-quantize, from the llama.cpp sources that the
# llama-cpp-python source distribution on PyPI vendors (PyPI is reachable where GitHub is
# not). Prints the directory holding the three binaries on its last line.
#
#   scripts/build-llama.sh               build once (about 10 minutes on 2 cores), then cached
#   LLAMA_CPP_PYTHON=0.3.36              the release whose llama.cpp is built (the version that
#                                        recorded tests/data's references)
#
# Cached in $WICK_CACHE/llama.cpp-<release> (default ~/.cache/wick). Compiled for this CPU's
# instruction sets as /proc/cpuinfo lists them, with AMX off: a native build compiles
# llama.cpp's AMX kernels on CPUs that list AMX, and virtual machines that list it without
# granting it kill them with SIGILL (ldtilecfg).
set -euo pipefail
RELEASE=${LLAMA_CPP_PYTHON:-0.3.36}
ROOT=${WICK_CACHE:-$HOME/.cache/wick}/llama.cpp-$RELEASE
BIN=$ROOT/build/bin
TOOLS="llama-server llama-bench llama-quantize"

built() {
  local t
  for t in $TOOLS; do [ -x "$BIN/$t" ] || return 1; done
}
if built; then echo "$BIN"; exit 0; fi

mkdir -p "$ROOT"
# Build tools in a virtualenv of their own: a recent cmake from PyPI.
[ -x "$ROOT/venv/bin/cmake" ] || {
  python3 -m venv "$ROOT/venv"
  "$ROOT/venv/bin/pip" install -q cmake >&2
}
SDIST=$ROOT/llama_cpp_python-$RELEASE.tar.gz
# The source distribution, from PyPI's simple index (PEP 691, JSON), checked against the
# sha256 the index lists.
[ -f "$SDIST" ] || python3 - "$RELEASE" "$SDIST" <<'PY'
import hashlib, json, os, sys, urllib.request
release, out = sys.argv[1:3]
name = f"llama_cpp_python-{release}.tar.gz"
req = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req))["files"]
(entry,) = [f for f in files if f["filename"] == name]
data = urllib.request.urlopen(entry["url"]).read()
if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
    sys.exit(f"{entry['url']}: sha256 differs from the index's")
with open(out + ".part", "wb") as f:
    f.write(data)
os.replace(out + ".part", out)
PY
SRC=$ROOT/src
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  # Only the vendored llama.cpp tree of the archive.
  tar xzf "$SDIST" -C "$SRC" --strip-components=3 --wildcards "llama_cpp_python-$RELEASE/vendor/llama.cpp/*"
fi

flag() { grep -qw "$2" /proc/cpuinfo && echo "-D$1=ON" || echo "-D$1=OFF"; }
ISA=(
  -DGGML_NATIVE=OFF
  "$(flag GGML_AVX avx)" "$(flag GGML_AVX2 avx2)" "$(flag GGML_FMA fma)" "$(flag GGML_F16C f16c)"
  "$(flag GGML_BMI2 bmi2)" "$(flag GGML_AVX_VNNI avx_vnni)" "$(flag GGML_AVX512 avx512f)"
  "$(flag GGML_AVX512_VBMI avx512vbmi)" "$(flag GGML_AVX512_VNNI avx512_vnni)"
  "$(flag GGML_AVX512_BF16 avx512_bf16)"
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
export PATH=$ROOT/venv/bin:$PATH
cmake -S "$SRC" -B "$ROOT/build" "${ISA[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
# shellcheck disable=SC2086
cmake --build "$ROOT/build" --target $TOOLS -j "$(nproc)" >&2
built || { echo "build-llama.sh: the build finished without $TOOLS in $BIN" >&2; exit 1; }
echo "$BIN"
