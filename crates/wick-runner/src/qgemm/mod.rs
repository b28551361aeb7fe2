//! Quantized matrix products on the CPU: GGUF weights of every common type (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K) against activations quantized to 8-bit blocks of
//! 32 (as llama.cpp does), with AVX-512 VNNI integer dot products where the CPU has them,
//! AVX2 where it has those, and a portable path with the same arithmetic elsewhere.
//!
//! The weights are repacked once at load into tiles of 16 output rows. For each block of 32
//! inputs a tile holds 4 (or, for Q8_0, 8) 64-byte vectors whose 32-bit lane `r` holds 4
//! consecutive weights of row `r`, so one `vpdpbusd` with 4 broadcast activation bytes adds
//! 64 products into 16 row sums. Types of 5 and 6 bits keep their high bits in a plane of 1 or
//! 2 vectors beside the 4-bit one (so the tiles take about the file's size), merged in
//! registers; K-quants keep their 6-bit sub-block scales as bytes and their super-block
//! scales as f16. A tile's weights are unpacked once per block and used for up to [`TOKENS`]
//! tokens, so a step's cost per token falls as the batch grows.
//!
//! Every output `y[t][n]` is the sum over blocks, in block order, of a fixed sequence of fused
//! multiply-adds per block (the portable kernel in [`matmul`](mod@matmul) spells it out): the
//! same operations in the same order whatever the number of tokens in the step, the tile or
//! the thread that computes it. Output is therefore independent of the batch, and the AVX2 and
//! portable paths give bit-identical results.
//!
//! The parts: the shared tile layout (here), the packed weights ([`pack`]), the quantized
//! activations ([`acts`]), the product and its portable kernel ([`matmul`](mod@matmul)), and
//! its x86 kernels ([`avx2`], [`avx512`]).

mod acts;
mod avx2;
mod avx512;
mod matmul;
mod pack;
#[cfg(test)]
mod tests;

pub use acts::Acts;
pub use matmul::matmul;
pub use pack::Packed;
#[cfg(any(test, feature = "testing"))]
pub use pack::{random_blocks, TYPES};

const QK: usize = 32;
const ROWS: usize = 16;
/// Blocks of 32 in a K-quant super-block.
const SUPER: usize = 8;
/// Tokens computed per pass over a tile's weights.
const TOKENS: usize = 8;

/// How a tile stores its integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bits {
    /// Unsigned, 4 bits: the nibble vectors alone.
    Four,
    /// Unsigned, 5 bits: a 64-byte plane of fifth bits besides.
    Five,
    /// Unsigned, 6 bits (`q - 32` signed): a 128-byte plane of the top two bits.
    Six,
    /// Signed bytes (Q8_0).
    Eight,
}

impl Bits {
    /// Bytes of high bits per (tile, block).
    fn high_bytes(self) -> usize {
        match self {
            Bits::Five => 64,
            Bits::Six => 128,
            _ => 0,
        }
    }

    fn tile_bytes(self) -> usize {
        if self == Bits::Eight {
            ROWS * QK
        } else {
            ROWS * QK / 2
        }
    }
}

/// Where a block's factors come from (see [`pack::Scale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scales {
    /// f16 `d` per (tile, block, row); the weights are `q - zero` (Q4_0, Q5_0; Q8_0's are
    /// signed).
    Offset(i32),
    /// f16 `d` and `m` per (tile, block, row).
    Block,
    /// f16 `d` and `m` per (tile, super-block, row); `sc` and `mn` bytes per (tile, block, row).
    Super,
    /// f16 `d` per (tile, super-block, row); an i8 `sc` per (tile, block, half, row).
    Halves,
}

/// The output of a [`matmul()`], shared by its tasks as a raw pointer: each writes its own
/// columns, and no task holds a `&mut` over the whole buffer (overlapping mutable
/// references would be undefined behaviour even with disjoint writes).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the tasks that share an `Out` write disjoint elements (see `matmul`), and the
// buffer outlives them (it is borrowed mutably for the whole call).
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

impl Out {
    fn new(out: &mut [f32]) -> Self {
        Out {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// A pointer to element `i`, in bounds.
    ///
    /// # Safety
    /// No other task may access the elements written through it.
    #[inline(always)]
    unsafe fn at(self, i: usize) -> *mut f32 {
        debug_assert!(i < self.len);
        self.ptr.add(i)
    }
}
