// Flash-style prefix-LM attention for CPU: forward (+ log-sum-exp), backward (recomputing the
// probabilities from the saved lse, FlashAttention-2 style) and a split-KV decode kernel.
//
// The mask is structure, never a tensor (see glm/attention.py). For query row t of sample b, sitting
// at key index i = q_offset + t, key j is visible iff
//     j < kv_len[b]  and  ( j == i  or  ( kv_start[b,t] <= j < hi_t ) ),
//     hi_t = causal ? max(i + 1, prefix_len[b,t]) : Tk.
// So every row sees one contiguous key range (plus its own key, which matters only for left-pad
// rows). Tiles wholly inside every row's range skip the masking; tiles outside all of them are never
// touched, which is where the prefix-LM speedup over a dense-mask kernel comes from.
//
// Numerics: inputs of any float dtype are converted tile by tile to fp32; all products, the softmax
// and the accumulators are fp32. Scores live in the log2 domain (q pre-multiplied by scale*log2(e))
// so the exponential is a single exp2.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "cpu_vec.h"
#include "message.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace glm_kernels {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per tile (a multiple of 16). Each tile's scores for ~128 query rows stay in L2 between the
// two multiplies; larger tiles amortise the per-tile softmax bookkeeping.
constexpr int64_t kBK = 128;

// max(a, b) that keeps a NaN from either side, so a NaN score poisons its row as it does in the
// reference (std::max and `a > b ? a : b` drop it depending on the order of the operands).
inline float max_keep_nan(float a, float b) { return (a != a || b <= a) ? a : b; }

// ---------------------------------------------------------------------------------------------
// The one matrix-multiply micro-kernel everything uses:
//     C[M x N] (+)= A * B,   A(r, k) = A[r * sar + k * sak],   B row-major [K x N] (row stride ldb).
// A is only ever broadcast one scalar at a time, so it may be read transposed for free (that is how
// P^T dO and dS^T Q are formed without transposing anything). N is a multiple of 16 (callers pad).
// An RB x NV block of C (NV registers of kVecWidth columns per row) stays in registers across the
// whole K loop. The block must fit the register file with room for the NV vectors of B loaded per k
// and the broadcast A value, or the compiler spills accumulators on every k:
//   AVX-512 (32 registers of 16): 8 rows x 2 registers = 32 columns (16 + 2 + 1 registers);
//   AVX2 (16 registers of 8):     6 rows x 2 registers = 16 columns (12 + 2 + 1);
//   SSE (16 registers of 4):      3 rows x 4 registers = 16 columns (12 + 4 + 1).
#if defined(__AVX512F__)
constexpr int kRB = 8;
constexpr int kWideNV = 2;
#elif defined(__AVX__)
constexpr int kRB = 6;
constexpr int kWideNV = 2;
#else
constexpr int kRB = 3;
constexpr int kWideNV = 4;
#endif
constexpr int kNV16 = 16 / kVecWidth;  // registers per 16 columns, the padding unit of N
static_assert(kWideNV % kNV16 == 0, "the wide block is a whole number of 16-column units");

template <int RB, int NV>
inline void mm_block(int64_t K, const float* A, int64_t sar, int64_t sak, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate) {
  vreg c[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = accumulate ? loadr(C + r * ldc + kVecWidth * j) : vreg{};
  for (int64_t k = 0; k < K; ++k) {
    vreg b[NV];
    for (int j = 0; j < NV; ++j) b[j] = loadr(B + k * ldb + kVecWidth * j);
    for (int r = 0; r < RB; ++r) {
      const float a = A[r * sar + k * sak];
      for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) storer(C + r * ldc + kVecWidth * j, c[r][j]);
}

template <int NV>
inline void mm_rows(int64_t rows, int64_t K, const float* A, int64_t sar, int64_t sak, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool acc) {
  int64_t r = 0;
  for (; r + kRB <= rows; r += kRB) mm_block<kRB, NV>(K, A + r * sar, sar, sak, B, ldb, C + r * ldc, ldc, acc);
  const float* a = A + r * sar;
  float* c = C + r * ldc;
  switch (rows - r) {  // fewer than kRB rows left
    case 7: mm_block<7, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 6: mm_block<6, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 5: mm_block<5, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 4: mm_block<4, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 3: mm_block<3, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 2: mm_block<2, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 1: mm_block<1, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t sar, int64_t sak, const float* B,
            int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t wide = kWideNV * kVecWidth, narrow = kNV16 * kVecWidth;
  int64_t j = 0;
  for (; j + wide <= N; j += wide) mm_rows<kWideNV>(M, K, A, sar, sak, B + j, ldb, C + j, ldc, accumulate);
  for (; j < N; j += narrow) mm_rows<kNV16>(M, K, A, sar, sak, B + j, ldb, C + j, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------------
// Problem description shared by the three kernels.

struct Problem {
  int64_t B, n, g, Tq, Tk, d, dpad;
  bool causal;
  int64_t q_offset;
  float scale;
  const int32_t* prefix;    // [B, Tq]
  const int32_t* kv_start;  // [B, Tq]
  const int32_t* kv_len;    // [B]
  int64_t group() const { return n / g; }
};

// The visible key range of one query row (besides its own key `diag`), clipped to [0, kv_len).
struct RowRange {
  int64_t lo, hi, diag;  // visible: lo <= j < hi, or j == diag (diag = -1 when it is not visible)
  // The smallest and one past the largest visible key (valid when !empty()).
  int64_t first() const { return lo < hi ? (diag >= 0 ? std::min(lo, diag) : lo) : diag; }
  int64_t last() const { return lo < hi ? (diag >= 0 ? std::max(hi, diag + 1) : hi) : diag + 1; }
  bool empty() const { return lo >= hi && diag < 0; }
};

inline RowRange row_range(const Problem& p, int64_t b, int64_t t) {
  const int64_t i = p.q_offset + t;
  const int64_t len = std::min<int64_t>(p.kv_len[b], p.Tk);
  const int64_t start = std::max<int64_t>(p.kv_start[b * p.Tq + t], 0);
  int64_t hi = p.causal ? std::max<int64_t>(i + 1, p.prefix[b * p.Tq + t]) : p.Tk;
  hi = std::min(hi, len);
  RowRange r{start, hi, i < len ? i : -1};
  if (r.lo >= r.hi) r.lo = r.hi = 0;
  return r;
}

// What a key tile [j0, j1) is to a set of rows: fully visible to all, partly visible, or invisible.
enum class TileKind { kFull, kPartial, kNone };

inline TileKind classify(const RowRange* rr, int64_t rows, int64_t j0, int64_t j1) {
  bool full = true, any = false;
  for (int64_t r = 0; r < rows; ++r) {
    const RowRange& x = rr[r];
    const bool inside = x.lo <= j0 && x.hi >= j1;
    full = full && inside;
    any = any || inside || (x.lo < j1 && x.hi > j0) || (x.diag >= j0 && x.diag < j1);
  }
  return full ? TileKind::kFull : (any ? TileKind::kPartial : TileKind::kNone);
}


// Sets to 0 the entries c < kBK of a row of tile [j0, j0 + nk) for keys that row x does not see
// (and the padding past nk): two contiguous fills around the visible interval, keeping its own key.
inline void zero_unseen(const RowRange& x, int64_t j0, int64_t nk, float* row) {
  auto col = [&](int64_t j) { return std::min<int64_t>(std::max<int64_t>(j - j0, 0), nk); };
  const int64_t c_lo = col(x.lo), c_hi = std::max(c_lo, col(x.hi)), cd = x.diag - j0;
  const bool keep_diag = x.diag >= 0 && cd >= 0 && cd < nk;
  const float diag_value = keep_diag ? row[cd] : 0.0f;
  std::fill(row, row + c_lo, 0.0f);
  std::fill(row + c_hi, row + kBK, 0.0f);
  if (keep_diag) row[cd] = diag_value;
}

// Runs `work(item)` for items 0..count-1 on all intra-op threads, handing items out one at a time so
// uneven items (later query blocks see more keys under a causal mask) balance themselves.
template <typename Init, typename Work>
void run_items(int64_t count, Init init, Work work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = init();
    for (int64_t it; (it = next.fetch_add(1)) < count;) work(it, scratch);
  });
}

// ---------------------------------------------------------------------------------------------
// Forward core. The scores are computed transposed, S^T = K Q^T ([keys x rows]), so that the
// softmax statistics of all query rows sit side by side in memory: the running max, exponentials
// and sums are then plain vector operations across rows, with no horizontal reductions, and the
// key rows are the multiply's broadcast operand, so K never needs transposing.

struct FwdScratch {
  int64_t rowsp;                  // rows rounded up to 16 (padding rows see nothing)
  std::vector<float> QT, O, ST, Kt, Vt, m, l, mx, ms, alpha;
  std::vector<int32_t> lo, hi, diag;  // each row's RowRange, as vectors across rows
  std::vector<RowRange> rr;
  FwdScratch(int64_t rows, int64_t dpad)
      : rowsp(round_up(rows, 16)), QT(dpad * rowsp), O(rows * dpad), ST(kBK * rowsp), Kt(kBK * dpad), Vt(kBK * dpad),
        m(rowsp), l(rowsp), mx(rowsp), ms(rowsp), alpha(rowsp), lo(rowsp), hi(rowsp), diag(rowsp), rr(rows) {}
};

// Where attend_range finds its key rows: K and V with row stride `skt`, either the inputs themselves
// (fp32 with d a multiple of 16), fp32 copies made once per (sample, KV head) when several query
// blocks reuse them, or — `convert` — the raw rows of another dtype, converted tile by tile.
template <typename T>
struct Keys {
  const T* K;
  const T* V;
  int64_t skt;
  const float* Kf = nullptr;  // fp32 rows (direct or packed), row stride skt_f
  const float* Vf = nullptr;
  int64_t skt_f = 0;
};

// Queries of one work item, scaled into the log2 domain and stored transposed: QT[c][r].
template <typename T>
void load_queries(const Problem& p, const T* q, const int64_t* qs, int64_t b, int64_t h0, int64_t heads,
                  int64_t t0, int64_t nt, FwdScratch& s) {
  const float mul = p.scale * kLog2e;
  const int64_t rowsp = s.rowsp, rows = heads * nt;
  std::fill(s.QT.begin(), s.QT.end(), 0.0f);
  for (int64_t hh = 0; hh < heads; ++hh)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t r = hh * nt + t;
      const T* src = q + b * qs[0] + (h0 + hh) * qs[1] + (t0 + t) * qs[2];
      for (int64_t c = 0; c < p.d; ++c) s.QT[c * rowsp + r] = to_f(src[c]) * mul;
      const RowRange x = row_range(p, b, t0 + t);
      s.rr[r] = x;
      s.lo[r] = static_cast<int32_t>(x.lo);
      s.hi[r] = static_cast<int32_t>(x.hi);
      s.diag[r] = static_cast<int32_t>(x.diag);
    }
  for (int64_t r = rows; r < rowsp; ++r) s.lo[r] = s.hi[r] = 0, s.diag[r] = -1;
}

// Online softmax of `rows` query rows (all heads of one KV group, stacked) over the keys
// [j_begin, j_end), in kBK-wide tiles aligned to multiples of kBK. Leaves the unnormalised output in
// O, the running max (log2 domain) in m and the running sum in l.
template <typename T>
void attend_range(const Problem& p, const Keys<T>& keys, int64_t rows, int64_t j_begin, int64_t j_end, FwdScratch& s) {
  const int64_t dpad = p.dpad, rp = s.rowsp;
  std::fill(s.O.begin(), s.O.begin() + rows * dpad, 0.0f);
  std::fill(s.m.begin(), s.m.end(), kNegInf);
  std::fill(s.l.begin(), s.l.end(), 0.0f);
  float* ST = s.ST.data();
  float *m = s.m.data(), *l = s.l.data(), *mx = s.mx.data(), *ms = s.ms.data(), *alpha = s.alpha.data();
  const int32_t *lo = s.lo.data(), *hi = s.hi.data(), *diag = s.diag.data();
  for (int64_t j0 = j_begin / kBK * kBK; j0 < j_end; j0 += kBK) {
    const int64_t j1 = std::min(j0 + kBK, p.Tk), nk = j1 - j0;
    const TileKind kind = classify(s.rr.data(), rows, std::max(j0, j_begin), std::min(j1, j_end));
    if (kind == TileKind::kNone) continue;
    const float *Kr, *Vr;
    int64_t ld;
    if (keys.Kf != nullptr) {
      Kr = keys.Kf + j0 * keys.skt_f, Vr = keys.Vf + j0 * keys.skt_f, ld = keys.skt_f;
    } else {
      load_rows(keys.K + j0 * keys.skt, keys.skt, nk, p.d, 1.0f, s.Kt.data(), dpad);
      load_rows(keys.V + j0 * keys.skt, keys.skt, nk, p.d, 1.0f, s.Vt.data(), dpad);
      Kr = s.Kt.data(), Vr = s.Vt.data(), ld = dpad;
    }
    matmul(nk, rp, dpad, Kr, ld, 1, s.QT.data(), rp, ST, rp, false);
    if (kind == TileKind::kPartial || j0 < j_begin || j1 > j_end) {
      for (int64_t c = 0; c < nk; ++c) {
        const int32_t j = static_cast<int32_t>(j0 + c);
        float* row = ST + c * rp;
        if (j < j_begin || j >= j_end) {
          std::fill(row, row + rp, kNegInf);
          continue;
        }
        for (int64_t r = 0; r < rp; ++r) {
          const bool vis = (j >= lo[r] && j < hi[r]) || j == diag[r];
          row[r] = vis ? row[r] : kNegInf;
        }
      }
    }
    std::fill(mx, mx + rp, kNegInf);
    for (int64_t c = 0; c < nk; ++c) {
      const float* row = ST + c * rp;
      for (int64_t r = 0; r < rp; ++r) mx[r] = max_keep_nan(mx[r], row[r]);
    }
    for (int64_t r = 0; r < rp; ++r) {
      const float mn = max_keep_nan(m[r], mx[r]);
      ms[r] = mn == kNegInf ? 0.0f : mn;  // a row that has seen nothing yet: exponents stay -inf -> 0
      alpha[r] = exp2_neg(m[r] - ms[r]);
      m[r] = mn;
      l[r] *= alpha[r];
    }
    for (int64_t c = 0; c < nk; ++c) {
      float* row = ST + c * rp;
      for (int64_t r = 0; r < rp; ++r) {
        row[r] = exp2_neg(row[r] - ms[r]);
        l[r] += row[r];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (alpha[r] == 1.0f) continue;
      float* o = s.O.data() + r * dpad;
      for (int64_t c = 0; c < dpad; ++c) o[c] *= alpha[r];
    }
    // O[rows x dpad] += P V, with P(r, c) = ST[c][r] read transposed as the broadcast operand.
    matmul(rows, dpad, nk, ST, 1, rp, Vr, ld, s.O.data(), dpad, true);
  }
}

inline void union_range(const RowRange* rr, int64_t rows, int64_t& lo, int64_t& hi) {
  lo = std::numeric_limits<int64_t>::max();
  hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (rr[r].empty()) continue;
    lo = std::min(lo, rr[r].first());
    hi = std::max(hi, rr[r].last());
  }
  if (lo >= hi) lo = hi = 0;
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix,
                     const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset,
                     double scale) {
  check_qkv(q, k, v);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              msg("glm attention kernels take float32, bfloat16 or float16 (they compute in fp32), got ", q.scalar_type(),
                  "; use the 'sdpa' or 'reference' backend for other dtypes"));
  check_structure(q, k, prefix, kv_start, kv_len, q_offset);
  const int64_t B = q.size(0), Tq = q.size(2);
  Problem p;
  p.B = B; p.n = q.size(1); p.g = k.size(1); p.Tq = Tq; p.Tk = k.size(2); p.d = q.size(3);
  p.dpad = round_up(p.d, 16);
  p.causal = causal; p.q_offset = q_offset; p.scale = static_cast<float>(scale);
  p.prefix = prefix.data_ptr<int32_t>();
  p.kv_start = kv_start.data_ptr<int32_t>();
  p.kv_len = kv_len.data_ptr<int32_t>();
  return p;
}

inline at::Tensor last_dim_contiguous(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// Row results besides the output: lse (natural log) for the caller, and (max, log2 sum) in the log2
// domain for the backward. Keeping the max apart matters: P = exp2((s - max) - log2 sum) is exact
// for the largest score, whereas exp2(s - lse) loses |lse| * eps of relative accuracy when the
// logits are large (a 1e-5 error at logits ~100 in fp32).
inline void write_stats(float m, float l, int64_t at, float* lse, float* stats) {
  const bool seen = !(l == 0.0f);  // a NaN sum is "seen": its lse and stats stay NaN
  lse[at] = seen ? (m + std::log2(l)) * kLn2 : kNegInf;
  stats[2 * at] = seen ? m : kNegInf;
  stats[2 * at + 1] = seen ? std::log2(l) : 0.0f;
}

// What the forward and decode kernels share: inputs with a unit-stride last dim (and one stride set
// for k and v), the problem, and the three outputs (out in q's dtype; lse and stats fp32).
struct ForwardIO {
  at::Tensor q, k, v, out, lse, stats;
  Problem p;
  ForwardIO(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& prefix,
            const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset, double scale)
      : q(last_dim_contiguous(q_)), k(last_dim_contiguous(k_)), v(last_dim_contiguous(v_)) {
    if (k.strides() != v.strides()) k = k.contiguous(), v = v.contiguous();  // one stride set addresses both
    p = make_problem(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
    out = at::empty({p.B, p.n, p.Tq, p.d}, q.options());
    lse = at::empty({p.B, p.n, p.Tq}, q.options().dtype(at::kFloat));
    stats = at::empty({p.B, p.n, p.Tq, 2}, q.options().dtype(at::kFloat));
  }
};

// Query positions per work item: about 64 rows per item once the group's heads are stacked.
inline int64_t q_block(const Problem& p) { return std::max<int64_t>(1, 128 / p.group()); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward: out [B, n, Tq, d] (q's dtype), lse [B, n, Tq] fp32 natural log (-inf for an empty row).

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                             const at::Tensor& v_, const at::Tensor& prefix,
                                                             const at::Tensor& kv_start, const at::Tensor& kv_len,
                                                             bool causal, int64_t q_offset, double scale) {
  const ForwardIO io(q_, k_, v_, prefix, kv_start, kv_len, causal, q_offset, scale);
  const at::Tensor &q = io.q, &k = io.k, &v = io.v, &out = io.out, &lse = io.lse, &stats = io.stats;
  const Problem& p = io.p;
  if (q.numel() == 0) return {out, lse, stats};
  const int64_t G = p.group(), bq = q_block(p), nqb = (p.Tq + bq - 1) / bq;
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  // The kernel multiplies fp32 rows of width dpad. Inputs that are not already that get converted
  // once per (sample, KV head) when several query blocks reuse the keys, else tile by tile.
  const bool direct = q.scalar_type() == at::kFloat && p.d == p.dpad;
  const bool pack = !direct && nqb > 1;
  // Uninitialised (at::empty, not a zero-filled vector): every element is written before it is read.
  const at::Tensor packed = at::empty({pack ? 2 * p.B * p.g * p.Tk * p.dpad : 0}, q.options().dtype(at::kFloat));
  float* packed_k = packed.data_ptr<float>();
  float* packed_v = packed_k + (pack ? p.B * p.g * p.Tk * p.dpad : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "glm_attention_fwd", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    float* sp = stats.data_ptr<float>();
    auto keys_of = [&](int64_t b, int64_t kh) {
      const int64_t koff = b * k.stride(0) + kh * k.stride(1);
      Keys<scalar_t> keys{kp + koff, vp + koff, k.stride(2)};
      if (direct) {
        keys.Kf = reinterpret_cast<const float*>(keys.K), keys.Vf = reinterpret_cast<const float*>(keys.V);
        keys.skt_f = keys.skt;
      } else if (pack) {
        keys.Kf = packed_k + (b * p.g + kh) * p.Tk * p.dpad;
        keys.Vf = packed_v + (b * p.g + kh) * p.Tk * p.dpad;
        keys.skt_f = p.dpad;
      }
      return keys;
    };
    if (pack) {
      at::parallel_for(0, p.B * p.g, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bg = begin; bg < end; ++bg) {
          const Keys<scalar_t> keys = keys_of(bg / p.g, bg % p.g);
          load_rows(keys.K, keys.skt, p.Tk, p.d, 1.0f, const_cast<float*>(keys.Kf), p.dpad);
          load_rows(keys.V, keys.skt, p.Tk, p.d, 1.0f, const_cast<float*>(keys.Vf), p.dpad);
        }
      });
    }
    // Later query blocks see more keys under a causal mask: hand them out first.
    run_items(p.B * p.g * nqb, [&] { return FwdScratch(G * bq, p.dpad); }, [&](int64_t it, FwdScratch& s) {
      const int64_t qb = nqb - 1 - it % nqb, bg = it / nqb, b = bg / p.g, kh = bg % p.g;
      const int64_t t0 = qb * bq, nt = std::min(bq, p.Tq - t0), rows = G * nt;
      load_queries(p, qp, qs, b, kh * G, G, t0, nt, s);
      int64_t lo, hi;
      union_range(s.rr.data(), rows, lo, hi);
      attend_range(p, keys_of(b, kh), rows, lo, hi, s);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = kh * G + r / nt, t = t0 + r % nt;
        const float l = s.l[r], inv = l == 0.0f ? 0.0f : 1.0f / l;  // NaN stays NaN
        scalar_t* o = op + ((b * p.n + h) * p.Tq + t) * p.d;
        const float* src = s.O.data() + r * p.dpad;
        for (int64_t c = 0; c < p.d; ++c) o[c] = static_cast<scalar_t>(src[c] * inv);
        write_stats(s.m[r], l, (b * p.n + h) * p.Tq + t, lp, sp);
      }
    });
  });
  return {out, lse, stats};
}

// ---------------------------------------------------------------------------------------------
// Decode: the same result as attention_fwd, for few query rows against a long cache. The work is
// split along the keys (flash-decoding): each item is one (sample, KV head, key chunk) with all query
// rows of the group, leaving a partial (max, sum, output); a second pass merges the chunks.

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_decode(const at::Tensor& q_, const at::Tensor& k_,
                                                                const at::Tensor& v_, const at::Tensor& prefix,
                                                                const at::Tensor& kv_start, const at::Tensor& kv_len,
                                                                bool causal, int64_t q_offset, double scale) {
  const ForwardIO io(q_, k_, v_, prefix, kv_start, kv_len, causal, q_offset, scale);
  const at::Tensor &q = io.q, &k = io.k, &v = io.v, &out = io.out, &lse = io.lse, &stats = io.stats;
  const Problem& p = io.p;
  if (q.numel() == 0) return {out, lse, stats};
  const int64_t G = p.group(), rows = G * p.Tq, dpad = p.dpad;
  // Chunks: enough items for every thread to get several, never fewer keys than one tile.
  const int64_t threads = at::get_num_threads();
  const int64_t want = std::max<int64_t>(1, (4 * threads + p.B * p.g - 1) / (p.B * p.g));
  const int64_t chunk = std::max<int64_t>(kBK, round_up((p.Tk + want - 1) / want, kBK));
  const int64_t nch = (p.Tk + chunk - 1) / chunk;
  // Partials per (b, kv head, chunk): m [rows], l [rows], O [rows, dpad].
  std::vector<float> pm(p.B * p.g * nch * rows), pl(pm.size()), po(pm.size() * dpad);
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "glm_attention_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    run_items(p.B * p.g * nch, [&] { return FwdScratch(rows, dpad); }, [&](int64_t it, FwdScratch& s) {
      const int64_t c = it % nch, bg = it / nch, b = bg / p.g, kh = bg % p.g;
      load_queries(p, qp, qs, b, kh * G, G, 0, p.Tq, s);
      int64_t lo, hi;
      union_range(s.rr.data(), rows, lo, hi);
      lo = std::max(lo, c * chunk);
      hi = std::min(hi, (c + 1) * chunk);
      const int64_t koff = b * k.stride(0) + kh * k.stride(1);
      if (lo < hi) {
        Keys<scalar_t> keys{kp + koff, vp + koff, k.stride(2)};
        if (q.scalar_type() == at::kFloat && p.d == p.dpad) {
          keys.Kf = reinterpret_cast<const float*>(keys.K), keys.Vf = reinterpret_cast<const float*>(keys.V);
          keys.skt_f = keys.skt;
        }
        attend_range(p, keys, rows, lo, hi, s);
      } else {
        std::fill(s.m.begin(), s.m.begin() + rows, kNegInf);
        std::fill(s.l.begin(), s.l.begin() + rows, 0.0f);
      }
      std::copy(s.m.begin(), s.m.begin() + rows, pm.begin() + it * rows);
      std::copy(s.l.begin(), s.l.begin() + rows, pl.begin() + it * rows);
      if (lo < hi) std::copy(s.O.begin(), s.O.begin() + rows * dpad, po.begin() + it * rows * dpad);
    });
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    float* sp = stats.data_ptr<float>();
    at::parallel_for(0, p.B * p.g * rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(dpad);
      for (int64_t x = begin; x < end; ++x) {
        const int64_t r = x % rows, bg = x / rows, b = bg / p.g, kh = bg % p.g;
        float m = kNegInf;
        for (int64_t c = 0; c < nch; ++c) m = max_keep_nan(m, pm[(bg * nch + c) * rows + r]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float l = 0.0f;
        if (m != kNegInf) {
          for (int64_t c = 0; c < nch; ++c) {
            const int64_t at_ = (bg * nch + c) * rows + r;
            if (pl[at_] == 0.0f) continue;
            const float w = exp2_neg(pm[at_] - m);
            l += pl[at_] * w;
            const float* o = po.data() + at_ * dpad;
            for (int64_t e = 0; e < dpad; ++e) acc[e] += o[e] * w;
          }
        }
        const int64_t h = kh * G + r / p.Tq, t = r % p.Tq;
        const float inv = l == 0.0f ? 0.0f : 1.0f / l;
        scalar_t* o = op + ((b * p.n + h) * p.Tq + t) * p.d;
        for (int64_t e = 0; e < p.d; ++e) o[e] = static_cast<scalar_t>(acc[e] * inv);
        write_stats(m, l, (b * p.n + h) * p.Tq + t, lp, sp);
      }
    });
  });
  return {out, lse, stats};
}

// ---------------------------------------------------------------------------------------------
// Backward. One work item per (sample, query head): it owns dQ of that head outright and writes
// dK, dV of that head into fp32 per-head buffers, summed over each KV group at the end, so no two
// threads ever touch the same memory. For each key tile, the query tiles that see it:
//   P = exp2((S2 - m) - log2 l),  dV += P^T dO,  dP = dO V^T,
//   dS = scale * P o (dP - D)  with D = rowsum(dO o O) - grad_lse,  dK += dS^T Q,  dQ += dS K.

constexpr int64_t kBQ = 64;

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_, const at::Tensor& glse_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& stats_, const at::Tensor& prefix, const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal,
    int64_t q_offset, double scale) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor dout = dout_.contiguous(), out = out_.contiguous(), stats = stats_.contiguous();
  const at::Tensor glse = glse_.to(at::kFloat).contiguous();
  const Problem p = make_problem(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "glm attention bwd: grad/out shape mismatch");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 * p.B * p.n * p.Tq &&
              glse.numel() == p.B * p.n * p.Tq,
              "glm attention bwd: stats must be the forward's fp32 [B,n,Tq,2] and grad_lse [B,n,Tq]");
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t G = p.group(), dpad = p.dpad, d = p.d;
  // Key tiles are computed 16 keys wide at a time (the short last one too), so K^T and V^T need
  // only that much padding.
  const int64_t Tkp = round_up(std::max<int64_t>(p.Tk, 1), 16);
  if (q.numel() == 0 || p.Tk == 0) {
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  // fp32 inputs whose rows are already dpad wide are read in place: K as the rows of dQ += dS K, and,
  // without head groups, dK and dV written straight into the outputs. Otherwise fp32 copies / per
  // query head buffers (each head's dK, dV summed over its group at the end).
  // Every buffer is allocated uninitialised: the allocations are the size of the inputs, and
  // zero-filling them cost as much as the products at short lengths.
  const bool direct = q.scalar_type() == at::kFloat && d == dpad;
  const bool in_place = direct && G == 1;
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor per_head = in_place ? at::Tensor() : at::empty({2 * p.B * p.n * p.Tk * dpad}, f32);
  float* dkh = in_place ? dk.data_ptr<float>() : per_head.data_ptr<float>();
  float* dvh = in_place ? dv.data_ptr<float>() : dkh + p.B * p.n * p.Tk * dpad;
  // K and V transposed, [dpad x Tkp] per (sample, KV head), zero-padded, made once for all the
  // group's query heads by ATen's (vectorised, parallel) strided copy; K's rows likewise unless
  // read in place.
  const at::Tensor k_rows = direct ? at::Tensor() : at::empty({p.B, p.g, p.Tk, dpad}, f32);
  const at::Tensor k_t = at::empty({p.B, p.g, dpad, Tkp}, f32), v_t = at::empty({p.B, p.g, dpad, Tkp}, f32);
  if (!direct) k_rows.narrow(3, 0, d).copy_(k);
  k_t.narrow(2, 0, d).narrow(3, 0, p.Tk).copy_(k.transpose(2, 3));
  v_t.narrow(2, 0, d).narrow(3, 0, p.Tk).copy_(v.transpose(2, 3));
  if (Tkp > p.Tk) {
    k_t.narrow(3, p.Tk, Tkp - p.Tk).zero_();
    v_t.narrow(3, p.Tk, Tkp - p.Tk).zero_();
  }
  if (dpad > d) {
    k_rows.narrow(3, d, dpad - d).zero_();
    k_t.narrow(2, d, dpad - d).zero_();
    v_t.narrow(2, d, dpad - d).zero_();
  }
  const float* k_rows_p = direct ? k.data_ptr<float>() : k_rows.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "glm_attention_bwd", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* dop = dout.data_ptr<scalar_t>();
    const scalar_t* outp = out.data_ptr<scalar_t>();
    const float* statp = stats.data_ptr<float>();
    const float* glsep = glse.data_ptr<float>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    struct Scratch {
      std::vector<float> Q, Qc, dO, dQ, Dr, M2, LL, P, dP, dK, dV;
      std::vector<RowRange> rr;
    };
    const int64_t Tqp = round_up(p.Tq, kBQ);
    auto init = [&] {
      Scratch s;
      s.Q.resize(Tqp * dpad); s.Qc.resize(Tqp * dpad); s.dO.resize(Tqp * dpad); s.dQ.resize(Tqp * dpad);
      s.Dr.resize(Tqp); s.M2.resize(Tqp); s.LL.resize(Tqp); s.rr.resize(p.Tq);
      s.P.resize(kBQ * kBK); s.dP.resize(kBQ * kBK); s.dK.resize(kBK * dpad); s.dV.resize(kBK * dpad);
      return s;
    };
    run_items(p.B * p.n, init, [&](int64_t it, Scratch& s) {
      const int64_t b = it / p.n, h = it % p.n, kh = h / G;
      const int64_t qo = (b * p.n + h) * p.Tq * d;
      load_rows(qp + qo, d, p.Tq, d, 1.0f, s.Q.data(), dpad);
      // The scores exactly as the forward rounded them: same pre-scaled q, same summation order.
      load_rows(qp + qo, d, p.Tq, d, p.scale * kLog2e, s.Qc.data(), dpad);
      load_rows(dop + qo, d, p.Tq, d, 1.0f, s.dO.data(), dpad);
      std::fill(s.dQ.begin(), s.dQ.end(), 0.0f);
      for (int64_t t = 0; t < p.Tq; ++t) {
        const scalar_t* o = outp + qo + t * d;
        const float* g_ = s.dO.data() + t * dpad;
        float acc = 0.0f;
        for (int64_t c = 0; c < d; ++c) acc += g_[c] * to_f(o[c]);
        // d lse / d s = P, so a gradient on lse enters exactly like -D: dS = P o (dP - (D - g_lse)).
        s.Dr[t] = acc - glsep[(b * p.n + h) * p.Tq + t];
        s.M2[t] = statp[2 * ((b * p.n + h) * p.Tq + t)];
        s.LL[t] = statp[2 * ((b * p.n + h) * p.Tq + t) + 1];
        s.rr[t] = row_range(p, b, t);
      }
      const float* Kf = k_rows_p + (b * p.g + kh) * p.Tk * dpad;
      const float* KT = k_t.data_ptr<float>() + (b * p.g + kh) * dpad * Tkp;
      const float* VT = v_t.data_ptr<float>() + (b * p.g + kh) * dpad * Tkp;
      float* dKh = dkh + (b * p.n + h) * p.Tk * dpad;
      float* dVh = dvh + (b * p.n + h) * p.Tk * dpad;
      for (int64_t j0 = 0; j0 < p.Tk; j0 += kBK) {
        // A short last tile is computed nkp = nk rounded up to 16 keys wide, not kBK: at Tk = 64 the
        // full width doubled every product of the backward.
        const int64_t j1 = std::min(j0 + kBK, p.Tk), nk = j1 - j0, nkp = round_up(nk, 16);
        bool touched = false;
        for (int64_t t0 = 0; t0 < p.Tq; t0 += kBQ) {
          const int64_t nt = std::min(kBQ, p.Tq - t0);
          const TileKind kind = classify(s.rr.data() + t0, nt, j0, j1);
          if (kind == TileKind::kNone) continue;
          if (!touched) {
            std::fill(s.dK.begin(), s.dK.end(), 0.0f);
            std::fill(s.dV.begin(), s.dV.end(), 0.0f);
            touched = true;
          }
          float* P = s.P.data();
          float* dP = s.dP.data();
          const float* Qi = s.Q.data() + t0 * dpad;
          const float* dOi = s.dO.data() + t0 * dpad;
          matmul(nt, nkp, dpad, s.Qc.data() + t0 * dpad, dpad, 1, KT + j0, Tkp, P, kBK, false);
          matmul(nt, nkp, dpad, dOi, dpad, 1, VT + j0, Tkp, dP, kBK, false);
          for (int64_t r = 0; r < nt; ++r) {
            const RowRange& x = s.rr[t0 + r];
            float* pr = P + r * kBK;
            float* dpr = dP + r * kBK;
            const float m2 = s.M2[t0 + r], ll = s.LL[t0 + r], D = s.Dr[t0 + r];
            if (m2 == kNegInf) {  // empty row: no probability mass, no gradient
              std::fill(pr, pr + kBK, 0.0f);
              std::fill(dpr, dpr + kBK, 0.0f);
              continue;
            }
            for (int64_t c = 0; c < nkp; ++c) {
              const float e = exp2_neg((pr[c] - m2) - ll);
              pr[c] = e;
              dpr[c] = p.scale * e * (dpr[c] - D);
            }
            if (kind == TileKind::kPartial || nk < kBK) {  // zero what the row does not see
              zero_unseen(x, j0, nk, pr);
              zero_unseen(x, j0, nk, dpr);
            }
          }
          // dV_j += P^T dO_i ; dK_j += dS^T Q_i ; dQ_i += dS K_j
          matmul(nkp, dpad, nt, P, 1, kBK, dOi, dpad, s.dV.data(), dpad, true);
          matmul(nkp, dpad, nt, dP, 1, kBK, Qi, dpad, s.dK.data(), dpad, true);
          // (nk, not nkp: K has only Tk rows; dS is zero past nk.)
          matmul(nt, dpad, nk, dP, kBK, 1, Kf + j0 * dpad, dpad, s.dQ.data() + t0 * dpad, dpad, true);
        }
        if (touched) {
          std::copy(s.dK.begin(), s.dK.begin() + nk * dpad, dKh + j0 * dpad);
          std::copy(s.dV.begin(), s.dV.begin() + nk * dpad, dVh + j0 * dpad);
        } else {
          std::fill(dKh + j0 * dpad, dKh + j1 * dpad, 0.0f);
          std::fill(dVh + j0 * dpad, dVh + j1 * dpad, 0.0f);
        }
      }
      scalar_t* dqo = dqp + qo;
      for (int64_t t = 0; t < p.Tq; ++t)
        for (int64_t c = 0; c < d; ++c) dqo[t * d + c] = static_cast<scalar_t>(s.dQ[t * dpad + c]);
    });
  });
  if (in_place) return {dq, dk, dv};
  // Sum the per-head dK, dV over each group's query heads.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "glm_attention_bwd_reduce", [&] {
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, p.B * p.g * p.Tk, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> ak(d), av(d);
      for (int64_t x = begin; x < end; ++x) {
        const int64_t j = x % p.Tk, bg = x / p.Tk, b = bg / p.g, kh = bg % p.g;
        std::fill(ak.begin(), ak.end(), 0.0f);
        std::fill(av.begin(), av.end(), 0.0f);
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t off = ((b * p.n + kh * G + hh) * p.Tk + j) * dpad;
          for (int64_t c = 0; c < d; ++c) { ak[c] += dkh[off + c]; av[c] += dvh[off + c]; }
        }
        for (int64_t c = 0; c < d; ++c) {
          dkp[x * d + c] = static_cast<scalar_t>(ak[c]);
          dvp[x * d + c] = static_cast<scalar_t>(av[c]);
        }
      }
    });
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY(glm, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_len, Tensor kv_start, Tensor kv_len, "
        "bool causal, int q_offset, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor prefix_len, "
        "Tensor kv_start, Tensor kv_len, bool causal, int q_offset, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, Tensor prefix_len, Tensor kv_start, Tensor kv_len, "
        "bool causal, int q_offset, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(glm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_decode", &attention_decode);
}

}  // namespace glm_kernels

// An empty Python module, so that `import glm.kernels._C` loads the library (and with it the op
// registrations of every file in it: the ones above and small_linear.cpp's) through the normal import
// machinery.
extern "C" {
#include <Python.h>
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "glm's compiled attention ops (torch.ops.glm)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
}
