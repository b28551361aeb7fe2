# Sourced (not run): the environment for `cargo build|check --features cuda` with the
# toolchain that scripts/cuda-toolchain.sh lays out. CUDA_COMPUTE_CAP=90 (H100/H200): the
# statically linked quantized kernels get sm_90 SASS, the rest PTX for compute_90, which the
# driver compiles at load time.
_wick_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="$("$_wick_root/scripts/cuda-toolchain.sh")"
export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CUDA_HOME/lib -L native=$CUDA_HOME/lib/stubs"
unset _wick_root
