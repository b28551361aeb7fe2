#!/usr/bin/env bash
# A CUDA 13.0 toolchain from PyPI wheels, for building Wick with `--features cuda` on a
# machine without a CUDA install (or a GPU). Prints the directory it made; `make cuda`
# sources `scripts/cuda-env.sh`, which puts it on PATH and sets what the build scripts read.
#
# Why 13.0: the GPU machines run driver 580, which runs CUDA 13.0 code. nvcc comes from
# `nvidia-cuda-nvcc` (with `nvidia-nvvm` for cicc/libdevice), headers from
# `nvidia-cuda-runtime`, `nvidia-cuda-crt` and `nvidia-cuda-cccl`. candle links cudarc with
# `dynamic-linking`, so the link step needs libcublas, libcublasLt, libcurand, libnvrtc and
# libcudart (their wheels) and libcuda, the driver, which PyPI does not carry: a link stub
# with the same soname is generated here, as the CUDA toolkit's own lib64/stubs does. At run
# time the real driver library is loaded.
#
# Cached in ${WICK_CACHE:-~/.cache/wick}/cuda-13.0; safe to run concurrently (flock).
set -euo pipefail

CACHE="${WICK_CACHE:-$HOME/.cache/wick}"
PREFIX="$CACHE/cuda-13.0"
WHEELS="$CACHE/cuda-wheels"
PACKAGES=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.0.19
  nvidia-curand==10.4.0.35
)
# The link-only packages (libraries) are skipped with CUDA_TOOLCHAIN=check: `cargo check`
# needs nvcc and the headers (candle-kernels compiles its kernels in its build script) but
# links nothing, and cuBLAS alone is a 420 MB wheel.
MODE="${CUDA_TOOLCHAIN:-build}"

mkdir -p "$CACHE" "$WHEELS"
exec 9>"$CACHE/cuda.lock"
flock 9

stamp="$PREFIX/.complete-$MODE"
if [ -f "$stamp" ] || { [ "$MODE" = check ] && [ -f "$PREFIX/.complete-build" ]; }; then
  echo "$PREFIX"
  exit 0
fi

PY="${PYTHON:-python3}"
for spec in "${PACKAGES[@]}"; do
  name="${spec%%==*}"
  case "$MODE:$name" in check:nvidia-cublas|check:nvidia-curand|check:nvidia-cuda-nvrtc) continue ;; esac
  ver="${spec##*==}"
  whl_glob="${name//-/_}-${ver}-*.whl"
  # shellcheck disable=SC2086
  if ! ls "$WHEELS"/$whl_glob >/dev/null 2>&1; then
    echo "fetching $spec" >&2
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$spec" >&2
  fi
done

tmp="$(mktemp -d "$CACHE/cuda-unpack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for spec in "${PACKAGES[@]}"; do
  name="${spec%%==*}"
  case "$MODE:$name" in check:nvidia-cublas|check:nvidia-curand|check:nvidia-cuda-nvrtc) continue ;; esac
  ver="${spec##*==}"
  # shellcheck disable=SC2086
  for whl in "$WHEELS"/${name//-/_}-${ver}-*.whl; do
    "$PY" -m zipfile -e "$whl" "$tmp"
  done
done
rm -rf "$PREFIX"
mv "$tmp/nvidia/cu13" "$PREFIX"
chmod +x "$PREFIX"/bin/* "$PREFIX"/nvvm/bin/* 2>/dev/null || true
# nvcc looks for lib64/ next to include/; the wheels ship lib/.
[ -e "$PREFIX/lib64" ] || ln -s lib "$PREFIX/lib64"

if [ "$MODE" = build ]; then
  # Unversioned names for the linker (the wheels ship only the sonames).
  for so in "$PREFIX"/lib/lib*.so.*; do
    base="${so%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
  done
  # The driver stub: every cu* entry point cudarc declares, with libcuda's soname.
  cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | head -1 || true)"
  if [ -z "$cudarc_src" ]; then
    (cd "$(dirname "$0")/.." && cargo fetch >&2)
    cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | head -1)"
  fi
  mkdir -p "$PREFIX/lib/stubs"
  grep -ohP 'pub unsafe fn \Kcu\w+' "$cudarc_src/src/driver/sys/mod.rs" | sort -u |
    sed 's/.*/void &(void) {}/' >"$PREFIX/lib/stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$PREFIX/lib/stubs/libcuda.so" "$PREFIX/lib/stubs/libcuda.c"
fi

"$PREFIX/bin/nvcc" --version >&2
touch "$stamp"
echo "$PREFIX"
