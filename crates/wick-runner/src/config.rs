//! The family-neutral shape of a decoder-only transformer: every difference between the
//! families Wick serves is a field here (read by the family's module in `models/`), so the KV
//! cache, the runner and the forward never branch on a family's name.

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's GGUF layout for Llama (Q and K rows permuted at
    /// conversion).
    Interleaved,
    /// Pairs `(i, i + dims/2)`: the Hugging Face layout, and GGUF's NeoX families.
    Half,
}

/// Stretching of the rotary frequencies beyond the trained context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// YaRN: interpolation for low frequencies, extrapolation for high ones, a ramp between,
    /// and a magnitude correction of `1 + 0.1 ln(factor)`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
    },
}

/// One rotary embedding: how many dimensions of a head rotate, at which frequencies.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub style: RopeStyle,
    /// Dimensions rotated, from the start of the head (even; a head size or less).
    pub dims: usize,
    pub base: f32,
    /// Per-pair divisors of the frequency (Llama 3's `rope_scaling`, Phi-3's LongRoPE).
    pub freq_factors: Option<Vec<f32>>,
    pub scaling: RopeScaling,
    /// Multiplier of cos and sin (LongRoPE's attention factor; 1 otherwise).
    pub attn_factor: f32,
}

impl RopeSpec {
    pub fn plain(style: RopeStyle, dims: usize, base: f32) -> Self {
        Self {
            style,
            dims,
            base,
            freq_factors: None,
            scaling: RopeScaling::None,
            attn_factor: 1.0,
        }
    }
}

/// The nonlinearity of the gated MLP: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (Gemma).
    GeluTanh,
}

/// What differs from one layer to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Keys a query attends to: the last `window` positions (itself included), or all.
    pub sliding_window: Option<usize>,
    /// Index into [`ModelConfig::ropes`].
    pub rope: usize,
}

/// The shape and arithmetic of a model, whatever its family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family's registry name (`llama`, `qwen2`, ...), for logs.
    pub family: &'static str,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Not always `hidden_size / num_heads` (Gemma 3, Qwen3).
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f32,
    /// Added to every RMSNorm weight at load: Gemma's checkpoints store `w - 1` (its norm
    /// multiplies by `1 + w`); GGUF files store the sum already.
    pub norm_weight_offset: f32,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Biases on the Q, K and V projections (Qwen2).
    pub qkv_bias: bool,
    pub activation: Activation,
    /// RMSNorm of the attention output and of the MLP output before each residual add
    /// (Gemma 2 and 3).
    pub post_norms: bool,
    /// Multiplier of the token embeddings (Gemma: `sqrt(hidden_size)`); 1 otherwise.
    pub embed_scale: f32,
    /// Multiplier of the attention scores (`1/sqrt(head_dim)` unless the family says).
    pub attn_scale: f32,
    /// `cap * tanh(score / cap)` on every scaled attention score, before the mask and the
    /// softmax (Gemma 2).
    pub attn_logit_softcap: Option<f32>,
    /// `cap * tanh(logits / cap)` on the output logits (Gemma 2 and 3).
    pub final_logit_softcap: Option<f32>,
    pub tied_embeddings: bool,
    pub ropes: Vec<RopeSpec>,
    pub layers: Vec<LayerSpec>,
}

/// The most layers a model may have (no real one comes near).
pub(crate) const MAX_LAYERS: usize = 4096;

impl ModelConfig {
    /// The arithmetic every family starts from (SiLU, no biases or extra norms, scores scaled
    /// by `1/sqrt(head_dim)`, one RoPE for every layer, no windows); the loaders fill in the
    /// shape they read and the families change what is their own. A layer count past
    /// [`MAX_LAYERS`] is refused here, before anything is built per layer (a file claiming
    /// 10^9 layers must not cost 24 GB first).
    pub(crate) fn plain(
        family: &'static str,
        layers: usize,
        head_dim: usize,
        rope: RopeSpec,
    ) -> Result<Self, String> {
        if layers > MAX_LAYERS {
            return Err(format!("layer count {layers} is larger than {MAX_LAYERS}"));
        }
        Ok(Self {
            family,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: layers,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim,
            vocab_size: 0,
            max_position_embeddings: 0,
            norm_eps: 1e-6,
            norm_weight_offset: 0.0,
            qk_norm: false,
            qkv_bias: false,
            activation: Activation::Silu,
            post_norms: false,
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            attn_logit_softcap: None,
            final_logit_softcap: None,
            tied_embeddings: false,
            ropes: vec![rope],
            layers: (0..layers)
                .map(|_| LayerSpec {
                    sliding_window: None,
                    rope: 0,
                })
                .collect(),
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks that the numbers fit together (any file can claim anything).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return Err("zero heads or head size".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.num_layers == 0 || self.vocab_size == 0 || self.hidden_size == 0 {
            return Err("zero layers, vocabulary or hidden size".into());
        }
        if self.intermediate_size == 0 || self.max_position_embeddings == 0 {
            return Err("zero MLP width or context length".into());
        }
        // Bounds that no real model reaches, so that sizes computed from them cannot overflow
        // or ask for absurd allocations.
        let limits = [
            ("hidden size", self.hidden_size, 1 << 17),
            ("MLP width", self.intermediate_size, 1 << 20),
            ("layer count", self.num_layers, MAX_LAYERS),
            ("head count", self.num_heads, 4096),
            ("head size", self.head_dim, 4096),
            ("vocabulary", self.vocab_size, 1 << 24),
            ("context length", self.max_position_embeddings, 1 << 24),
        ];
        for (what, v, max) in limits {
            if v > max {
                return Err(format!("{what} {v} is larger than {max}"));
            }
        }
        if self.layers.len() != self.num_layers {
            return Err(format!(
                "{} layer specs for {} layers",
                self.layers.len(),
                self.num_layers
            ));
        }
        for r in &self.ropes {
            if r.dims == 0 || !r.dims.is_multiple_of(2) || r.dims > self.head_dim {
                return Err(format!(
                    "rotary dimensions {} for a head of {}",
                    r.dims, self.head_dim
                ));
            }
            if r.freq_factors
                .as_ref()
                .is_some_and(|f| f.len() != r.dims / 2)
            {
                return Err(format!(
                    "{} rotary frequency factors for {} dimensions",
                    r.freq_factors.as_ref().map_or(0, Vec::len),
                    r.dims
                ));
            }
            if !(r.base.is_finite() && r.base > 1.0) {
                return Err(format!("rotary base {}", r.base));
            }
        }
        if let Some(l) = self.layers.iter().find(|l| l.rope >= self.ropes.len()) {
            return Err(format!("layer rope index {} out of range", l.rope));
        }
        if self.layers.iter().any(|l| l.sliding_window == Some(0)) {
            return Err("a sliding window of 0".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(format!("norm epsilon {}", self.norm_eps));
        }
        for (what, cap) in [
            ("attention", self.attn_logit_softcap),
            ("final", self.final_logit_softcap),
        ] {
            if let Some(c) = cap.filter(|c| !(c.is_finite() && *c > 0.0)) {
                return Err(format!("{what} logit soft-cap {c}"));
            }
        }
        Ok(())
    }

    /// Parameter count (weights of every matrix, embeddings once when tied).
    pub fn parameters(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let per_layer =
            h * (self.q_dim() + 2 * self.kv_dim()) as u64 + self.q_dim() as u64 * h + 3 * h * i;
        let embed = self.vocab_size as u64 * h;
        per_layer * self.num_layers as u64 + embed * if self.tied_embeddings { 1 } else { 2 }
    }
}
