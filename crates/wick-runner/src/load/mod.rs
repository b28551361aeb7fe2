//! Loading a model: a GGUF file or a Hugging Face directory (`config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `*.safetensors`), through its family (`models`), into a
//! [`Model`] and the [`ModelAssets`] the front end needs.
//!
//! Both formats are [`Source`]s of named tensors; one builder (`build`) turns a source into
//! weights for any family, from the config alone.

mod build;
mod gguf;
mod hf;

use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::{Model, Result, RunnerError};

/// What the front end needs from a model beside its weights.
#[derive(Clone)]
pub struct ModelAssets {
    /// A name for the model, from its file or directory.
    pub name: String,
    pub tokenizer: Tokenizer,
    /// The model's own Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether a prompt starts with the BOS token (the tokenizer adds it when asked to add
    /// special tokens).
    pub add_bos: bool,
    /// Tokens that end generation (end of text, end of turn).
    pub stop_token_ids: Vec<u32>,
    /// Longest sequence, prompt plus output, the model was trained for.
    pub max_model_len: usize,
    /// What the model is, for listings.
    pub facts: ModelFacts,
}

/// What a model is, as a model listing shows it (Ollama's `/api/tags` and `/api/show`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelFacts {
    /// `gguf` or `safetensors`.
    pub format: &'static str,
    /// The family's registry name (`llama`, `qwen2`, ...).
    pub family: &'static str,
    /// Parameter count (as [`crate::ModelConfig::parameters`] counts them).
    pub parameters: u64,
    /// How the file stores its weights: a GGUF's `general.file_type` as llama.cpp names it
    /// (`Q4_K_M`), or a checkpoint's dtype (`BF16`); empty when the file does not say.
    pub quantization: String,
    /// Bytes on disk (a directory's weight files summed).
    pub size_bytes: u64,
    /// When the file (a directory's newest weight file) was last written.
    pub modified: Option<std::time::SystemTime>,
}

/// llama.cpp's name for a GGUF `general.file_type` (`llama_ftype`).
pub(crate) fn file_type_name(t: usize) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// Size and modification time of `files` together (the newest one's time).
pub(crate) fn disk_facts(files: &[&Path]) -> (u64, Option<std::time::SystemTime>) {
    let mut size = 0;
    let mut modified = None;
    for m in files.iter().filter_map(|f| std::fs::metadata(f).ok()) {
        size += m.len();
        modified = modified.max(m.modified().ok());
    }
    (size, modified)
}

pub struct LoadedModel {
    pub model: Model,
    pub assets: ModelAssets,
}

/// Where a model runs, as the user names it: `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
/// Parsed when the configuration is read; [`DeviceSpec::open`] makes the device when the
/// model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = RunnerError;

    fn from_str(spec: &str) -> Result<Self> {
        let (kind, ordinal) = match spec.split_once(':') {
            Some((k, n)) => {
                let n = n
                    .parse::<usize>()
                    .map_err(|_| RunnerError::Device(spec.into(), "bad device ordinal".into()))?;
                (k, n)
            }
            None => (spec, 0),
        };
        match kind {
            "cpu" if ordinal == 0 => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(ordinal)),
            "metal" => Ok(DeviceSpec::Metal(ordinal)),
            _ => Err(RunnerError::Device(
                spec.into(),
                "expected cpu, cuda[:N] or metal[:N]".into(),
            )),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(0) => f.write_str("cuda"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(0) => f.write_str("metal"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The device. CUDA and Metal need the cargo feature of the same name; without it,
    /// selecting them is a clear error, not a silent CPU fallback.
    pub fn open(self) -> Result<Device> {
        let dev = match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n),
            DeviceSpec::Metal(n) => Device::new_metal(n),
        };
        dev.map_err(|e| RunnerError::Device(self.to_string(), e.to_string()))
    }
}

/// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`, opened (see [`DeviceSpec`]).
pub fn parse_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

/// The format the runner computes a GGUF file's linear layers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored in the file.
    #[default]
    Native,
    /// Dequantized and re-quantized to Q8_0 (the packed kernels; more memory).
    Q8_0,
    /// Dequantized to dense f32.
    F32,
}

impl WeightFormat {
    const NAMES: [(Self, &'static str); 3] = [
        (Self::Native, "native"),
        (Self::Q8_0, "q8_0"),
        (Self::F32, "f32"),
    ];
}

impl std::str::FromStr for WeightFormat {
    type Err = RunnerError;

    fn from_str(s: &str) -> Result<Self> {
        named(&Self::NAMES, s).ok_or_else(|| {
            RunnerError::Unsupported(format!(
                "weight format {s:?} (expected {})",
                one_of(&Self::NAMES)
            ))
        })
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(name(&Self::NAMES, *self))
    }
}

/// The value called `s` in an enum's table of names.
fn named<T: Copy>(names: &[(T, &str)], s: &str) -> Option<T> {
    names.iter().find(|(_, n)| *n == s).map(|(v, _)| *v)
}

/// The name of `value` in an enum's table of names (which lists every value).
fn name<T: Copy + PartialEq>(names: &[(T, &'static str)], value: T) -> &'static str {
    names
        .iter()
        .find(|(v, _)| *v == value)
        .map_or("", |(_, n)| n)
}

/// The names as a list for an error message: `a, b or c`.
fn one_of<T>(names: &[(T, &str)]) -> String {
    let names: Vec<&str> = names.iter().map(|(_, n)| *n).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub weight_format: WeightFormat,
    /// Activations, KV cache and dense weights of a Hugging Face model: f32, bf16 or f16.
    /// `None`: f32 on the CPU, bf16 on a GPU. GGUF models compute in f32.
    pub dtype: Option<DType>,
    /// Compute with candle tensors even where the host path would run (tests compare the
    /// two paths).
    #[doc(hidden)]
    pub tensor_path: bool,
    /// The widest CPU kernels to run: for the whole process, since every kernel set gives
    /// the same bits (see `crate::cpu`).
    pub simd: crate::SimdLimit,
}

/// What a Hugging Face model computes in: `auto` (f32 on the CPU, bf16 on a GPU), `f32`,
/// `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl DTypeSpec {
    const NAMES: [(Self, &'static str); 4] = [
        (Self::Auto, "auto"),
        (Self::F32, "f32"),
        (Self::Bf16, "bf16"),
        (Self::F16, "f16"),
    ];

    /// The dtype; `None` for `auto`.
    pub fn dtype(self) -> Option<DType> {
        match self {
            DTypeSpec::Auto => None,
            DTypeSpec::F32 => Some(DType::F32),
            DTypeSpec::Bf16 => Some(DType::BF16),
            DTypeSpec::F16 => Some(DType::F16),
        }
    }
}

impl std::str::FromStr for DTypeSpec {
    type Err = RunnerError;

    fn from_str(spec: &str) -> Result<Self> {
        named(&Self::NAMES, spec).ok_or_else(|| {
            RunnerError::Unsupported(format!(
                "dtype {spec:?} (expected {})",
                one_of(&Self::NAMES)
            ))
        })
    }
}

impl std::fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(name(&Self::NAMES, *self))
    }
}

/// `auto`, `f32`, `bf16` or `f16` (see [`DTypeSpec`]).
pub fn parse_dtype(spec: &str) -> Result<Option<DType>> {
    Ok(spec.parse::<DTypeSpec>()?.dtype())
}

/// Where the weights go and what the forward computes in.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub device: Device,
    pub dtype: DType,
    /// The host path: plain memory, Wick's kernels, an f16 KV cache.
    pub host: bool,
    pub format: WeightFormat,
}

/// Loads a GGUF file, or a Hugging Face directory, onto `device`.
pub fn load(path: &Path, device: &Device, opts: &LoadOptions) -> Result<LoadedModel> {
    crate::cpu::set_limit(opts.simd);
    let (dtype, is_dir) = if path.is_dir() {
        if !path.join("config.json").exists() {
            return Err(RunnerError::NotAModel {
                path: path.to_path_buf(),
            });
        }
        let d = opts.dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        });
        (d, true)
    } else if path.exists() {
        if opts.dtype.is_some_and(|d| d != DType::F32) {
            return Err(RunnerError::Unsupported(
                "a dtype other than f32 for a GGUF model (its quantized kernels take f32 activations)".into(),
            ));
        }
        (DType::F32, false)
    } else {
        return Err(RunnerError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    };
    let place = Placement {
        device: device.clone(),
        dtype,
        host: device.is_cpu() && dtype == DType::F32 && !opts.tensor_path,
        format: opts.weight_format,
    };
    let (cfg, weights, assets) = if is_dir {
        hf::load(path, &place)?
    } else {
        gguf::load(path, &place)?
    };
    let tokens = assets.tokenizer.get_vocab_size(true);
    if tokens > cfg.vocab_size {
        return Err(RunnerError::invalid(
            path,
            format!(
                "the tokenizer's vocabulary has {tokens} tokens but the embedding only {} rows: \
                 the file's tokenizer and weights do not belong together",
                cfg.vocab_size
            ),
        ));
    }
    if let Some(id) = assets
        .stop_token_ids
        .iter()
        .find(|&&id| id as usize >= tokens)
    {
        return Err(RunnerError::invalid(
            path,
            format!("stop token id {id} is past the vocabulary of {tokens} tokens"),
        ));
    }
    Ok(LoadedModel {
        model: Model::new(cfg, weights, (place.device, place.dtype, place.host))?,
        assets,
    })
}

/// The tokenizer, template and stop tokens of a model, without loading its weights.
pub fn load_assets(path: &Path) -> Result<ModelAssets> {
    if path.is_dir() {
        hf::load_assets(path)
    } else {
        gguf::load_assets(path)
    }
}

/// The name of a model from its path.
fn model_name(path: &Path, file: bool) -> String {
    let n = if file {
        path.file_stem()
    } else {
        path.file_name()
    };
    n.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_round_trip_and_bad_ones_list_the_choices() {
        for (v, n) in WeightFormat::NAMES {
            assert_eq!(v.to_string(), n);
            assert_eq!(n.parse::<WeightFormat>().unwrap(), v);
        }
        for (v, n) in DTypeSpec::NAMES {
            assert_eq!(v.to_string(), n);
            assert_eq!(n.parse::<DTypeSpec>().unwrap(), v);
        }
        for d in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Metal(3)] {
            assert_eq!(d.to_string().parse::<DeviceSpec>().unwrap(), d);
        }
        let e = "q4".parse::<WeightFormat>().unwrap_err().to_string();
        assert!(e.ends_with("(expected native, q8_0 or f32)"), "{e}");
        let e = "f64".parse::<DTypeSpec>().unwrap_err().to_string();
        assert!(e.ends_with("(expected auto, f32, bf16 or f16)"), "{e}");
    }
}
