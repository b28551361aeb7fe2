//! Where a tensor-path step's time goes: host work (embedding lookup, metadata, uploads),
//! matrix products, attention (rotary, cache writes, the paged op), the rest (norms,
//! activations, residuals) and sampling. Off by default; when on, each phase ends with a
//! device synchronization, so a profiled step is slower than an unprofiled one (the phases'
//! shares are what it is for).

use std::time::Instant;

use candle_core::Device;

use crate::Result;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    Host = 0,
    Matmul = 1,
    Attention = 2,
    Other = 3,
    Sampling = 4,
}

/// Seconds per phase over the profiled steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepProfile {
    pub steps: u64,
    pub host: f64,
    pub matmul: f64,
    pub attention: f64,
    pub other: f64,
    pub sampling: f64,
}

#[derive(Default)]
pub(crate) struct Profiler {
    on: bool,
    last: Option<Instant>,
    totals: [f64; 5],
    steps: u64,
}

impl Profiler {
    pub fn set(&mut self, on: bool) {
        *self = Self {
            on,
            ..Self::default()
        };
    }

    /// Starts a step's clock.
    pub fn start(&mut self, device: &Device) -> Result<()> {
        if self.on {
            device.synchronize()?;
            self.steps += 1;
            self.last = Some(Instant::now());
        }
        Ok(())
    }

    /// Ends `phase`: the time since the previous mark (or the start) is its.
    pub fn mark(&mut self, device: &Device, phase: Phase) -> Result<()> {
        if self.on {
            device.synchronize()?;
            let now = Instant::now();
            if let Some(last) = self.last {
                self.totals[phase as usize] += (now - last).as_secs_f64();
            }
            self.last = Some(now);
        }
        Ok(())
    }

    pub fn report(&self) -> StepProfile {
        let t = self.totals;
        StepProfile {
            steps: self.steps,
            host: t[0],
            matmul: t[1],
            attention: t[2],
            other: t[3],
            sampling: t[4],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mark_charges_the_time_since_the_last_to_its_phase() {
        let mut p = Profiler::default();
        p.start(&Device::Cpu).unwrap();
        p.mark(&Device::Cpu, Phase::Matmul).unwrap();
        assert_eq!(p.report(), StepProfile::default(), "off: nothing counted");
        p.set(true);
        p.start(&Device::Cpu).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.mark(&Device::Cpu, Phase::Matmul).unwrap();
        p.mark(&Device::Cpu, Phase::Sampling).unwrap();
        let r = p.report();
        assert_eq!(r.steps, 1);
        assert!(r.matmul >= 0.02, "{r:?}");
        assert!(r.sampling < r.matmul && r.host == 0.0, "{r:?}");
    }
}
