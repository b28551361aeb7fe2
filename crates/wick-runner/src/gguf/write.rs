//! Writing GGUF files: a model's tokenizer alone ([`write_tokenizer_gguf`]), and the tests'
//! tiny random models and their malformed variants.

use std::io::Write;
use std::path::Path;

use super::{GgufFile, Value};
use crate::{Result, RunnerError};

/// Writes the `tokenizer.*` metadata of the GGUF file `model` (no tensors) as the GGUF file
/// `out`: a tokenizer other tools (and the tiny test models) can load on its own.
pub fn write_tokenizer_gguf(model: &Path, out: &Path) -> Result<()> {
    let g = GgufFile::open(model)?;
    let mut w = GgufWriter::new();
    let mut keys: Vec<_> = g
        .metadata
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    keys.sort();
    for k in keys {
        w.meta(k, g.metadata[k].clone());
    }
    w.write(out).map_err(|source| RunnerError::Write {
        path: out.to_path_buf(),
        source,
    })
}

/// A metadata value to write (the reader's [`Value`]).
#[cfg(any(test, feature = "testing"))]
pub type WriteValue = Value;

const ALIGNMENT: usize = 32;

/// Collects metadata and tensors, then writes them as one GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` (replacing an earlier value).
    pub fn meta(&mut self, key: &str, value: Value) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value));
    }

    /// An f32 tensor; `dims` in ggml order (row length first).
    #[cfg(any(test, feature = "testing"))]
    pub fn tensor_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw_tensor(name, dims, 0, &bytes);
    }

    /// A tensor of ggml type `type_id` from its encoded bytes.
    #[cfg(any(test, feature = "testing"))]
    pub fn raw_tensor(&mut self, name: &str, dims: &[usize], type_id: u32, bytes: &[u8]) {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id, bytes.to_vec()));
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len()).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        let start = out.len();
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off, 0);
            out.extend_from_slice(bytes);
        }
        out.resize(start + offset, 0);
        std::fs::File::create(path)?.write_all(&out)
    }
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let item_ty = items.first().map(type_id).unwrap_or(4);
            out.extend_from_slice(&item_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}
