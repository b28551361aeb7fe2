// Drawing the next token on the device: one block per row of f32 logits, only the chosen id
// comes back. src/paged/sample.rs holds the CPU reference of the same arithmetic, which the
// tests compare with Wick's host sampler (src/sampling.rs).
//
// Per row: the largest logit and its index (the first on ties; NaN never wins). With
// temperature <= 0 that index is the token. Otherwise weights w = exp((l - max) / T) (the
// host sampler's formula); top-k, min-p and top-p each become a threshold on w, found by
// bisection on the bits of a positive float (whose order is the integers' order) instead of
// a sort: top-k keeps w >= the k-th largest weight, min-p keeps w >= min_p (the largest
// weight is exp(0) = 1), top-p keeps the fewest largest weights whose sum reaches top_p of
// what is left. The draw walks the kept weights in index order: `u` (uniform in [0, 1),
// drawn on the host from the request's own generator) times their sum, located by a scan of
// each thread's contiguous chunk.
//
// Reductions run in one fixed order, so a row's token depends only on the row and `u`.

#include <stdint.h>

#define THREADS 512

// The block's sum of `x`, by a fixed tree (strides THREADS/2 .. 1).
template <typename V> __device__ V block_sum(V x, V *sh) {
  sh[threadIdx.x] = x;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const V r = sh[0];
  __syncthreads();
  return r;
}

// Weight of logit `l`, or 0 when it is below the threshold `tau`.
__device__ __forceinline__ float kept(float l, float mx, float inv_t, float tau) {
  const float w = expf((l - mx) * inv_t);
  return (w > 0.f && w >= tau) ? w : 0.f;
}

extern "C" __global__ void sample_rows(const float *__restrict__ logits, int vocab,
                                       const float *__restrict__ temperature,
                                       const uint32_t *__restrict__ top_k,
                                       const float *__restrict__ top_p,
                                       const float *__restrict__ min_p,
                                       const float *__restrict__ uniform,
                                       uint32_t *__restrict__ out) {
  __shared__ float shf[THREADS];
  __shared__ unsigned shu[THREADS];
  __shared__ int shi[THREADS];
  const int row = blockIdx.x;
  const float *l = logits + (size_t)row * vocab;
  const int chunk = (vocab + THREADS - 1) / THREADS;
  const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);

  // The largest logit, first index on ties.
  float best = -INFINITY;
  int best_i = 0x7fffffff;
  for (int i = lo; i < hi; ++i) {
    if (l[i] > best) {
      best = l[i];
      best_i = i;
    }
  }
  shf[threadIdx.x] = best;
  shi[threadIdx.x] = best_i;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float o = shf[threadIdx.x + s];
      const int oi = shi[threadIdx.x + s];
      if (o > shf[threadIdx.x] || (o == shf[threadIdx.x] && oi < shi[threadIdx.x])) {
        shf[threadIdx.x] = o;
        shi[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  const float mx = shf[0];
  const int arg = shi[0] == 0x7fffffff ? 0 : shi[0];
  __syncthreads();
  const float temp = temperature[row];
  if (temp <= 0.f || !(mx > -INFINITY)) {
    if (threadIdx.x == 0) out[row] = (uint32_t)arg;
    return;
  }
  const float inv_t = 1.f / temp;

  // Thresholds. The bisection looks for the largest bit pattern in [lo_bits, one] that
  // still satisfies the condition; it holds at lo_bits by construction.
  float tau = 0.f;
  const unsigned one = __float_as_uint(1.0f);
  const unsigned k = top_k[row];
  if (k > 0) {
    unsigned n = 0;
    for (int i = lo; i < hi; ++i) n += kept(l[i], mx, inv_t, 0.f) > 0.f;
    if (k < block_sum(n, shu)) {
      unsigned a = 1, b = one;  // count(w >= bits(a)) >= k holds for the smallest positive
      while (a < b) {
        const unsigned mid = a + (b - a + 1) / 2;
        const float x = __uint_as_float(mid);
        unsigned c = 0;
        for (int i = lo; i < hi; ++i) c += kept(l[i], mx, inv_t, x) > 0.f;
        if (block_sum(c, shu) >= k) a = mid; else b = mid - 1;
      }
      tau = __uint_as_float(a);
    }
  }
  if (min_p[row] > 0.f) tau = fmaxf(tau, min_p[row]);
  if (top_p[row] < 1.f) {
    float s = 0.f;
    for (int i = lo; i < hi; ++i) s += kept(l[i], mx, inv_t, tau);
    const float goal = top_p[row] * block_sum(s, shf);
    unsigned a = tau > 0.f ? __float_as_uint(tau) : 1, b = one;
    while (a < b) {
      const unsigned mid = a + (b - a + 1) / 2;
      const float x = __uint_as_float(mid);
      float c = 0.f;
      for (int i = lo; i < hi; ++i) c += kept(l[i], mx, inv_t, x);
      if (block_sum(c, shf) >= goal) a = mid; else b = mid - 1;
    }
    tau = __uint_as_float(a);
  }

  // The draw: each thread's chunk sum, an exclusive scan in thread order, then the thread
  // whose range holds r walks its chunk.
  float mine = 0.f;
  for (int i = lo; i < hi; ++i) mine += kept(l[i], mx, inv_t, tau);
  shf[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.f;
    for (int i = 0; i < THREADS; ++i) {
      const float v = shf[i];
      shf[i] = acc;
      acc += v;
    }
    shu[0] = __float_as_uint(acc);
    shi[0] = 0x7fffffff;
  }
  __syncthreads();
  const float total = __uint_as_float(shu[0]);
  float r = uniform[row] * total - shf[threadIdx.x];
  if (r >= 0.f && r < mine) {
    for (int i = lo; i < hi; ++i) {
      const float w = kept(l[i], mx, inv_t, tau);
      if (w > 0.f && r < w) {
        // Rounding of the scan can give two neighbouring threads r; the lower index wins.
        atomicMin(&shi[0], i);
        break;
      }
      r -= w;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int id = shi[0] == 0x7fffffff ? -1 : shi[0];
    if (id < 0) {
      // Rounding left r past every weight: the last kept token, as the host sampler does.
      for (int i = vocab - 1; i >= 0; --i) {
        if (kept(l[i], mx, inv_t, tau) > 0.f) {
          id = i;
          break;
        }
      }
    }
    out[row] = (uint32_t)(id < 0 ? arg : id);
  }
}
