//! Launching Wick's CUDA kernels (built to PTX by `build.rs`).

use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaStorage, Layout, Result, Shape, Storage, Tensor};

use super::PagedAttention;

pub(crate) const ATTENTION_PTX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// The CUDA slice of a u32 tensor (the block tables), contiguous from its start.
pub(crate) fn u32_slice(t: &Tensor) -> Result<candle_core::cuda::cudarc::driver::CudaSlice<u32>> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        bail!("wick kernels: index tensors must be contiguous");
    }
    match &*storage {
        Storage::Cuda(CudaStorage {
            slice: CudaStorageSlice::U32(s),
            ..
        }) => Ok(s.clone()),
        _ => bail!("wick kernels: expected a u32 tensor on CUDA"),
    }
}

fn i32_arg(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("{what} {x} exceeds i32")))
}

pub(super) fn attention(
    op: &PagedAttention<'_>,
    (q, ql): (&CudaStorage, &Layout),
    k: &CudaStorage,
    v: &CudaStorage,
) -> Result<(CudaStorage, Shape)> {
    let dev = q.device.clone();
    let h = op.heads;
    let p = op.paged;
    let tokens = ql.dims()[0];
    let (nh, hd) = (h.num_heads, h.head_dim);
    let parts = p.parts.max(1);
    let (name, out) = match (&q.slice, &k.slice, &v.slice) {
        (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => (
            "f32",
            CudaStorageSlice::F32(dev.alloc_zeros::<f32>(tokens * nh * hd)?),
        ),
        (CudaStorageSlice::F16(_), CudaStorageSlice::F16(_), CudaStorageSlice::F16(_)) => (
            "f16",
            CudaStorageSlice::F16(dev.alloc_zeros(tokens * nh * hd)?),
        ),
        (CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_), CudaStorageSlice::BF16(_)) => (
            "bf16",
            CudaStorageSlice::BF16(dev.alloc_zeros(tokens * nh * hd)?),
        ),
        _ => bail!("paged attention: queries and caches must be all f32, f16 or bf16"),
    };
    if tokens == 0 {
        return Ok((
            CudaStorage {
                slice: out,
                device: dev,
            },
            ql.shape().clone(),
        ));
    }
    let acc = dev.alloc_zeros::<f32>(tokens * nh * parts * hd)?;
    let ml = dev.alloc_zeros::<f32>(tokens * nh * parts * 2)?;
    let (tables, token_seq, positions) = (
        u32_slice(&p.tables)?,
        u32_slice(&p.token_seq)?,
        u32_slice(&p.positions)?,
    );
    let ints = [
        i32_arg(nh, "heads")?,
        i32_arg(h.num_kv_heads, "KV heads")?,
        i32_arg(p.max_blocks, "blocks per sequence")?,
        i32_arg(p.block_size, "block size")?,
        i32_arg(h.window.unwrap_or(0), "window")?,
        i32_arg(parts, "partitions")?,
    ];
    let group = nh / h.num_kv_heads;
    // Decode steps: a block per (query, KV head, partition), a warp per head of the group.
    // Steps with a prompt chunk: a block per (tile of queries, head, partition).
    let (kernel, cfg) = match &p.tiles {
        None => (
            "partial",
            LaunchConfig {
                grid_dim: (tokens as u32, h.num_kv_heads as u32, parts as u32),
                block_dim: (32 * group.min(4) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
        Some(tiles) => (
            "prefill",
            LaunchConfig {
                grid_dim: (tiles.dim(0)? as u32, nh as u32, parts as u32),
                block_dim: (32 * super::TILE as u32, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    let func = dev.get_or_load_custom_func(
        &format!("paged_attention_{kernel}_{name}_d{}", hd / 32),
        "wick_paged_attention",
        ATTENTION_PTX,
    )?;
    let tiles = p.tiles.as_ref().map(u32_slice).transpose()?;
    let mut b = func.builder();
    match (&q.slice, &k.slice, &v.slice) {
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            b.arg(q).arg(k).arg(v);
        }
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
            b.arg(q).arg(k).arg(v);
        }
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            b.arg(q).arg(k).arg(v);
        }
        _ => unreachable!("dtypes matched above"),
    }
    b.arg(&tables).arg(&token_seq).arg(&positions);
    if let Some(tiles) = &tiles {
        b.arg(tiles);
    }
    b.arg(&acc).arg(&ml);
    for x in &ints {
        b.arg(x);
    }
    // 0 is the kernels' "no soft-cap" (a set cap is positive: ModelConfig::validate).
    let softcap = h.softcap.unwrap_or(0.0);
    b.arg(&h.scale).arg(&softcap);
    // SAFETY: the arguments follow the kernel's signature; every index it computes was
    // checked on the host (BlockTables::new, PagedAttention::check).
    unsafe { b.launch(cfg) }.w()?;

    let combine = dev.get_or_load_custom_func(
        &format!("paged_attention_combine_{name}"),
        "wick_paged_attention",
        ATTENTION_PTX,
    )?;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, nh as u32, 1),
        block_dim: (hd.min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (nh32, hd32, parts32) = (ints[0], i32_arg(hd, "head size")?, ints[5]);
    let mut b = combine.builder();
    b.arg(&acc).arg(&ml).arg(&positions);
    match &out {
        CudaStorageSlice::F32(o) => b.arg(o),
        CudaStorageSlice::F16(o) => b.arg(o),
        CudaStorageSlice::BF16(o) => b.arg(o),
        _ => unreachable!("allocated above"),
    };
    b.arg(&nh32).arg(&hd32).arg(&parts32);
    // SAFETY: as above; `out` holds tokens * heads * head_dim elements.
    unsafe { b.launch(cfg) }.w()?;
    Ok((
        CudaStorage {
            slice: out,
            device: dev,
        },
        ql.shape().clone(),
    ))
}
