// Flash-style prefix-LM attention for CUDA (sm80+, tensor cores through mma.sync): forward with
// log-sum-exp, a split-KV variant of the same kernel for decode, and a FlashAttention-2-style
// backward (one kernel for dK/dV, one for dQ, so nothing needs atomics).
//
// These are the CUDA implementations of the ops the CPU file defines (glm::attention_fwd,
// glm::attention_bwd, glm::attention_decode): same schema, same mask rule, same outputs, including
// `stats` = (row max, log2 of the softmax sum) in the log2 domain, which the backward uses to
// recompute the probabilities exactly as the forward formed them.
//
// Mask (see glm/attention.py): query row t of sample b sits at key index i = q_offset + t and sees
// key j iff  j < kv_len[b]  and  ( j == i  or  kv_start[b,t] <= j < hi ),
//            hi = causal ? max(i + 1, prefix_len[b,t]) : Tk.
// Every row sees one contiguous key range (plus its own key), so a block of rows visits only the
// key tiles inside the union of its rows' ranges, and masks only the tiles not inside all of them.
//
// Layout of the work: the rows of a block are (query position, head) pairs of ONE KV head: row
// R -> t = R / group, head = kv_head * group + R % group. With GQA/MQA a K/V tile loaded into shared
// memory then serves every query head that reads it (a decode step of GLM-4's 16-head groups fills
// one 16-row MMA tile from a single query token).
//
// Numerics: bf16/fp16 operands, fp32 accumulation; the softmax runs in the log2 domain in fp32.
// P and dS are rounded to the input dtype before their matrix products (as FlashAttention does and
// as plain bf16 PyTorch attention does for its second matmul).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace glm_kernels_cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kBN = 64;  // keys per tile (forward, dQ) and per dK/dV block

// ---------------------------------------------------------------------------------------------
// Problem description shared by every kernel. Strides in elements; last dims are unit-stride.
struct Params {
  const void *q, *k, *v;
  int64_t q_sb, q_sh, q_st;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  const int *prefix, *kv_start, *kv_len;  // [B, Tq], [B, Tq], [B]
  int B, n, g, group, Tq, Tk, d, rows;    // rows = group * Tq per (sample, KV head)
  int q_offset;
  bool causal;
  float scale, scale_log2;  // softmax scale, and scale * log2(e)
  // forward / decode outputs: out [B, n, Tq, d] (contiguous), lse [B, n, Tq], stats [B, n, Tq, 2]
  void* out;
  float *lse, *stats;
  // decode: splits along the keys; partial outputs [split, B, n, Tq, d] and (max, log2 sum)
  int num_splits, tiles_per_split;
  float *part_o, *part_ml;
  // backward
  const void* dout;  // [B, n, Tq, d] contiguous
  const float* delta;  // [B, n, Tq]: rowsum(dO * O) - grad_lse
  void *dq, *dk, *dv;  // dq like q (contiguous), dk/dv [B, g, Tk, d] contiguous
};

// Key range of one query row: visible iff lo <= j < hi, or j == own (own = -1: none).
struct Range {
  int lo, hi, own;
};

__device__ __forceinline__ Range row_range(const Params& p, int b, int t) {
  const int i = p.q_offset + t;
  const int kl = p.kv_len[b];
  const int lo = p.kv_start[b * p.Tq + t];
  int hi = p.causal ? max(i + 1, p.prefix[b * p.Tq + t]) : p.Tk;
  hi = min(hi, kl);
  return {lo, hi, i < kl ? i : -1};
}

__device__ __forceinline__ bool sees(const Range& r, int j) { return (j >= r.lo && j < r.hi) || j == r.own; }

// [first, end) of the keys a row sees at all (first >= end: none).
__device__ __forceinline__ void span(const Range& r, int& first, int& end) {
  first = INT_MAX;
  end = 0;
  if (r.lo < r.hi) first = r.lo, end = r.hi;
  if (r.own >= 0) first = min(first, r.own), end = max(end, r.own + 1);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core and copy primitives.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; bytes beyond src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
};

// Fragment addressing for m16n8k16 (row.col), in a row-major shared tile with row stride LD:
//   A operand, 16 rows x 16 cols at (r0, c0):                ldsm_x4  at a_ptr
//   B operand stored [n][k] (e.g. K as [key][d] for Q K^T): ldsm_x4  at bn_ptr, gives two n8 tiles
//   B operand stored [k][n] (e.g. V as [key][d] for P V):   ldsm_x4_t at a_ptr,  gives two n8 tiles
template <int LD, typename T>
__device__ __forceinline__ const T* a_ptr(const T* base, int r0, int c0, int lane) {
  return base + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8;
}
template <int LD, typename T>
__device__ __forceinline__ const T* bn_ptr(const T* base, int n0, int k0, int lane) {
  return base + (n0 + (lane >> 4) * 8 + (lane & 7)) * LD + k0 + ((lane >> 3) & 1) * 8;
}

// The C fragments of two adjacent n8 tiles (16 columns) as the A fragment of the next product.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Mma<T>::pack(c0[0], c0[1]);
  a[1] = Mma<T>::pack(c0[2], c0[3]);
  a[2] = Mma<T>::pack(c1[0], c1[1]);
  a[3] = Mma<T>::pack(c1[2], c1[3]);
}

// Copies `rows` rows of D elements (row r from base + r_off(r)) into a padded shared tile; rows
// beyond `valid_rows` and columns beyond d are zero-filled (so they add nothing to any product).
template <typename T, int D, int LD, int THREADS, typename RowOffset>
__device__ __forceinline__ void load_tile(T* dst, const T* base, int rows, int valid_rows, int d, RowOffset r_off) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < rows * CH; c += THREADS) {
    const int r = c / CH, col = (c % CH) * 8;
    const bool ok = r < valid_rows && col < d;
    const T* src = ok ? base + r_off(r) + col : base;
    cp_async16(dst + r * LD + col, src, ok);
  }
}

// Union of the key spans of a block's rows, and the bounds inside which a tile is visible to all of
// them (max lo, min hi): tiles there skip the masking.
struct BlockSpan {
  int first, end, max_lo, min_hi;
};

template <int BM, int THREADS>
__device__ BlockSpan block_span(const Params& p, int b, int row0, int* sh) {
  if (threadIdx.x == 0) sh[0] = INT_MAX, sh[1] = 0, sh[2] = INT_MIN, sh[3] = INT_MAX;
  __syncthreads();
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int R = row0 + r;
    if (R >= p.rows) continue;
    const Range x = row_range(p, b, R / p.group);
    int f, e;
    span(x, f, e);
    atomicMin(&sh[0], f);
    atomicMax(&sh[1], e);
    atomicMax(&sh[2], x.lo);
    atomicMin(&sh[3], x.hi);
  }
  __syncthreads();
  return {sh[0], sh[1], sh[2], sh[3]};
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid: x = row tile (heaviest first), y = b * g + kv_head, z = key split (decode).
// Each warp owns 16 rows; a lane holds rows gq and gq + 8 of them (the m16n8 C layout).

template <typename T, int D, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) fwd_kernel(const Params p) {
  constexpr int BM = 16 * WARPS, LD = D + 8, THREADS = WARPS * 32, NT = kBN / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LD;        // [2][kBN][LD]
  T* sV = sK + 2 * kBN * LD;   // [2][kBN][LD]
  __shared__ int sh[4];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tig = lane & 3;
  const int row0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int b = blockIdx.y / p.g, kvh = blockIdx.y % p.g, split = blockIdx.z;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  const BlockSpan bs = block_span<BM, THREADS>(p, b, row0, sh);
  int t_begin = bs.first / kBN, t_end = bs.first < bs.end ? (bs.end + kBN - 1) / kBN : t_begin;
  if (p.num_splits > 1) {
    t_begin = max(t_begin, split * p.tiles_per_split);
    t_end = min(t_end, (split + 1) * p.tiles_per_split);
  }

  // This thread's two rows.
  const int rA = row0 + warp * 16 + gq, rB = rA + 8;
  const Range xA = row_range(p, b, min(rA, p.rows - 1) / p.group);
  const Range xB = row_range(p, b, min(rB, p.rows - 1) / p.group);

  const int valid_rows = min(BM, p.rows - row0);
  load_tile<T, D, LD, THREADS>(sQ, q, BM, valid_rows, p.d, [&](int r) {
    const int R = row0 + r;
    return (kvh * p.group + R % p.group) * p.q_sh + (R / p.group) * p.q_st;
  });
  auto load_kv = [&](int tile, int buf) {
    const int j0 = tile * kBN, valid = min(kBN, p.Tk - j0);
    load_tile<T, D, LD, THREADS>(sK + buf * kBN * LD, k, kBN, valid, p.d, [&](int r) { return (j0 + r) * p.k_st; });
    load_tile<T, D, LD, THREADS>(sV + buf * kBN * LD, v, kBN, valid, p.d, [&](int r) { return (j0 + r) * p.v_st; });
  };
  if (t_begin < t_end) load_kv(t_begin, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) ldsm_x4(qf[ks], a_ptr<LD>(sQ, warp * 16, ks * 16, lane));

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int buf = (tile - t_begin) & 1;
    if (tile > t_begin) {
      cp_async_wait_all();
      __syncthreads();  // the tile is in, and every warp is done with the other buffer
    }
    if (tile + 1 < t_end) load_kv(tile + 1, buf ^ 1);
    cp_async_commit();
    const T* kt = sK + buf * kBN * LD;
    const T* vt = sV + buf * kBN * LD;

    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int n2 = 0; n2 < NT / 2; ++n2) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t bb[4];
        ldsm_x4(bb, bn_ptr<LD>(kt, n2 * 16, ks * 16, lane));
        Mma<T>::run(s[2 * n2], qf[ks], bb[0], bb[1]);
        Mma<T>::run(s[2 * n2 + 1], qf[ks], bb[2], bb[3]);
      }
    }

    const int j0 = tile * kBN;
    const bool full = j0 >= bs.max_lo && j0 + kBN <= bs.min_hi;
    float tmA = -INFINITY, tmB = -INFINITY;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + i * 8 + tig * 2 + (e & 1);
        float x = s[i][e] * p.scale_log2;
        if (!full && !sees(e < 2 ? xA : xB, j)) x = -INFINITY;
        s[i][e] = x;
      }
      tmA = fmaxf(tmA, fmaxf(s[i][0], s[i][1]));
      tmB = fmaxf(tmB, fmaxf(s[i][2], s[i][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      tmA = fmaxf(tmA, __shfl_xor_sync(0xffffffffu, tmA, off));
      tmB = fmaxf(tmB, __shfl_xor_sync(0xffffffffu, tmB, off));
    }
    const float nA = fmaxf(mA, tmA), nB = fmaxf(mB, tmB);
    // A row that has seen nothing yet keeps max -inf; subtract 0 then, so exp2 gives 0, not NaN.
    const float uA = nA == -INFINITY ? 0.f : nA, uB = nB == -INFINITY ? 0.f : nB;
    const float aA = exp2f(mA - uA), aB = exp2f(mB - uB);
    mA = nA, mB = nB;
    float sA = 0.f, sB = 0.f;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      s[i][0] = exp2f(s[i][0] - uA), s[i][1] = exp2f(s[i][1] - uA);
      s[i][2] = exp2f(s[i][2] - uB), s[i][3] = exp2f(s[i][3] - uB);
      sA += s[i][0] + s[i][1];
      sB += s[i][2] + s[i][3];
    }
    lA = lA * aA + sA;  // per-lane partial sums; the quad's are added at the end
    lB = lB * aB + sB;
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] *= aA, o[i][1] *= aA, o[i][2] *= aB, o[i][3] *= aB;

#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * ks], s[2 * ks + 1]);
#pragma unroll
      for (int n2 = 0; n2 < DT / 2; ++n2) {
        uint32_t bb[4];
        ldsm_x4_t(bb, a_ptr<LD>(vt, ks * 16, n2 * 16, lane));
        Mma<T>::run(o[2 * n2], a, bb[0], bb[1]);
        Mma<T>::run(o[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }
  }
  cp_async_wait_all();

#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  const float iA = lA > 0.f ? 1.f / lA : 0.f, iB = lB > 0.f ? 1.f / lB : 0.f;

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int R = half ? rB : rA;
    if (R >= p.rows) continue;
    const int t = R / p.group, h = kvh * p.group + R % p.group;
    const float inv = half ? iB : iA, m = half ? mB : mA, l = half ? lB : lA;
    const int64_t row = (static_cast<int64_t>(b) * p.n + h) * p.Tq + t;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + row * p.d;
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        const int c = i * 8 + tig * 2;
        if (c < p.d) {
          const uint32_t w = Mma<T>::pack(o[i][2 * half] * inv, o[i][2 * half + 1] * inv);
          *reinterpret_cast<uint32_t*>(out + c) = w;
        }
      }
      if (tig == 0) {
        const bool seen = l > 0.f;
        p.lse[row] = seen ? (m + log2f(l)) * kLn2 : -INFINITY;
        p.stats[2 * row] = seen ? m : -INFINITY;
        p.stats[2 * row + 1] = seen ? log2f(l) : 0.f;
      }
    } else {
      const int64_t prow = static_cast<int64_t>(split) * p.B * p.n * p.Tq + row;
      float* out = p.part_o + prow * p.d;
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        const int c = i * 8 + tig * 2;
        if (c < p.d) *reinterpret_cast<float2*>(out + c) = make_float2(o[i][2 * half] * inv, o[i][2 * half + 1] * inv);
      }
      if (tig == 0) {
        const bool seen = l > 0.f;
        p.part_ml[2 * prow] = seen ? m : -INFINITY;
        p.part_ml[2 * prow + 1] = seen ? log2f(l) : 0.f;
      }
    }
  }
}

// Merges the key splits of the decode kernel: one warp per row. Split s holds its normalised output
// O_s and (m_s, log2 l_s); the row's log2-sum-exp is M = log2 sum_s 2^(m_s + log2 l_s) and each
// split weighs 2^(m_s + log2 l_s - M).
template <typename T>
__global__ void combine_kernel(const Params p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.n * p.Tq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float M = -INFINITY, mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) {
    const float* ml = p.part_ml + 2 * (s * rows + row);
    if (ml[0] != -INFINITY) M = fmaxf(M, ml[0] + ml[1]), mx = fmaxf(mx, ml[0]);
  }
  float tot = 0.f;
  if (M != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) {
      const float* ml = p.part_ml + 2 * (s * rows + row);
      if (ml[0] != -INFINITY) tot += exp2f(ml[0] + ml[1] - M);
    }
  const float logtot = M != -INFINITY ? log2f(tot) : 0.f;  // ~0; folds the rounding of the weights in
  T* out = static_cast<T*>(p.out) + row * p.d;
  for (int c = lane; c < p.d; c += 32) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float* ml = p.part_ml + 2 * (s * rows + row);
      if (ml[0] != -INFINITY) acc += exp2f(ml[0] + ml[1] - M - logtot) * p.part_o[(s * rows + row) * p.d + c];
    }
    out[c] = Mma<T>::from_float(acc);
  }
  if (lane == 0) {
    const bool seen = M != -INFINITY;
    const float L = M + logtot;
    p.lse[row] = seen ? L * kLn2 : -INFINITY;
    p.stats[2 * row] = seen ? mx : -INFINITY;
    p.stats[2 * row + 1] = seen ? L - mx : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. delta = rowsum(dO * O) - grad_lse; then, with P recomputed from (max, log2 sum),
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale dS^T Q,  dQ = scale dS K.
// (The grad_lse term: d lse_i / d s_ij = P_ij, so it enters dS as + g_i P_ij.)

template <typename T>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ glse,
                             float* __restrict__ delta, int64_t rows, int d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float acc = 0.f;
  for (int c = lane; c < d; c += 32)
    acc += Mma<T>::to_float(dout[row * d + c]) * Mma<T>::to_float(out[row * d + c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc - glse[row];
}

// dK, dV: a block owns kBN keys of one KV head (each warp 16 of them) and walks the row tiles of
// every query head of the group that see any of those keys; the whole sum stays in registers.
template <typename T, int D>
__global__ void __launch_bounds__(128) bwd_dkdv_kernel(const Params p) {
  constexpr int WARPS = 4, THREADS = 128, BM = 32, LD = D + 8, DT = D / 8, NT = BM / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * LD;
  T* sQ = sV + kBN * LD;
  T* sO = sQ + BM * LD;  // dO
  __shared__ float sM[BM], sL[BM], sD[BM];
  __shared__ int sLo[BM], sHi[BM], sOwn[BM];
  static_assert(kBN == 16 * WARPS, "one 16-key slab per warp");

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tig = lane & 3;
  const int j0 = blockIdx.x * kBN;
  const int b = blockIdx.y / p.g, kvh = blockIdx.y % p.g;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* dout = static_cast<const T*>(p.dout);
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;
  const int valid_keys = min(kBN, p.Tk - j0);
  load_tile<T, D, LD, THREADS>(sK, k, kBN, valid_keys, p.d, [&](int r) { return (j0 + r) * p.k_st; });
  load_tile<T, D, LD, THREADS>(sV, v, kBN, valid_keys, p.d, [&](int r) { return (j0 + r) * p.v_st; });
  cp_async_commit();

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int kA = j0 + warp * 16 + gq, kB = kA + 8;

  for (int row0 = 0; row0 < p.rows; row0 += BM) {
    bool any = false;
    if (threadIdx.x < BM) {
      const int R = row0 + threadIdx.x;
      Range x{0, 0, -1};
      float m = -INFINITY, l = 0.f, dl = 0.f;
      if (R < p.rows) {
        const int t = R / p.group, h = kvh * p.group + R % p.group;
        x = row_range(p, b, t);
        const int64_t row = (static_cast<int64_t>(b) * p.n + h) * p.Tq + t;
        m = p.stats[2 * row], l = p.stats[2 * row + 1], dl = p.delta[row];
        int f, e;
        span(x, f, e);
        any = f < e && f < j0 + kBN && e > j0;
      }
      sLo[threadIdx.x] = x.lo, sHi[threadIdx.x] = x.hi, sOwn[threadIdx.x] = x.own;
      sM[threadIdx.x] = m, sL[threadIdx.x] = l, sD[threadIdx.x] = dl;
    }
    if (!__syncthreads_or(any)) continue;
    const int valid_rows = min(BM, p.rows - row0);
    auto q_off = [&](int r) {
      const int R = row0 + r;
      return (kvh * p.group + R % p.group) * p.q_sh + (R / p.group) * p.q_st;
    };
    auto o_off = [&](int r) {
      const int R = row0 + r;
      return ((static_cast<int64_t>(b) * p.n + kvh * p.group + R % p.group) * p.Tq + R / p.group) * p.d;
    };
    load_tile<T, D, LD, THREADS>(sQ, q, BM, valid_rows, p.d, q_off);
    load_tile<T, D, LD, THREADS>(sO, dout, BM, valid_rows, p.d, o_off);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // S^T = K Q^T (16 keys x BM rows per warp), then P^T.
    float pt[NT][4], dpt[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) pt[i][e] = dpt[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4], a2[4];
      ldsm_x4(a, a_ptr<LD>(sK, warp * 16, ks * 16, lane));
      ldsm_x4(a2, a_ptr<LD>(sV, warp * 16, ks * 16, lane));
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        uint32_t bb[4], bo[4];
        ldsm_x4(bb, bn_ptr<LD>(sQ, n2 * 16, ks * 16, lane));
        Mma<T>::run(pt[2 * n2], a, bb[0], bb[1]);
        Mma<T>::run(pt[2 * n2 + 1], a, bb[2], bb[3]);
        ldsm_x4(bo, bn_ptr<LD>(sO, n2 * 16, ks * 16, lane));  // dP^T = V dO^T
        Mma<T>::run(dpt[2 * n2], a2, bo[0], bo[1]);
        Mma<T>::run(dpt[2 * n2 + 1], a2, bo[2], bo[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = i * 8 + tig * 2 + (e & 1), j = e < 2 ? kA : kB;
        const bool vis = ((j >= sLo[c] && j < sHi[c]) || j == sOwn[c]) && sM[c] != -INFINITY;
        const float pv = vis ? exp2f(pt[i][e] * p.scale_log2 - sM[c] - sL[c]) : 0.f;
        pt[i][e] = pv;
        dpt[i][e] = pv * (dpt[i][e] - sD[c]);  // dS^T
      }
    // dV += P^T dO, dK += dS^T Q  (the rows are the reduction axis).
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks) {
      uint32_t ap[4], as[4];
      c_to_a<T>(ap, pt[2 * ks], pt[2 * ks + 1]);
      c_to_a<T>(as, dpt[2 * ks], dpt[2 * ks + 1]);
#pragma unroll
      for (int n2 = 0; n2 < DT / 2; ++n2) {
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, a_ptr<LD>(sO, ks * 16, n2 * 16, lane));
        Mma<T>::run(dv[2 * n2], ap, bo[0], bo[1]);
        Mma<T>::run(dv[2 * n2 + 1], ap, bo[2], bo[3]);
        ldsm_x4_t(bq, a_ptr<LD>(sQ, ks * 16, n2 * 16, lane));
        Mma<T>::run(dk[2 * n2], as, bq[0], bq[1]);
        Mma<T>::run(dk[2 * n2 + 1], as, bq[2], bq[3]);
      }
    }
    __syncthreads();  // before the next row tile overwrites sQ, sO and the row arrays
  }
  cp_async_wait_all();

  T* dkp = static_cast<T*>(p.dk) + ((static_cast<int64_t>(b) * p.g + kvh) * p.Tk) * p.d;
  T* dvp = static_cast<T*>(p.dv) + ((static_cast<int64_t>(b) * p.g + kvh) * p.Tk) * p.d;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = half ? kB : kA;
    if (j >= p.Tk) continue;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      const int c = i * 8 + tig * 2;
      if (c >= p.d) continue;
      *reinterpret_cast<uint32_t*>(dkp + static_cast<int64_t>(j) * p.d + c) =
          Mma<T>::pack(dk[i][2 * half] * p.scale, dk[i][2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvp + static_cast<int64_t>(j) * p.d + c) =
          Mma<T>::pack(dv[i][2 * half], dv[i][2 * half + 1]);
    }
  }
}

// dQ: the forward's layout (a block owns 64 rows, each warp 16) walking the key tiles its rows see.
template <typename T, int D>
__global__ void __launch_bounds__(128) bwd_dq_kernel(const Params p) {
  constexpr int THREADS = 128, BM = 64, LD = D + 8, DT = D / 8, NT = kBN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sO = sQ + BM * LD;       // dO
  T* sK = sO + BM * LD;       // [2][kBN][LD]
  T* sV = sK + 2 * kBN * LD;  // [2][kBN][LD]
  __shared__ int sh[4];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tig = lane & 3;
  const int row0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int b = blockIdx.y / p.g, kvh = blockIdx.y % p.g;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* dout = static_cast<const T*>(p.dout);
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  const BlockSpan bs = block_span<BM, THREADS>(p, b, row0, sh);
  const int t_begin = bs.first / kBN, t_end = bs.first < bs.end ? (bs.end + kBN - 1) / kBN : t_begin;

  const int rA = row0 + warp * 16 + gq, rB = rA + 8;
  auto row_of = [&](int R) {
    const int Rc = min(R, p.rows - 1);
    return (static_cast<int64_t>(b) * p.n + kvh * p.group + Rc % p.group) * p.Tq + Rc / p.group;
  };
  const Range xA = row_range(p, b, min(rA, p.rows - 1) / p.group);
  const Range xB = row_range(p, b, min(rB, p.rows - 1) / p.group);
  const int64_t rowA = row_of(rA), rowB = row_of(rB);
  const float mA = p.stats[2 * rowA], lA = p.stats[2 * rowA + 1], dA = p.delta[rowA];
  const float mB = p.stats[2 * rowB], lB = p.stats[2 * rowB + 1], dB = p.delta[rowB];

  const int valid_rows = min(BM, p.rows - row0);
  load_tile<T, D, LD, THREADS>(sQ, q, BM, valid_rows, p.d, [&](int r) {
    const int R = row0 + r;
    return (kvh * p.group + R % p.group) * p.q_sh + (R / p.group) * p.q_st;
  });
  load_tile<T, D, LD, THREADS>(sO, dout, BM, valid_rows, p.d, [&](int r) {
    const int R = row0 + r;
    return ((static_cast<int64_t>(b) * p.n + kvh * p.group + R % p.group) * p.Tq + R / p.group) * p.d;
  });
  auto load_kv = [&](int tile, int buf) {
    const int j0 = tile * kBN, valid = min(kBN, p.Tk - j0);
    load_tile<T, D, LD, THREADS>(sK + buf * kBN * LD, k, kBN, valid, p.d, [&](int r) { return (j0 + r) * p.k_st; });
    load_tile<T, D, LD, THREADS>(sV + buf * kBN * LD, v, kBN, valid, p.d, [&](int r) { return (j0 + r) * p.v_st; });
  };
  if (t_begin < t_end) load_kv(t_begin, 0);
  cp_async_commit();

  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int buf = (tile - t_begin) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < t_end) load_kv(tile + 1, buf ^ 1);
    cp_async_commit();
    const T* kt = sK + buf * kBN * LD;
    const T* vt = sV + buf * kBN * LD;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t aq[4], ao[4];
      ldsm_x4(aq, a_ptr<LD>(sQ, warp * 16, ks * 16, lane));
      ldsm_x4(ao, a_ptr<LD>(sO, warp * 16, ks * 16, lane));
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        uint32_t bk[4], bv[4];
        ldsm_x4(bk, bn_ptr<LD>(kt, n2 * 16, ks * 16, lane));
        Mma<T>::run(s[2 * n2], aq, bk[0], bk[1]);
        Mma<T>::run(s[2 * n2 + 1], aq, bk[2], bk[3]);
        ldsm_x4(bv, bn_ptr<LD>(vt, n2 * 16, ks * 16, lane));  // dP = dO V^T
        Mma<T>::run(dp[2 * n2], ao, bv[0], bv[1]);
        Mma<T>::run(dp[2 * n2 + 1], ao, bv[2], bv[3]);
      }
    }
    const int j0 = tile * kBN;
    const bool full = j0 >= bs.max_lo && j0 + kBN <= bs.min_hi;
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + i * 8 + tig * 2 + (e & 1);
        const bool top = e < 2;
        const float m = top ? mA : mB;
        const bool vis = (full || sees(top ? xA : xB, j)) && m != -INFINITY;
        const float pv = vis ? exp2f(s[i][e] * p.scale_log2 - m - (top ? lA : lB)) : 0.f;
        s[i][e] = pv * (dp[i][e] - (top ? dA : dB));  // dS
      }
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * ks], s[2 * ks + 1]);
#pragma unroll
      for (int n2 = 0; n2 < DT / 2; ++n2) {
        uint32_t bb[4];
        ldsm_x4_t(bb, a_ptr<LD>(kt, ks * 16, n2 * 16, lane));
        Mma<T>::run(dq[2 * n2], a, bb[0], bb[1]);
        Mma<T>::run(dq[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }
  }
  cp_async_wait_all();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int R = half ? rB : rA;
    if (R >= p.rows) continue;
    T* out = static_cast<T*>(p.dq) + (half ? rowB : rowA) * p.d;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      const int c = i * 8 + tig * 2;
      if (c < p.d)
        *reinterpret_cast<uint32_t*>(out + c) = Mma<T>::pack(dq[i][2 * half] * p.scale, dq[i][2 * half + 1] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "glm attention (CUDA): ", what, " failed to launch: ", cudaGetErrorString(err));
}

// A kernel taking more than 48 KB of dynamic shared memory must say so once per device.
template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p, const char* what) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    TORCH_CHECK(err == cudaSuccess, "glm attention (CUDA): ", what, " needs ", smem,
                " bytes of shared memory: ", cudaGetErrorString(err));
  }
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  check_launch(what);
}

// cp.async moves 16-byte chunks: the base must be 16-byte aligned and every row stride a multiple of
// 8 elements; anything else is copied to a contiguous tensor first.
at::Tensor aligned(const at::Tensor& x) {
  const bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0;
  return ok ? x : x.contiguous();
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix,
                   const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset,
                   double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(),
              "glm attention: q must be [B,n,Tq,d] and k, v [B,g,Tk,d]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "glm attention: q ", q.sizes(), " and k ", k.sizes(), " disagree on batch, head dim or head groups");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "glm attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "glm attention CUDA kernels take bfloat16 or float16 (tensor cores, fp32 accumulation), got ",
              q.scalar_type(), "; use the 'sdpa' or 'reference' backend for float32/float64 on CUDA");
  const int64_t d = q.size(3);
  TORCH_CHECK(d % 8 == 0 && d <= 128, "glm attention CUDA kernels take head dims that are multiples of 8 up to 128, "
              "got ", d, "; use the 'sdpa' backend for this model");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && prefix.device() == q.device() &&
              kv_start.device() == q.device() && kv_len.device() == q.device(),
              "glm attention: all tensors must be on ", q.device());
  const int64_t B = q.size(0), Tq = q.size(2);
  TORCH_CHECK(prefix.scalar_type() == at::kInt && kv_start.scalar_type() == at::kInt && kv_len.scalar_type() == at::kInt,
              "glm attention: prefix_len, kv_start and kv_len must be int32");
  TORCH_CHECK(prefix.numel() == B * Tq && kv_start.numel() == B * Tq && kv_len.numel() == B,
              "glm attention: prefix_len and kv_start must be [B, Tq], kv_len [B]");
  TORCH_CHECK(prefix.is_contiguous() && kv_start.is_contiguous() && kv_len.is_contiguous(),
              "glm attention: structure tensors must be contiguous");
  TORCH_CHECK(q_offset >= 0 && q_offset + Tq <= k.size(2), "glm attention: q_offset out of range");
  TORCH_CHECK(k.size(1) * Tq < INT_MAX / 2 && k.size(2) < INT_MAX / 2, "glm attention: sizes too large");
  Params p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_st = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_st = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_st = v.stride(2);
  p.prefix = prefix.data_ptr<int>(), p.kv_start = kv_start.data_ptr<int>(), p.kv_len = kv_len.data_ptr<int>();
  p.B = B, p.n = q.size(1), p.g = k.size(1), p.group = p.n / p.g, p.Tq = Tq, p.Tk = k.size(2), p.d = d;
  p.rows = p.group * p.Tq;
  p.q_offset = q_offset, p.causal = causal;
  p.scale = static_cast<float>(scale), p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.num_splits = 1, p.tiles_per_split = 0;
  return p;
}

template <typename T, int D, int WARPS>
void run_fwd(const Params& p, int splits) {
  constexpr int BM = 16 * WARPS, LD = D + 8;
  const size_t smem = static_cast<size_t>(BM + 4 * kBN) * LD * sizeof(T);
  dim3 grid((p.rows + BM - 1) / BM, p.B * p.g, splits);
  launch(fwd_kernel<T, D, WARPS>, grid, WARPS * 32, smem, p, "attention forward");
}

// Rows per forward block: 4 warps by default; GLM_CUDA_FWD_WARPS=8 picks 128-row blocks (halves the
// K/V traffic per row; the benchmark compares the two).
int fwd_warps(const Params& p) {
  if (p.rows <= 16) return 1;
  static const int env = [] {
    const char* s = std::getenv("GLM_CUDA_FWD_WARPS");
    return s ? std::atoi(s) : 4;
  }();
  return env == 8 ? 8 : 4;
}

template <typename T, int D>
void dispatch_fwd(const Params& p, int splits) {
  switch (fwd_warps(p)) {
    case 1: run_fwd<T, D, 1>(p, splits); break;
    case 8: run_fwd<T, D, 8>(p, splits); break;
    default: run_fwd<T, D, 4>(p, splits); break;
  }
}

void forward_any(const Params& p, at::ScalarType st, int splits) {
  const bool small = p.d <= 64;
  if (st == at::kBFloat16) {
    small ? dispatch_fwd<__nv_bfloat16, 64>(p, splits) : dispatch_fwd<__nv_bfloat16, 128>(p, splits);
  } else {
    small ? dispatch_fwd<__half, 64>(p, splits) : dispatch_fwd<__half, 128>(p, splits);
  }
}

struct Prepared {
  at::Tensor q, k, v, out, lse, stats;
  Params p;
};

Prepared prepare(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& prefix,
                 const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset, double scale) {
  Prepared r;
  r.q = aligned(q_), r.k = aligned(k_), r.v = aligned(v_);
  r.p = make_params(r.q, r.k, r.v, prefix, kv_start, kv_len, causal, q_offset, scale);
  r.out = at::empty({r.p.B, r.p.n, r.p.Tq, r.p.d}, r.q.options());
  r.lse = at::empty({r.p.B, r.p.n, r.p.Tq}, r.q.options().dtype(at::kFloat));
  r.stats = at::empty({r.p.B, r.p.n, r.p.Tq, 2}, r.q.options().dtype(at::kFloat));
  r.p.out = r.out.data_ptr(), r.p.lse = r.lse.data_ptr<float>(), r.p.stats = r.stats.data_ptr<float>();
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& prefix,
                                                                  const at::Tensor& kv_start, const at::Tensor& kv_len,
                                                                  bool causal, int64_t q_offset, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
  if (r.out.numel() > 0) forward_any(r.p, r.q.scalar_type(), 1);
  return {r.out, r.lse, r.stats};
}

// Decode: the forward kernel with the keys split across blocks so that a handful of query rows still
// fills the GPU; the split count depends only on shapes (never on kv_len's values), so a CUDA graph
// captured once stays valid as the cache fills.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_decode_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const at::Tensor& prefix,
                                                                     const at::Tensor& kv_start,
                                                                     const at::Tensor& kv_len, bool causal,
                                                                     int64_t q_offset, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
  Params& p = r.p;
  if (r.out.numel() == 0) return {r.out, r.lse, r.stats};
  const int bm = fwd_warps(p) * 16;
  const int64_t blocks = static_cast<int64_t>((p.rows + bm - 1) / bm) * p.B * p.g;
  const int tiles = (p.Tk + kBN - 1) / kBN;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  // Aim at ~4 blocks per SM; never split below 4 tiles (256 keys) per block.
  int splits = static_cast<int>(std::min<int64_t>((4 * sms + blocks - 1) / blocks, (tiles + 3) / 4));
  splits = std::max(1, std::min(splits, 64));
  if (splits == 1) {
    forward_any(p, r.q.scalar_type(), 1);
    return {r.out, r.lse, r.stats};
  }
  p.tiles_per_split = (tiles + splits - 1) / splits;
  splits = (tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  p.num_splits = splits;
  at::Tensor part_o = at::empty({splits, p.B, p.n, p.Tq, p.d}, r.q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({splits, p.B, p.n, p.Tq, 2}, r.q.options().dtype(at::kFloat));
  p.part_o = part_o.data_ptr<float>(), p.part_ml = part_ml.data_ptr<float>();
  forward_any(p, r.q.scalar_type(), splits);
  const int64_t rows = static_cast<int64_t>(p.B) * p.n * p.Tq;
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  if (r.q.scalar_type() == at::kBFloat16)
    launch(combine_kernel<__nv_bfloat16>, grid, 128, 0, p, "attention decode combine");
  else
    launch(combine_kernel<__half>, grid, 128, 0, p, "attention decode combine");
  return {r.out, r.lse, r.stats};
}

namespace {
template <typename T, int D>
void run_bwd(const Params& p) {
  constexpr int LD = D + 8;
  const size_t smem_kv = static_cast<size_t>(2 * kBN + 2 * 32) * LD * sizeof(T);
  launch(bwd_dkdv_kernel<T, D>, dim3((p.Tk + kBN - 1) / kBN, p.B * p.g), 128, smem_kv, p, "attention backward dK/dV");
  const size_t smem_q = static_cast<size_t>(2 * 64 + 4 * kBN) * LD * sizeof(T);
  launch(bwd_dq_kernel<T, D>, dim3((p.rows + 63) / 64, p.B * p.g), 128, smem_q, p, "attention backward dQ");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& q_, const at::Tensor& k_,
    const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& stats_, const at::Tensor& prefix,
    const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset, double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_);
  Params p = make_params(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out_.sizes() == q.sizes(), "glm attention bwd: grad/out shape mismatch");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out_.scalar_type() == q.scalar_type(),
              "glm attention bwd: grad_out and out must have q's dtype");
  TORCH_CHECK(stats_.scalar_type() == at::kFloat && stats_.numel() == 2 * p.B * p.n * p.Tq &&
                  grad_lse.scalar_type() == at::kFloat && grad_lse.numel() == p.B * p.n * p.Tq,
              "glm attention bwd: stats must be fp32 [B, n, Tq, 2] and grad_lse fp32 [B, n, Tq]");
  const at::Tensor dout = grad_out.contiguous(), out = out_.contiguous(), stats = stats_.contiguous(),
                   glse = grad_lse.contiguous();
  at::Tensor dq = at::empty({p.B, p.n, p.Tq, p.d}, q.options());
  at::Tensor dk = at::empty({p.B, p.g, p.Tk, p.d}, q.options());
  at::Tensor dv = at::empty({p.B, p.g, p.Tk, p.d}, q.options());
  if (dk.numel() == 0) return {dq.zero_(), dk, dv};
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  at::Tensor delta = at::empty({p.B, p.n, p.Tq}, q.options().dtype(at::kFloat));
  const int64_t rows = static_cast<int64_t>(p.B) * p.n * p.Tq;
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16)
    delta_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(dout.data_ptr()), static_cast<const __nv_bfloat16*>(out.data_ptr()),
        glse.data_ptr<float>(), delta.data_ptr<float>(), rows, p.d);
  else
    delta_kernel<__half><<<grid, 128, 0, stream>>>(static_cast<const __half*>(dout.data_ptr()),
                                                   static_cast<const __half*>(out.data_ptr()), glse.data_ptr<float>(),
                                                   delta.data_ptr<float>(), rows, p.d);
  check_launch("attention backward delta");
  p.dout = dout.data_ptr(), p.delta = delta.data_ptr<float>(), p.stats = stats.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  const bool small = p.d <= 64;
  if (q.scalar_type() == at::kBFloat16)
    small ? run_bwd<__nv_bfloat16, 64>(p) : run_bwd<__nv_bfloat16, 128>(p);
  else
    small ? run_bwd<__half, 64>(p) : run_bwd<__half, 128>(p);
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(glm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("attention_decode", &attention_decode_cuda);
}

}  // namespace glm_kernels_cuda

// Loading this module (after glm.kernels._C, which defines the ops) adds the CUDA kernels.
extern "C" {
#include <Python.h>
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "glm's CUDA attention kernels", -1, nullptr};
  return PyModule_Create(&module);
}
}
