//! The tensor forward: candle ops on any device and dtype (GPUs, half precision).

use candle_core::{Device, Tensor};

use super::Model;
use crate::attention::{AttentionMetadata, DeviceMetadata};
use crate::config::Activation;
use crate::profile::{Phase, Profiler};
use crate::{KvCache, Result, RunnerError};

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
}

impl Model {
    /// Runs the packed tokens `ids` through every layer and returns the logits of the rows
    /// `last_rows` (`[last_rows.len(), vocab]`), or `None` when no row needs them.
    pub(crate) fn forward(
        &self,
        ids: &[u32],
        (meta, dm): (&AttentionMetadata, &DeviceMetadata),
        last_rows: &[u32],
        kv: &mut KvCache,
        prof: &mut Profiler,
    ) -> Result<Option<Tensor>> {
        if self.host {
            return Err(RunnerError::Step(
                "this model computes on the host path; use forward_host".into(),
            ));
        }
        let cfg = &self.cfg;
        let (n, h, eps) = (ids.len(), cfg.hidden_size, cfg.norm_eps);
        let (qd, kd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let inter = cfg.intermediate_size;
        let mut rows = Vec::new();
        self.embed(ids, &mut rows)?;
        let mut x = Tensor::from_vec(rows, (n, h), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let tables = self
            .ropes
            .iter()
            .map(|r| {
                r.tables(&meta.positions)
                    .to_tensors(&self.device, self.dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        let dev = &self.device;
        prof.mark(dev, Phase::Host)?;
        for (i, layer) in self.w.layers.iter().enumerate() {
            let hs = rms_norm(&x, &layer.attn_norm.t, eps)?;
            prof.mark(dev, Phase::Other)?;
            let mut qkv = layer.qkv.forward(&hs)?;
            prof.mark(dev, Phase::Matmul)?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                let heads = |t: Tensor, c: usize, w: &Tensor| -> Result<Tensor> {
                    let t = t.reshape((n, c / hd, hd))?;
                    Ok(rms_norm(&t, w, eps)?.reshape((n, c))?)
                };
                let q = heads(qkv.narrow(1, 0, qd)?, qd, &qn.t)?;
                let k = heads(qkv.narrow(1, qd, kd)?, kd, &kn.t)?;
                qkv = Tensor::cat(&[&q, &k, &qkv.narrow(1, qd + kd, kd)?], 1)?;
            }
            let r = cfg.layers[i].rope;
            let (cos, sin) = &tables[r];
            let attn =
                kv.attention_tensor(i, self.heads(i), (&self.ropes[r], cos, sin), &qkv, meta, dm)?;
            prof.mark(dev, Phase::Attention)?;
            let mut o = layer.o.forward(&attn)?;
            prof.mark(dev, Phase::Matmul)?;
            if let Some(pn) = &layer.post_attn_norm {
                o = rms_norm(&o, &pn.t, eps)?;
            }
            x = (x + o)?;
            let hs = rms_norm(&x, &layer.ffn_norm.t, eps)?;
            prof.mark(dev, Phase::Other)?;
            let gate_up = layer.gate_up.forward(&hs)?;
            prof.mark(dev, Phase::Matmul)?;
            let gate = gate_up.narrow(1, 0, inter)?;
            let gate = match cfg.activation {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let act = (gate * gate_up.narrow(1, inter, inter)?)?;
            prof.mark(dev, Phase::Other)?;
            let mut d = layer.down.forward(&act)?;
            prof.mark(dev, Phase::Matmul)?;
            if let Some(pn) = &layer.post_ffn_norm {
                d = rms_norm(&d, &pn.t, eps)?;
            }
            x = (x + d)?;
        }
        if last_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(last_rows, &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = rms_norm(&x, &self.w.norm.t, eps)?;
        prof.mark(dev, Phase::Other)?;
        let mut logits = self.w.lm_head.forward(&x)?;
        prof.mark(dev, Phase::Matmul)?;
        if let Some(cap) = cfg.final_logit_softcap {
            logits = ((logits / cap as f64)?.tanh()? * cap as f64)?;
        }
        Ok(Some(logits))
    }
}
