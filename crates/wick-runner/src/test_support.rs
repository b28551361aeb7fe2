//! Helpers shared by the crate's unit tests.

/// Uniform values in [-1, 1) from a fixed seed (a 64-bit LCG), the same on every machine.
pub(crate) fn rng(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
