//! The CPU's vector instructions, probed once per process, and the kernel set each family of
//! Wick's CPU kernels runs: the float kernels (attention, activations) and the quantized
//! matrix products. Every set gives the same bits as the portable code (tested), so the
//! choice changes speed only; [`SimdLimit`] narrows it for tests and comparisons. The limit
//! comes in through [`crate::LoadOptions`] (the binary maps `WICK_NO_AVX512` / `WICK_NO_SIMD`
//! to it) and holds for the whole process, the last load's.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The widest kernels the CPU kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimdLimit {
    /// Whatever the CPU has.
    #[default]
    Widest,
    /// No AVX-512 (AVX2 where the CPU has it).
    NoAvx512,
    /// The portable code only.
    Portable,
}

impl SimdLimit {
    /// The limit from the two overrides: no AVX-512, or no vector kernels at all (which
    /// wins). The binary reads them from `WICK_NO_AVX512` and `WICK_NO_SIMD`.
    pub fn from_overrides(no_avx512: bool, no_simd: bool) -> Self {
        match (no_avx512, no_simd) {
            (_, true) => Self::Portable,
            (true, false) => Self::NoAvx512,
            (false, false) => Self::Widest,
        }
    }
}

/// A kernel set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// What the CPU has, as far as Wick's kernels ask.
#[derive(Debug, Clone, Copy, Default)]
struct Features {
    avx512f: bool,
    avx512bw: bool,
    avx512vnni: bool,
    /// AVX2 with FMA and F16C (every AVX2 kernel converts f16 with `vcvtph2ps`).
    avx2: bool,
}

fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            Features {
                avx512f: has!("avx512f"),
                avx512bw: has!("avx512bw"),
                avx512vnni: has!("avx512vnni"),
                avx2: has!("avx2") && has!("fma") && has!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Features::default()
        }
    })
}

static LIMIT: AtomicU8 = AtomicU8::new(SimdLimit::Widest as u8);

/// Narrows (or widens back) the kernels of the whole process.
pub(crate) fn set_limit(limit: SimdLimit) {
    LIMIT.store(limit as u8, Ordering::Relaxed);
}

fn limit() -> SimdLimit {
    match LIMIT.load(Ordering::Relaxed) {
        x if x == SimdLimit::Portable as u8 => SimdLimit::Portable,
        x if x == SimdLimit::NoAvx512 as u8 => SimdLimit::NoAvx512,
        _ => SimdLimit::Widest,
    }
}

fn pick(limit: SimdLimit, avx512: bool, f: Features) -> Isa {
    match limit {
        SimdLimit::Portable => Isa::Portable,
        SimdLimit::Widest if avx512 => Isa::Avx512,
        _ if f.avx2 => Isa::Avx2,
        _ => Isa::Portable,
    }
}

/// The float kernels' set: AVX-512 F, else AVX2 with FMA and F16C, else portable.
pub(crate) fn float_isa() -> Isa {
    let f = features();
    pick(limit(), f.avx512f, f)
}

/// The quantized matrix products' set: AVX-512 with BW and VNNI, else AVX2 with FMA and
/// F16C, else portable.
pub(crate) fn int8_isa() -> Isa {
    int8_isa_within(limit())
}

/// [`int8_isa`] under `limit`, whatever the process's limit (tests compare every set).
pub(crate) fn int8_isa_within(limit: SimdLimit) -> Isa {
    let f = features();
    pick(limit, f.avx512f && f.avx512bw && f.avx512vnni, f)
}

/// [`float_isa`] under `limit`, whatever the process's limit.
#[cfg(test)]
pub(crate) fn float_isa_within(limit: SimdLimit) -> Isa {
    let f = features();
    pick(limit, f.avx512f, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_narrows_both_kernel_sets() {
        let f = features();
        let both = |l| (float_isa_within(l), int8_isa_within(l));
        assert_eq!(both(SimdLimit::Portable), (Isa::Portable, Isa::Portable));
        let (fl, i8) = both(SimdLimit::NoAvx512);
        assert!(fl != Isa::Avx512 && i8 != Isa::Avx512);
        assert_eq!(fl == Isa::Avx2, f.avx2);
        let (fl, i8) = both(SimdLimit::Widest);
        assert_eq!(fl == Isa::Avx512, f.avx512f);
        assert_eq!(i8 == Isa::Avx512, f.avx512f && f.avx512bw && f.avx512vnni);
        // The process's limit is the default until a load sets another.
        assert_eq!(limit(), SimdLimit::Widest);
    }
}
