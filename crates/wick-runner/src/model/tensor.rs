//! The tensor backend: candle ops on any device and dtype (GPUs, half precision, and the
//! CPU's tensor path), attention through the paged op or by gathering.

use candle_core::{Device, Tensor};

use super::layer::{Backend, Buf};
use super::{Model, Norm};
use crate::adapter::{Site, StepAdapters};
use crate::attention::{self, AttentionMetadata, DeviceMetadata, Heads};
use crate::config::Activation;
use crate::kv_cache::DeviceLayer;
use crate::linear::Proj;
use crate::profile::{Phase, Profiler};
use crate::{Result, RunnerError};

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
}

/// One step with tensors: the step's metadata on the device, RoPE tables as tensors, the
/// cache, and the profiler that times each operation's phase when on.
pub(crate) struct TensorBackend<'a> {
    model: &'a Model,
    kv: &'a mut [DeviceLayer],
    meta: &'a AttentionMetadata,
    dm: &'a DeviceMetadata,
    tables: Vec<(Tensor, Tensor)>,
    prof: &'a mut Profiler,
    adapters: StepAdapters<'a>,
    bufs: [Option<Tensor>; Buf::COUNT],
}

impl<'a> TensorBackend<'a> {
    pub(crate) fn new(
        model: &'a Model,
        kv: &'a mut [DeviceLayer],
        (meta, dm): (&'a AttentionMetadata, &'a DeviceMetadata),
        prof: &'a mut Profiler,
        adapters: StepAdapters<'a>,
    ) -> Result<Self> {
        let tables = model
            .ropes
            .iter()
            .map(|r| {
                r.tables(&meta.positions)
                    .to_tensors(&model.device, model.dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            kv,
            meta,
            dm,
            tables,
            prof,
            adapters,
            bufs: Default::default(),
        })
    }

    fn get(&self, b: Buf) -> Result<&Tensor> {
        self.bufs[b as usize]
            .as_ref()
            .ok_or_else(|| RunnerError::Step(format!("{b:?} read before it was written")))
    }

    /// Stores `t` as `b` and ends `phase`.
    fn set(&mut self, b: Buf, t: Tensor, phase: Phase) -> Result<()> {
        self.bufs[b as usize] = Some(t);
        self.prof.mark(&self.model.device, phase)
    }
}

impl Backend for TensorBackend<'_> {
    type Logits = Tensor;

    fn embed(&mut self, model: &Model, ids: &[u32]) -> Result<()> {
        let mut rows = Vec::new();
        model.embed(ids, &mut rows)?;
        let x = Tensor::from_vec(rows, (ids.len(), model.cfg.hidden_size), &Device::Cpu)?
            .to_device(&model.device)?
            .to_dtype(model.dtype)?;
        self.set(Buf::X, x, Phase::Host)
    }

    fn norm(&mut self, x: Buf, w: &Norm, eps: f32, out: Buf) -> Result<()> {
        let y = rms_norm(self.get(x)?, &w.t, eps)?;
        self.set(out, y, Phase::Other)
    }

    fn head_norms(&mut self, q: &Norm, k: &Norm, eps: f32, heads: &Heads) -> Result<()> {
        let (qd, kd, hd) = (heads.q_dim(), heads.kv_dim(), heads.head_dim);
        let qkv = self.get(Buf::Qkv)?;
        let n = qkv.dim(0)?;
        let per_head = |t: Tensor, c: usize, w: &Tensor| -> Result<Tensor> {
            let t = t.reshape((n, c / hd, hd))?;
            Ok(rms_norm(&t, w, eps)?.reshape((n, c))?)
        };
        let qn = per_head(qkv.narrow(1, 0, qd)?, qd, &q.t)?;
        let kn = per_head(qkv.narrow(1, qd, kd)?, kd, &k.t)?;
        let qkv = Tensor::cat(&[&qn, &kn, &qkv.narrow(1, qd + kd, kd)?], 1)?;
        self.set(Buf::Qkv, qkv, Phase::Other)
    }

    fn linear(&mut self, p: &Proj, site: Option<Site>, x: Buf, out: Buf) -> Result<()> {
        let x = self.get(x)?;
        let mut y = p.forward(x)?;
        if let Some(site) = site {
            y = self.adapters.add_tensor(site, x, y)?;
        }
        self.set(out, y, Phase::Matmul)
    }

    fn attention(&mut self, layer: usize, heads: Heads, rope: usize) -> Result<()> {
        let qkv = self.get(Buf::Qkv)?.clone();
        let (cos, sin) = &self.tables[rope];
        let rope = (&self.model.ropes[rope], cos, sin);
        let cache = &mut self.kv[layer];
        let a = attention::attention_tensor(cache, heads, rope, &qkv, self.meta, self.dm)?;
        self.set(Buf::Attn, a, Phase::Attention)
    }

    fn add(&mut self, x: Buf, y: Buf) -> Result<()> {
        let s = (self.get(x)? + self.get(y)?)?;
        self.set(x, s, Phase::Other)
    }

    fn act_mul(&mut self, f: Activation, intermediate: usize) -> Result<()> {
        let gate_up = self.get(Buf::GateUp)?;
        let gate = gate_up.narrow(1, 0, intermediate)?;
        let gate = match f {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let act = (gate * gate_up.narrow(1, intermediate, intermediate)?)?;
        self.set(Buf::Act, act, Phase::Other)
    }

    fn gather_rows(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::new(rows, &self.model.device)?;
        let x = self.get(Buf::X)?.index_select(&idx, 0)?;
        self.set(Buf::Tmp, x, Phase::Other)
    }

    fn softcap(&mut self, x: Buf, cap: f32) -> Result<()> {
        let y = ((self.get(x)? / cap as f64)?.tanh()? * cap as f64)?;
        self.set(x, y, Phase::Other)
    }

    fn logits(&mut self, x: Buf, _vocab: usize) -> Result<Tensor> {
        Ok(self.get(x)?.clone())
    }
}
