//! A GGUF file: its metadata and tensor directory, read with a bound on every count and length
//! (a malformed file is an error naming the problem, never a huge allocation or a panic), and
//! tensor data read on demand by name.

mod write;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use write::write_tokenizer_gguf;
#[cfg(any(test, feature = "testing"))]
pub use write::{GgufWriter, WriteValue};

use crate::quant::{ggml_type_name, WeightType};
use crate::{Result, RunnerError};

const MAGIC: &[u8; 4] = b"GGUF";
/// Dimensions a tensor may have.
const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer that is non-negative and fits a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Floats, and integers as floats.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor is and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// ggml order: `dims[0]` is the row length (columns), `dims[1]` the number of rows.
    pub dims: Vec<usize>,
    pub ty: WeightType,
    /// From the start of the data section.
    pub offset: u64,
    pub bytes: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order (read by the tests' fixtures, which rewrite files).
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub order: Vec<String>,
    data_start: u64,
}

/// Reads with a running count of bytes, so that every length can be checked against what
/// the file still holds.
struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| RunnerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| RunnerError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let bad = |m: String| RunnerError::invalid(path, m);
        let mut c = Cursor {
            r: BufReader::with_capacity(
                1 << 16,
                file.try_clone().map_err(|source| RunnerError::Io {
                    path: path.to_path_buf(),
                    source,
                })?,
            ),
            pos: 0,
            len,
        };
        let io = |e: std::io::Error| bad(format!("not a GGUF file (truncated header: {e})"));
        let magic = c.bytes::<4>().map_err(io)?;
        if &magic != MAGIC {
            return Err(bad("not a GGUF file (no GGUF magic number)".into()));
        }
        let version = u32::from_le_bytes(c.bytes().map_err(io)?);
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} (2 and 3 are supported)"
            )));
        }
        let n_tensors = u64::from_le_bytes(c.bytes().map_err(io)?);
        let n_kv = u64::from_le_bytes(c.bytes().map_err(io)?);
        // Each entry takes at least 8 + 4 bytes (a length and a type), so a count beyond
        // the file's size is malformed.
        if n_kv > c.left() / 12 || n_tensors > c.left() / 24 {
            return Err(bad(format!(
                "header counts ({n_kv} metadata entries, {n_tensors} tensors) exceed the file's size"
            )));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = read_string(&mut c).map_err(|e| bad(format!("metadata: {e}")))?;
            let ty = u32::from_le_bytes(c.bytes().map_err(io)?);
            let value =
                read_value(&mut c, ty, 0).map_err(|e| bad(format!("metadata {key}: {e}")))?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(bad(format!(
                        "general.alignment {v:?} is not a power of two between 1 and 2^20"
                    )))
                }
            },
        };
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..n_tensors {
            let name = read_string(&mut c).map_err(|e| bad(format!("tensor directory: {e}")))?;
            let n_dims = u32::from_le_bytes(c.bytes().map_err(io)?) as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = u64::from_le_bytes(c.bytes().map_err(io)?);
                dims.push(
                    usize::try_from(d).map_err(|_| bad(format!("tensor {name}: dimension {d}")))?,
                );
            }
            let type_id = u32::from_le_bytes(c.bytes().map_err(io)?);
            let offset = u64::from_le_bytes(c.bytes().map_err(io)?);
            let ty = WeightType::from_ggml(type_id).ok_or_else(|| {
                RunnerError::Unsupported(format!(
                    "tensor {name} in {} has type {} (supported: {})",
                    path.display(),
                    ggml_type_name(type_id),
                    WeightType::ALL.map(|t| t.name()).join(", ")
                ))
            })?;
            let elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&e| e as u64 <= len.saturating_mul(8))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {name}: dimensions {dims:?} are too large for the file"
                    ))
                })?;
            let bytes = ty
                .bytes_for(elements)
                .filter(|_| dims[0].is_multiple_of(ty.block().0))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {name}: row length {} is not a multiple of {}'s block of {}",
                        dims[0],
                        ty,
                        ty.block().0
                    ))
                })?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "tensor {name}: offset {offset} is not aligned to {alignment}"
                )));
            }
            if tensors
                .insert(
                    name.clone(),
                    TensorInfo {
                        dims,
                        ty,
                        offset,
                        bytes,
                    },
                )
                .is_some()
            {
                return Err(bad(format!("tensor {name} appears twice")));
            }
            order.push(name);
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        for name in &order {
            let t = &tensors[name];
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes as u64));
            if end.is_none_or(|e| e > len) {
                return Err(bad(format!(
                    "tensor {name} ({} bytes at offset {}) runs past the end of the file ({len} bytes): truncated?",
                    t.bytes, t.offset
                )));
            }
        }
        // Each tensor's bytes, as its type and shape size them, are its own: a region that
        // runs into the next tensor's means a wrong type or shape in the directory.
        let mut by_offset: Vec<&String> = order.iter().collect();
        by_offset.sort_by_key(|n| tensors[*n].offset);
        for pair in by_offset.windows(2) {
            let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
            if a.offset + a.bytes as u64 > b.offset {
                return Err(bad(format!(
                    "tensor {} ({}, {:?}: {} bytes at offset {}) overlaps tensor {} at offset {}: \
                     its type or shape is wrong",
                    pair[0], a.ty, a.dims, a.bytes, a.offset, pair[1], b.offset
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata,
            tensors,
            order,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| RunnerError::invalid(&self.path, format!("missing tensor {name}")))
    }

    /// The raw bytes of tensor `name`.
    pub fn read(&mut self, name: &str) -> Result<Vec<u8>> {
        let t = self.info(name)?.clone();
        let mut buf = vec![0u8; t.bytes];
        let path = self.path.clone();
        let io = |source| RunnerError::Io {
            path: path.clone(),
            source,
        };
        self.file
            .seek(SeekFrom::Start(self.data_start + t.offset))
            .map_err(io)?;
        self.file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// A 1-D tensor (a norm weight, a bias) as f32.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.info(name)?.clone();
        if t.elements() != len {
            return Err(RunnerError::invalid(
                &self.path,
                format!(
                    "tensor {name} has {} elements, expected {len}",
                    t.elements()
                ),
            ));
        }
        let data = self.read(name)?;
        let mut out = vec![0f32; len];
        t.ty.dequantize(&data, &mut out);
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn wrong(&self, key: &str, what: &str) -> RunnerError {
        RunnerError::invalid(
            &self.path,
            format!(
                "metadata {key} is {:?}, expected {what}",
                self.metadata.get(key)
            ),
        )
    }

    /// A non-negative integer, if the key is present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer")),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| RunnerError::invalid(&self.path, format!("missing metadata {key}")))
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f32()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a finite number")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string")),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Nesting allowed for arrays of arrays.
const MAX_DEPTH: usize = 2;

fn read_string<R: Read>(c: &mut Cursor<R>) -> std::result::Result<String, String> {
    let n = u64::from_le_bytes(c.bytes().map_err(|e| e.to_string())?);
    if n > c.left() {
        return Err(format!("a string of {n} bytes exceeds the file"));
    }
    let mut buf = vec![0u8; n as usize];
    c.r.read_exact(&mut buf).map_err(|e| e.to_string())?;
    c.pos += n;
    String::from_utf8(buf).map_err(|_| "a string is not UTF-8".to_string())
}

fn read_value<R: Read>(
    c: &mut Cursor<R>,
    ty: u32,
    depth: usize,
) -> std::result::Result<Value, String> {
    let e = |e: std::io::Error| e.to_string();
    Ok(match ty {
        0 => Value::U8(u8::from_le_bytes(c.bytes().map_err(e)?)),
        1 => Value::I8(i8::from_le_bytes(c.bytes().map_err(e)?)),
        2 => Value::U16(u16::from_le_bytes(c.bytes().map_err(e)?)),
        3 => Value::I16(i16::from_le_bytes(c.bytes().map_err(e)?)),
        4 => Value::U32(u32::from_le_bytes(c.bytes().map_err(e)?)),
        5 => Value::I32(i32::from_le_bytes(c.bytes().map_err(e)?)),
        6 => Value::F32(f32::from_le_bytes(c.bytes().map_err(e)?)),
        7 => Value::Bool(u8::from_le_bytes(c.bytes().map_err(e)?) != 0),
        8 => Value::String(read_string(c)?),
        9 => {
            if depth >= MAX_DEPTH {
                return Err("arrays nested too deeply".into());
            }
            let item = u32::from_le_bytes(c.bytes().map_err(e)?);
            let n = u64::from_le_bytes(c.bytes().map_err(e)?);
            // Every item takes at least one byte.
            if n > c.left() {
                return Err(format!("an array of {n} items exceeds the file"));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(read_value(c, item, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(u64::from_le_bytes(c.bytes().map_err(e)?)),
        11 => Value::I64(i64::from_le_bytes(c.bytes().map_err(e)?)),
        12 => Value::F64(f64::from_le_bytes(c.bytes().map_err(e)?)),
        other => return Err(format!("unknown value type {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, f: impl FnOnce(&mut GgufWriter)) {
        let mut w = GgufWriter::new();
        f(&mut w);
        w.write(path).unwrap();
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        write(&p, |w| {
            w.meta("general.architecture", Value::String("llama".into()));
            w.meta("x.count", Value::U32(7));
            w.meta(
                "x.list",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            );
            w.meta("x.f", Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]));
            w.tensor_f32("v", &[3], &[1.0, 2.0, 3.0]);
            w.tensor_f32("m", &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        });
        let mut g = GgufFile::open(&p).unwrap();
        assert_eq!(
            g.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(g.get("x.count").unwrap().as_u64(), Some(7));
        assert_eq!(g.get("x.list").unwrap().as_array().unwrap().len(), 2);
        assert_eq!(g.vector("v", 3).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(g.info("m").unwrap().dims, vec![2, 2]);
        assert_eq!(g.order, vec!["v", "m"]);
        assert!(g
            .vector("v", 4)
            .unwrap_err()
            .to_string()
            .contains("expected 4"));
    }

    #[test]
    fn malformed_files_are_errors_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        write(&p, |w| {
            w.meta("general.architecture", Value::String("llama".into()));
            w.tensor_f32("v", &[64], &[0.0; 64]);
        });
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8], needle: &str| {
            let q = dir.path().join("b.gguf");
            std::fs::write(&q, bytes).unwrap();
            let err = GgufFile::open(&q).err().expect("an error").to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        };
        check(&good[..good.len() - 10], "truncated");
        check(b"GGML0000", "magic");
        check(&good[..20], "truncated header");
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
        check(&huge, "exceed");
        let q = dir.path().join("c.gguf");
        write(&q, |w| {
            w.meta("general.alignment", Value::U32(0));
        });
        let err = GgufFile::open(&q).err().unwrap().to_string();
        assert!(err.contains("alignment"), "{err}");
        // An unknown tensor type names the tensor and the type.
        let r = dir.path().join("d.gguf");
        write(&r, |w| w.raw_tensor("w", &[32, 2], 23, &[0u8; 64]));
        let err = GgufFile::open(&r).err().unwrap().to_string();
        assert!(err.contains("tensor w") && err.contains("IQ4_XS"), "{err}");
    }

    /// A small well-formed file: metadata of every kind, tensors of two types.
    fn sample_file() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.gguf");
        write(&p, |w| {
            w.meta("general.architecture", Value::String("llama".into()));
            w.meta("llama.block_count", Value::U32(2));
            w.meta("x.i64", Value::I64(-5));
            w.meta("x.f64", Value::F64(0.25));
            w.meta("x.bool", Value::Bool(true));
            w.meta(
                "x.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
            );
            w.meta(
                "x.nested",
                Value::Array(vec![Value::Array(vec![Value::U8(1), Value::I16(-2)])]),
            );
            w.tensor_f32("v", &[8], &[0.5; 8]);
            w.raw_tensor("q", &[32, 2], WeightType::Q8_0.ggml_id(), &[1u8; 68]);
        });
        std::fs::read(&p).unwrap()
    }

    /// What a mutated file may do: open or fail, and once open, read every tensor or fail;
    /// never panic, never allocate past the file's size.
    fn open_and_read(bytes: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        if let Ok(mut g) = GgufFile::open(&p) {
            for name in g.order.clone() {
                let info = g.info(&name).unwrap().clone();
                assert!(info.bytes as u64 <= bytes.len() as u64);
                if let Ok(data) = g.read(&name) {
                    assert_eq!(data.len(), info.bytes);
                }
                let _ = g.vector(&name, info.elements());
            }
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn mutated_files_open_or_fail_cleanly(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = sample_file();
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            open_and_read(&bytes);
        }

        #[test]
        fn counts_and_lengths_overwritten_open_or_fail_cleanly(
            at in any::<prop::sample::Index>(),
            value in prop_oneof![
                any::<u64>(),
                Just(u64::MAX),
                Just(1u64 << 32),
                Just(1u64 << 40),
                0u64..300,
            ],
        ) {
            // Any 8 bytes, as a count, a length, a dimension or an offset would be.
            let mut bytes = sample_file();
            let i = at.index(bytes.len() - 8);
            bytes[i..i + 8].copy_from_slice(&value.to_le_bytes());
            open_and_read(&bytes);
        }

        #[test]
        fn truncated_files_open_or_fail_cleanly(at in any::<prop::sample::Index>()) {
            let bytes = sample_file();
            open_and_read(&bytes[..at.index(bytes.len())]);
        }
    }
}
