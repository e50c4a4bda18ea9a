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
#include "attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace glm_kernels_cuda {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kBN = kKeyTile;

// 2^x on the special-function unit (one MUFU.EX2; ~2 ulp, 2^-inf = 0). The accurate exp2f adds
// range handling these arguments (<= 0, or -inf for masked keys) never need.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

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
// Each warp owns MT m16 tiles (16 * MT rows); a lane holds rows gq and gq + 8 of each (the m16n8 C
// layout). MT = 1 keeps the warp's Q fragments in registers; MT = 2 reads them from shared memory
// per k-step (no room for both) but shares every K and V fragment between two row tiles, which
// halves the shared-memory traffic of P V.

template <typename T, int D, int WARPS, int MT>
__global__ void __launch_bounds__(WARPS * 32) fwd_kernel(const Params p) {
  constexpr int WR = 16 * MT, BM = WR * WARPS, LD = D + 8, THREADS = WARPS * 32, NT = kBN / 8, DT = D / 8;
  constexpr bool kQRegs = MT == 1;
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

  // This thread's rows: [mt][0] = gq, [mt][1] = gq + 8 of row tile mt.
  const int wrow = warp * WR;
  Range x[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      x[mt][hf] = row_range(p, b, min(row0 + wrow + mt * 16 + hf * 8 + gq, p.rows - 1) / p.group);

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

  uint32_t qf[kQRegs ? D / 16 : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldsm_x4(qf[ks], a_ptr<LD>(sQ, wrow, ks * 16, lane));
  }

  float o[MT][DT][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

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

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (kQRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[mt][r] = qf[ks][r];
        } else {
          ldsm_x4(a[mt], a_ptr<LD>(sQ, wrow + mt * 16, ks * 16, lane));
        }
      }
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        uint32_t bb[4];
        ldsm_x4(bb, bn_ptr<LD>(kt, n2 * 16, ks * 16, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(s[mt][2 * n2], a[mt], bb[0], bb[1]);
          Mma<T>::run(s[mt][2 * n2 + 1], a[mt], bb[2], bb[3]);
        }
      }
    }

    const int j0 = tile * kBN;
    const bool full = j0 >= bs.max_lo && j0 + kBN <= bs.min_hi;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float tm[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + i * 8 + tig * 2 + (e & 1);
          float xs = s[mt][i][e] * p.scale_log2;
          if (!full && !sees(x[mt][e >> 1], j)) xs = -INFINITY;
          s[mt][i][e] = xs;
        }
        tm[0] = fmaxf(tm[0], fmaxf(s[mt][i][0], s[mt][i][1]));
        tm[1] = fmaxf(tm[1], fmaxf(s[mt][i][2], s[mt][i][3]));
      }
      float alpha[2], use[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        tm[hf] = fmaxf(tm[hf], __shfl_xor_sync(0xffffffffu, tm[hf], 1));
        tm[hf] = fmaxf(tm[hf], __shfl_xor_sync(0xffffffffu, tm[hf], 2));
        const float mn = fmaxf(m[mt][hf], tm[hf]);
        // A row that has seen nothing yet keeps max -inf; subtract 0 then, so exp2 gives 0, not NaN.
        use[hf] = mn == -INFINITY ? 0.f : mn;
        alpha[hf] = ex2(m[mt][hf] - use[hf]);
        m[mt][hf] = mn;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][i][e] = ex2(s[mt][i][e] - use[e >> 1]);
          sum[e >> 1] += s[mt][i][e];
        }
      }
      // Per-lane partial sums; the quad's are added at the end.
      l[mt][0] = l[mt][0] * alpha[0] + sum[0];
      l[mt][1] = l[mt][1] * alpha[1] + sum[1];
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        o[mt][i][0] *= alpha[0], o[mt][i][1] *= alpha[0];
        o[mt][i][2] *= alpha[1], o[mt][i][3] *= alpha[1];
      }
    }

#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T>(a[mt], s[mt][2 * ks], s[mt][2 * ks + 1]);
#pragma unroll
      for (int n2 = 0; n2 < DT / 2; ++n2) {
        uint32_t bb[4];
        ldsm_x4_t(bb, a_ptr<LD>(vt, ks * 16, n2 * 16, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(o[mt][2 * n2], a[mt], bb[0], bb[1]);
          Mma<T>::run(o[mt][2 * n2 + 1], a[mt], bb[2], bb[3]);
        }
      }
    }
  }
  cp_async_wait_all();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float lt = l[mt][hf];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const int R = row0 + wrow + mt * 16 + hf * 8 + gq;
      if (R >= p.rows) continue;
      const int t = R / p.group, h = kvh * p.group + R % p.group;
      const float inv = lt > 0.f ? 1.f / lt : 0.f, mx = m[mt][hf];
      const bool seen = lt > 0.f;
      const int64_t row = (static_cast<int64_t>(b) * p.n + h) * p.Tq + t;
      if (p.num_splits == 1) {
        T* out = static_cast<T*>(p.out) + row * p.d;
#pragma unroll
        for (int i = 0; i < DT; ++i) {
          const int c = i * 8 + tig * 2;
          if (c < p.d)
            *reinterpret_cast<uint32_t*>(out + c) = Mma<T>::pack(o[mt][i][2 * hf] * inv, o[mt][i][2 * hf + 1] * inv);
        }
        if (tig == 0) {
          p.lse[row] = seen ? (mx + log2f(lt)) * kLn2 : -INFINITY;
          p.stats[2 * row] = seen ? mx : -INFINITY;
          p.stats[2 * row + 1] = seen ? log2f(lt) : 0.f;
        }
      } else {
        const int64_t prow = static_cast<int64_t>(split) * p.B * p.n * p.Tq + row;
        float* out = p.part_o + prow * p.d;
#pragma unroll
        for (int i = 0; i < DT; ++i) {
          const int c = i * 8 + tig * 2;
          if (c < p.d) *reinterpret_cast<float2*>(out + c) = make_float2(o[mt][i][2 * hf] * inv, o[mt][i][2 * hf + 1] * inv);
        }
        if (tig == 0) {
          p.part_ml[2 * prow] = seen ? mx : -INFINITY;
          p.part_ml[2 * prow + 1] = seen ? log2f(lt) : 0.f;
        }
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
      if (ml[0] != -INFINITY) tot += ex2(ml[0] + ml[1] - M);
    }
  const float logtot = M != -INFINITY ? log2f(tot) : 0.f;  // ~0; folds the rounding of the weights in
  T* out = static_cast<T*>(p.out) + row * p.d;
  for (int c = lane; c < p.d; c += 32) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float* ml = p.part_ml + 2 * (s * rows + row);
      if (ml[0] != -INFINITY) acc += ex2(ml[0] + ml[1] - M - logtot) * p.part_o[(s * rows + row) * p.d + c];
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

// Two products of one warp's 16 rows at once, over the head dim: c1 = A1 B1^T and c2 = A2 B2^T,
// A1/A2 the rows [arow, arow + 16) of shared tiles a1/a2, B1/B2 the first 8 * NT rows of b1/b2 (all
// [row][d], row stride LD). Interleaved so each k-step's fragments are loaded once. The dQ kernel
// uses it for S = Q K^T and dP = dO V^T, the dK/dV kernel for S^T = K Q^T and dP^T = V dO^T.
template <typename T, int D, int LD, int NT>
__device__ __forceinline__ void two_products(float (&c1)[NT][4], float (&c2)[NT][4], const T* a1, const T* a2,
                                             int arow, const T* b1, const T* b2, int lane) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) c1[i][e] = c2[i][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t x1[4], x2[4];
    ldsm_x4(x1, a_ptr<LD>(a1, arow, ks * 16, lane));
    ldsm_x4(x2, a_ptr<LD>(a2, arow, ks * 16, lane));
#pragma unroll
    for (int n2 = 0; n2 < NT / 2; ++n2) {
      uint32_t y1[4], y2[4];
      ldsm_x4(y1, bn_ptr<LD>(b1, n2 * 16, ks * 16, lane));
      Mma<T>::run(c1[2 * n2], x1, y1[0], y1[1]);
      Mma<T>::run(c1[2 * n2 + 1], x1, y1[2], y1[3]);
      ldsm_x4(y2, bn_ptr<LD>(b2, n2 * 16, ks * 16, lane));
      Mma<T>::run(c2[2 * n2], x2, y2[0], y2[1]);
      Mma<T>::run(c2[2 * n2 + 1], x2, y2[2], y2[3]);
    }
  }
}

// c += A B for one 16-wide k-slab: A a register fragment (16 rows x 16), B the rows [k0, k0 + 16)
// of a [k][n] shared tile, all DT n8 tiles of its width (dQ += dS K, dV += P^T dO, dK += dS^T Q).
template <typename T, int LD, int DT>
__device__ __forceinline__ void accumulate_ab(float (&c)[DT][4], const uint32_t (&a)[4], const T* b, int k0, int lane) {
#pragma unroll
  for (int n2 = 0; n2 < DT / 2; ++n2) {
    uint32_t y[4];
    ldsm_x4_t(y, a_ptr<LD>(b, k0, n2 * 16, lane));
    Mma<T>::run(c[2 * n2], a, y[0], y[1]);
    Mma<T>::run(c[2 * n2 + 1], a, y[2], y[3]);
  }
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

    // S^T = K Q^T and dP^T = V dO^T (16 keys x BM rows per warp), then P^T and dS^T.
    float pt[NT][4], dpt[NT][4];
    two_products<T, D, LD, NT>(pt, dpt, sK, sV, warp * 16, sQ, sO, lane);
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = i * 8 + tig * 2 + (e & 1), j = e < 2 ? kA : kB;
        const bool vis = ((j >= sLo[c] && j < sHi[c]) || j == sOwn[c]) && sM[c] != -INFINITY;
        const float pv = vis ? ex2(pt[i][e] * p.scale_log2 - sM[c] - sL[c]) : 0.f;
        pt[i][e] = pv;
        dpt[i][e] = pv * (dpt[i][e] - sD[c]);  // dS^T
      }
    // dV += P^T dO, dK += dS^T Q  (the rows are the reduction axis).
#pragma unroll
    for (int ks = 0; ks < BM / 16; ++ks) {
      uint32_t ap[4], as[4];
      c_to_a<T>(ap, pt[2 * ks], pt[2 * ks + 1]);
      c_to_a<T>(as, dpt[2 * ks], dpt[2 * ks + 1]);
      accumulate_ab<T, LD, DT>(dv, ap, sO, ks * 16, lane);
      accumulate_ab<T, LD, DT>(dk, as, sQ, ks * 16, lane);
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

    // S = Q K^T and dP = dO V^T.
    float s[NT][4], dp[NT][4];
    two_products<T, D, LD, NT>(s, dp, sQ, sO, warp * 16, kt, vt, lane);
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
        const float pv = vis ? ex2(s[i][e] * p.scale_log2 - m - (top ? lA : lB)) : 0.f;
        s[i][e] = pv * (dp[i][e] - (top ? dA : dB));  // dS
      }
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * ks], s[2 * ks + 1]);
      accumulate_ab<T, LD, DT>(dq, a, kt, ks * 16, lane);
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
// Launchers.

// A kernel taking more than 48 KB of dynamic shared memory must raise its limit first (cheap, and
// legal while a CUDA graph is being captured).
template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, int WARPS, int MT>
cudaError_t run_fwd(const Params& p, cudaStream_t stream) {
  constexpr int BM = 16 * MT * WARPS, LD = D + 8;
  const size_t smem = static_cast<size_t>(BM + 4 * kBN) * LD * sizeof(T);
  const dim3 grid((p.rows + BM - 1) / BM, p.B * p.g, p.num_splits);
  return launch(fwd_kernel<T, D, WARPS, MT>, grid, WARPS * 32, smem, p, stream);
}

// Forward block shapes: "1" = 1 warp x 16 rows (a few rows: decode), "4" = 4 warps x 16 rows,
// "8" = 8 warps x 16 rows, "4x2" = 4 warps x 32 rows. GLM_CUDA_FWD_BLOCK picks the shape used for
// more than 16 rows. Default: 4x2 for head dim 128 (H200, bf16, B=4 H=32, prefix-LM forward at
// T=2k/8k: 177/228 TFLOP/s vs 163/193 for "4" and 157/189 for "8"), "4" for head dim 64, where
// the 4x2 shape was not measured.
enum class FwdShape { k1, k4, k8, k4x2 };

FwdShape fwd_shape(const Params& p) {
  if (p.rows <= 16) return FwdShape::k1;
  static const int chosen = [] {
    const char* s = std::getenv("GLM_CUDA_FWD_BLOCK");
    const std::string v = s ? s : "";
    return v == "4" ? 1 : v == "8" ? 2 : v == "4x2" ? 3 : 0;
  }();
  switch (chosen) {
    case 1: return FwdShape::k4;
    case 2: return FwdShape::k8;
    case 3: return FwdShape::k4x2;
    default: return p.d > 64 ? FwdShape::k4x2 : FwdShape::k4;
  }
}

template <typename T, int D>
cudaError_t dispatch_fwd(const Params& p, cudaStream_t stream) {
  switch (fwd_shape(p)) {
    case FwdShape::k1: return run_fwd<T, D, 1, 1>(p, stream);
    case FwdShape::k8: return run_fwd<T, D, 8, 1>(p, stream);
    case FwdShape::k4x2: return run_fwd<T, D, 4, 2>(p, stream);
    default: return run_fwd<T, D, 4, 1>(p, stream);
  }
}

template <typename T, int D>
cudaError_t run_bwd(const Params& p, cudaStream_t stream) {
  constexpr int LD = D + 8;
  const size_t smem_kv = static_cast<size_t>(2 * kBN + 2 * 32) * LD * sizeof(T);
  cudaError_t err = launch(bwd_dkdv_kernel<T, D>, dim3((p.Tk + kBN - 1) / kBN, p.B * p.g), 128, smem_kv, p, stream);
  if (err != cudaSuccess) return err;
  const size_t smem_q = static_cast<size_t>(2 * 64 + 4 * kBN) * LD * sizeof(T);
  return launch(bwd_dq_kernel<T, D>, dim3((p.rows + 63) / 64, p.B * p.g), 128, smem_q, p, stream);
}

}  // namespace

int forward_block_rows(const Params& p) {
  switch (fwd_shape(p)) {
    case FwdShape::k1: return 16;
    case FwdShape::k4: return 64;
    default: return 128;
  }
}

cudaError_t forward(const Params& p, DType dt, cudaStream_t stream) {
  const bool small = p.d <= 64;
  if (dt == DType::kBFloat16)
    return small ? dispatch_fwd<__nv_bfloat16, 64>(p, stream) : dispatch_fwd<__nv_bfloat16, 128>(p, stream);
  return small ? dispatch_fwd<__half, 64>(p, stream) : dispatch_fwd<__half, 128>(p, stream);
}

cudaError_t combine(const Params& p, DType dt, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.n * p.Tq;
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  if (dt == DType::kBFloat16) return launch(combine_kernel<__nv_bfloat16>, grid, 128, 0, p, stream);
  return launch(combine_kernel<__half>, grid, 128, 0, p, stream);
}

cudaError_t backward_delta(const void* dout, const void* out, const float* grad_lse, float* delta, int64_t rows, int d,
                           DType dt, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  if (dt == DType::kBFloat16)
    delta_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(static_cast<const __nv_bfloat16*>(dout),
                                                          static_cast<const __nv_bfloat16*>(out), grad_lse, delta,
                                                          rows, d);
  else
    delta_kernel<__half><<<grid, 128, 0, stream>>>(static_cast<const __half*>(dout), static_cast<const __half*>(out),
                                                   grad_lse, delta, rows, d);
  return cudaGetLastError();
}

cudaError_t backward(const Params& p, DType dt, cudaStream_t stream) {
  const bool small = p.d <= 64;
  if (dt == DType::kBFloat16) return small ? run_bwd<__nv_bfloat16, 64>(p, stream) : run_bwd<__nv_bfloat16, 128>(p, stream);
  return small ? run_bwd<__half, 64>(p, stream) : run_bwd<__half, 128>(p, stream);
}

}  // namespace glm_kernels_cuda
