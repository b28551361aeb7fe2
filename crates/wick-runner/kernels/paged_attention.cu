// Paged attention for every query token of a step in one launch per layer (plus one
// combining launch), reading keys and values straight from the paged KV cache through the
// block table: no gather, no copy, no broadcast of KV heads.
//
// Layout (see src/paged/mod.rs, whose CPU reference computes the same arithmetic):
//   q            [tokens, num_heads, head_dim]        the step's rotated queries
//   k/v cache    [slots, num_kv_heads * head_dim]     slot of position p of sequence s:
//                block_tables[s * max_blocks + p / block_size] * block_size + p % block_size
//   token_seq    [tokens]  the sequence of each query token (its row of block_tables)
//   positions    [tokens]  the position of each query token; it attends to positions
//                          max(0, pos + 1 - window) ..= pos (window 0: no window)
//
// Pass 1 (`partial`) splits each query's context into partitions of PARTITION positions,
// as flash-decoding does, so a long decode spreads over many blocks: one block per (query
// token, KV head, partition), one warp per query head of the KV head's group, each lane
// holding head_dim / 32 consecutive dimensions. Keys are visited in position order with an
// online softmax in f32. Pass 2 (`combine`) merges a query's partitions in partition order.
//
// Prefill chunks (`prefill`) tile up to TILE consecutive queries of one sequence per block,
// one warp per query, for one query head: each chunk of KCHUNK keys and values is read once
// into shared memory for the whole tile, and each warp walks the keys of its own causal
// range in the same order, with the same operations, as the decode kernel: a query gets the
// same bits from either kernel. Steps where every sequence decodes use `partial`; steps with
// a prompt chunk use `prefill` for all their queries (a decoding sequence is a tile of one).
//
// Every query's arithmetic depends only on its own position and context, never on the
// batch: partition size and reduction order are fixed, and a query reads only the
// partitions up to its position. That is what batch invariance needs. Built with
// --fmad=false, so that no multiply and add is fused unless written as fmaf (the CPU
// reference uses mul_add at exactly those places).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define PARTITION 256
#define TILE 8
#define KCHUNK 16

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One key of the online softmax: `k` and `v` point at this lane's D dimensions.
template <typename T, int D>
__device__ __forceinline__ void step(const float *qv, const T *k, const T *v, float scale,
                                     float softcap, float &m, float &l, float *acc) {
  float s = 0.f;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    s = fmaf(qv[d], to_f32(k[d]), s);
  }
  // A butterfly: every lane ends with the same bits (each addition is commutative).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  s *= scale;
  // The layer's soft-cap of the scaled score (Gemma 2), where set (0: none).
  if (softcap > 0.f) {
    s = softcap * tanhf(s / softcap);
  }
  const float m_new = fmaxf(m, s);
  const float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
  const float e = expf(s - m_new);
  l = fmaf(l, corr, e);
#pragma unroll
  for (int d = 0; d < D; ++d) {
    acc[d] = fmaf(e, to_f32(v[d]), acc[d] * corr);
  }
  m = m_new;
}

template <int D>
__device__ __forceinline__ void store_partial(float *part_acc, float *part_ml, size_t base,
                                              int lane, float m, float l, const float *acc) {
#pragma unroll
  for (int d = 0; d < D; ++d) {
    part_acc[base * (D * 32) + lane * D + d] = acc[d];
  }
  if (lane == 0) {
    part_ml[base * 2] = m;
    part_ml[base * 2 + 1] = l;
  }
}

template <typename T, int D>
__device__ void partial(const T *__restrict__ q, const T *__restrict__ k_cache,
                        const T *__restrict__ v_cache, const uint32_t *__restrict__ block_tables,
                        const uint32_t *__restrict__ token_seq,
                        const uint32_t *__restrict__ positions, float *__restrict__ part_acc,
                        float *__restrict__ part_ml, int num_heads, int num_kv_heads,
                        int max_blocks, int block_size, int window, int parts, float scale,
                        float softcap) {
  const int t = blockIdx.x, g = blockIdx.y, p = blockIdx.z;
  const int hd = D * 32;
  const int group = num_heads / num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int pos = (int)positions[t];
  if (p * PARTITION > pos) {
    return;  // past this query: combine never reads it
  }
  const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
  const int begin = max(lo, p * PARTITION);
  const int end = min(pos + 1, (p + 1) * PARTITION);
  const uint32_t *bt = block_tables + (size_t)token_seq[t] * max_blocks;
  const size_t kv_row = (size_t)num_kv_heads * hd;
  for (int hh = warp; hh < group; hh += warps) {
    const int h = g * group + hh;
    const T *qp = q + ((size_t)t * num_heads + h) * hd + lane * D;
    float qv[D], acc[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      qv[d] = to_f32(qp[d]);
      acc[d] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = begin; j < end; ++j) {
      const size_t slot = (size_t)bt[j / block_size] * block_size + j % block_size;
      const size_t off = slot * kv_row + (size_t)g * hd + lane * D;
      step<T, D>(qv, k_cache + off, v_cache + off, scale, softcap, m, l, acc);
    }
    store_partial<D>(part_acc, part_ml, ((size_t)t * num_heads + h) * parts + p, lane, m, l, acc);
  }
}

template <typename T, int D>
__device__ void prefill(const T *__restrict__ q, const T *__restrict__ k_cache,
                        const T *__restrict__ v_cache, const uint32_t *__restrict__ block_tables,
                        const uint32_t *__restrict__ token_seq,
                        const uint32_t *__restrict__ positions,
                        const uint32_t *__restrict__ tiles, float *__restrict__ part_acc,
                        float *__restrict__ part_ml, int num_heads, int num_kv_heads,
                        int max_blocks, int block_size, int window, int parts, float scale,
                        float softcap) {
  __shared__ T ks[KCHUNK * D * 32];
  __shared__ T vs[KCHUNK * D * 32];
  const int h = blockIdx.y, p = blockIdx.z;
  const int t0 = (int)tiles[2 * blockIdx.x], n = (int)tiles[2 * blockIdx.x + 1];
  const int hd = D * 32;
  const int g = h / (num_heads / num_kv_heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int first = (int)positions[t0], last = (int)positions[t0 + n - 1];
  if (p * PARTITION > last) {
    return;  // past every query of the tile
  }
  const int lo_first = window > 0 ? max(0, first + 1 - window) : 0;
  const int block_begin = max(lo_first, p * PARTITION);
  const int block_end = min(last + 1, (p + 1) * PARTITION);
  const uint32_t *bt = block_tables + (size_t)token_seq[t0] * max_blocks;
  const size_t kv_row = (size_t)num_kv_heads * hd;
  // This warp's query, if the tile has one for it and the partition is not past it.
  const int t = t0 + warp;
  const bool active = warp < n && p * PARTITION <= (int)positions[min(t, t0 + n - 1)];
  const int pos = warp < n ? (int)positions[t] : -1;
  const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
  const int begin = max(lo, p * PARTITION), end = min(pos + 1, (p + 1) * PARTITION);
  float qv[D], acc[D];
  if (active) {
    const T *qp = q + ((size_t)t * num_heads + h) * hd + lane * D;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      qv[d] = to_f32(qp[d]);
      acc[d] = 0.f;
    }
  }
  float m = -INFINITY, l = 0.f;
  for (int c0 = block_begin; c0 < block_end; c0 += KCHUNK) {
    for (int i = threadIdx.x; i < KCHUNK * hd; i += blockDim.x) {
      const int j = c0 + i / hd;
      if (j < block_end) {
        const size_t slot = (size_t)bt[j / block_size] * block_size + j % block_size;
        const size_t off = slot * kv_row + (size_t)g * hd + i % hd;
        ks[i] = k_cache[off];
        vs[i] = v_cache[off];
      }
    }
    __syncthreads();
    if (active) {
      const int jb = max(c0, begin), je = min(c0 + KCHUNK, end);
      for (int j = jb; j < je; ++j) {
        const int off = (j - c0) * hd + lane * D;
        step<T, D>(qv, ks + off, vs + off, scale, softcap, m, l, acc);
      }
    }
    __syncthreads();
  }
  if (active) {
    store_partial<D>(part_acc, part_ml, ((size_t)t * num_heads + h) * parts + p, lane, m, l, acc);
  }
}

template <typename T>
__device__ void combine(const float *__restrict__ part_acc, const float *__restrict__ part_ml,
                        const uint32_t *__restrict__ positions, T *__restrict__ out,
                        int num_heads, int head_dim, int parts) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int n = min(parts, (int)positions[t] / PARTITION + 1);
  const size_t base = ((size_t)t * num_heads + h) * parts;
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) {
    mx = fmaxf(mx, part_ml[(base + i) * 2]);
  }
  float total = 0.f;
  for (int i = 0; i < n; ++i) {
    total += part_ml[(base + i) * 2 + 1] * expf(part_ml[(base + i) * 2] - mx);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float a = 0.f;
    for (int i = 0; i < n; ++i) {
      a += part_acc[(base + i) * head_dim + d] * expf(part_ml[(base + i) * 2] - mx);
    }
    out[((size_t)t * num_heads + h) * head_dim + d] = from_f32<T>(a / total);
  }
}

#define PARTIAL(TYPE, NAME, D)                                                                 \
  extern "C" __global__ void paged_attention_partial_##NAME##_d##D(                            \
      const TYPE *q, const TYPE *k_cache, const TYPE *v_cache, const uint32_t *block_tables,   \
      const uint32_t *token_seq, const uint32_t *positions, float *part_acc, float *part_ml,   \
      int num_heads, int num_kv_heads, int max_blocks, int block_size, int window, int parts,  \
      float scale, float softcap) {                                                            \
    partial<TYPE, D>(q, k_cache, v_cache, block_tables, token_seq, positions, part_acc,        \
                     part_ml, num_heads, num_kv_heads, max_blocks, block_size, window, parts,  \
                     scale, softcap);                                                          \
  }

#define PREFILL(TYPE, NAME, D)                                                                 \
  extern "C" __global__ void paged_attention_prefill_##NAME##_d##D(                            \
      const TYPE *q, const TYPE *k_cache, const TYPE *v_cache, const uint32_t *block_tables,   \
      const uint32_t *token_seq, const uint32_t *positions, const uint32_t *tiles,             \
      float *part_acc, float *part_ml, int num_heads, int num_kv_heads, int max_blocks,        \
      int block_size, int window, int parts, float scale, float softcap) {                     \
    prefill<TYPE, D>(q, k_cache, v_cache, block_tables, token_seq, positions, tiles, part_acc, \
                     part_ml, num_heads, num_kv_heads, max_blocks, block_size, window, parts,  \
                     scale, softcap);                                                          \
  }

#define COMBINE(TYPE, NAME)                                                                    \
  extern "C" __global__ void paged_attention_combine_##NAME(                                   \
      const float *part_acc, const float *part_ml, const uint32_t *positions, TYPE *out,       \
      int num_heads, int head_dim, int parts) {                                                \
    combine<TYPE>(part_acc, part_ml, positions, out, num_heads, head_dim, parts);              \
  }

#define FOR_DIMS(TYPE, NAME)                                                                   \
  PARTIAL(TYPE, NAME, 1)                                                                       \
  PREFILL(TYPE, NAME, 1)                                                                       \
  PARTIAL(TYPE, NAME, 2)                                                                       \
  PREFILL(TYPE, NAME, 2)                                                                       \
  PARTIAL(TYPE, NAME, 3)                                                                       \
  PREFILL(TYPE, NAME, 3)                                                                       \
  PARTIAL(TYPE, NAME, 4)                                                                       \
  PREFILL(TYPE, NAME, 4)                                                                       \
  PARTIAL(TYPE, NAME, 5)                                                                       \
  PREFILL(TYPE, NAME, 5)                                                                       \
  PARTIAL(TYPE, NAME, 6)                                                                       \
  PREFILL(TYPE, NAME, 6)                                                                       \
  PARTIAL(TYPE, NAME, 8)                                                                       \
  PREFILL(TYPE, NAME, 8)                                                                       \
  COMBINE(TYPE, NAME)

FOR_DIMS(float, f32)
FOR_DIMS(__half, f16)
FOR_DIMS(__nv_bfloat16, bf16)
