//! One weight builder for every family and both formats: it asks a [`Source`] for the parts
//! a [`ModelConfig`] implies, checks every shape against the config, and fuses Q/K/V and
//! gate/up into one projection each.

use candle_core::Tensor;

use super::Placement;
use crate::config::ModelConfig;
use crate::linear::{Bias, Linear, Proj};
use crate::model::{Embedding, Layer, Norm, Weights};
use crate::Result;

/// The parts of a layer, named by each format in its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    AttnNorm,
    Q,
    K,
    V,
    /// Q, K and V in one matrix.
    Qkv,
    QBias,
    KBias,
    VBias,
    QkvBias,
    QNorm,
    KNorm,
    O,
    OBias,
    PostAttnNorm,
    FfnNorm,
    Gate,
    Up,
    /// Gate and up in one matrix (gate rows first).
    GateUp,
    Down,
    DownBias,
    PostFfnNorm,
}

/// Every part, in declaration order (`ALL_PARTS[p as usize] == p`).
const ALL_PARTS: [Part; 21] = [
    Part::AttnNorm,
    Part::Q,
    Part::K,
    Part::V,
    Part::Qkv,
    Part::QBias,
    Part::KBias,
    Part::VBias,
    Part::QkvBias,
    Part::QNorm,
    Part::KNorm,
    Part::O,
    Part::OBias,
    Part::PostAttnNorm,
    Part::FfnNorm,
    Part::Gate,
    Part::Up,
    Part::GateUp,
    Part::Down,
    Part::DownBias,
    Part::PostFfnNorm,
];

/// A model file seen as named tensors.
pub(crate) trait Source {
    /// The name of `part` of layer `layer`.
    fn name(&self, layer: usize, part: Part) -> String;
    fn embed_name(&self) -> String;
    fn output_name(&self) -> String;
    fn output_norm_name(&self) -> String;
    fn has(&self, name: &str) -> bool;
    /// A 1-D tensor of `len` values, as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>>;
    /// The named matrices, each `[rows[i], cols]`, stacked by rows into one projection.
    fn linear(&mut self, names: &[String], rows: &[usize], cols: usize) -> Result<Linear>;
    /// A `[rows, cols]` matrix kept on the host in its stored form, for row lookups.
    fn table(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear>;
}

fn norm(
    src: &mut dyn Source,
    name: &str,
    len: usize,
    cfg: &ModelConfig,
    place: &Placement,
) -> Result<Norm> {
    let mut w = src.vector(name, len)?;
    if cfg.norm_weight_offset != 0.0 {
        w.iter_mut().for_each(|v| *v += cfg.norm_weight_offset);
    }
    let t = Tensor::from_slice(&w, len, &place.device)?.to_dtype(place.dtype)?;
    Ok(Norm { w, t })
}

fn bias(
    src: &mut dyn Source,
    names: &[String],
    lens: &[usize],
    place: &Placement,
) -> Result<Option<Bias>> {
    if !names.iter().all(|n| src.has(n)) {
        return Ok(None);
    }
    let mut host = Vec::new();
    for (n, &len) in names.iter().zip(lens) {
        host.extend(src.vector(n, len)?);
    }
    let tensor = Tensor::from_slice(&host, host.len(), &place.device)?;
    Ok(Some(Bias { host, tensor }))
}

fn layer(src: &mut dyn Source, cfg: &ModelConfig, i: usize, place: &Placement) -> Result<Layer> {
    let (h, qd, kd, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let inter = cfg.intermediate_size;
    let names: Vec<String> = ALL_PARTS.iter().map(|&p| src.name(i, p)).collect();
    let n = |p: Part| names[p as usize].clone();
    let (q, k, v, qkv) = (n(Part::Q), n(Part::K), n(Part::V), n(Part::Qkv));
    let qkv_w = if src.has(&qkv) {
        src.linear(&[qkv], &[qd + 2 * kd], h)?
    } else {
        src.linear(&[q, k, v], &[qd, kd, kd], h)?
    };
    let fused_bias = n(Part::QkvBias);
    let qkv_bias = if src.has(&fused_bias) {
        bias(src, &[fused_bias], &[qd + 2 * kd], place)?
    } else {
        bias(
            src,
            &[n(Part::QBias), n(Part::KBias), n(Part::VBias)],
            &[qd, kd, kd],
            place,
        )?
    };
    if cfg.qkv_bias && qkv_bias.is_none() {
        return Err(crate::RunnerError::Step(format!(
            "layer {i}: the {} family has Q/K/V biases, and they are missing",
            cfg.family
        )));
    }
    let (gate, up, gate_up) = (n(Part::Gate), n(Part::Up), n(Part::GateUp));
    // GGUF names a fused gate+up `ffn_up` (twice as wide), so the gate's absence decides.
    let gate_up_w = if !src.has(&gate) && src.has(&gate_up) {
        src.linear(&[gate_up], &[2 * inter], h)?
    } else {
        src.linear(&[gate, up], &[inter, inter], h)?
    };
    let post = |src: &mut dyn Source, p: Part| -> Result<Option<Norm>> {
        cfg.post_norms
            .then(|| norm(src, &n(p), h, cfg, place))
            .transpose()
    };
    let head_norm = |src: &mut dyn Source, p: Part| -> Result<Option<Norm>> {
        cfg.qk_norm
            .then(|| norm(src, &n(p), hd, cfg, place))
            .transpose()
    };
    Ok(Layer {
        attn_norm: norm(src, &n(Part::AttnNorm), h, cfg, place)?,
        qkv: Proj {
            w: qkv_w,
            bias: qkv_bias,
        },
        q_norm: head_norm(src, Part::QNorm)?,
        k_norm: head_norm(src, Part::KNorm)?,
        o: Proj {
            w: src.linear(&[n(Part::O)], &[h], qd)?,
            bias: bias(src, &[n(Part::OBias)], &[h], place)?,
        },
        post_attn_norm: post(src, Part::PostAttnNorm)?,
        ffn_norm: norm(src, &n(Part::FfnNorm), h, cfg, place)?,
        gate_up: Proj {
            w: gate_up_w,
            bias: None,
        },
        down: Proj {
            w: src.linear(&[n(Part::Down)], &[h], inter)?,
            bias: bias(src, &[n(Part::DownBias)], &[h], place)?,
        },
        post_ffn_norm: post(src, Part::PostFfnNorm)?,
    })
}

/// Every weight of a model of shape `cfg` from `src`. `cfg.tied_embeddings` is set from
/// whether the source has its own output layer.
pub(crate) fn build(
    src: &mut dyn Source,
    cfg: &mut ModelConfig,
    place: &Placement,
) -> Result<Weights> {
    let layers = (0..cfg.num_layers)
        .map(|i| layer(src, cfg, i, place))
        .collect::<Result<Vec<_>>>()?;
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let embed_name = src.embed_name();
    let output_name = src.output_name();
    let output_norm = src.output_norm_name();
    cfg.tied_embeddings = !src.has(&output_name);
    let head_name = if cfg.tied_embeddings {
        embed_name.clone()
    } else {
        output_name
    };
    let lm_head = src.linear(std::slice::from_ref(&head_name), &[vocab], h)?;
    // On the host a tied table is read from the output layer itself; otherwise the table
    // stays as stored, on the host, and rows are dequantized on lookup.
    let embed = if cfg.tied_embeddings && place.host {
        Embedding::Tied
    } else {
        Embedding::Table(src.table(&embed_name, vocab, h)?)
    };
    Ok(Weights {
        embed,
        layers,
        norm: norm(src, &output_norm, h, cfg, place)?,
        lm_head: Proj {
            w: lm_head,
            bias: match head_name.strip_suffix(".weight") {
                Some(stem) if !cfg.tied_embeddings => {
                    bias(src, &[format!("{stem}.bias")], &[vocab], place)?
                }
                _ => None,
            },
        },
    })
}
