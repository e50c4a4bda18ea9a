// glm::int8_linear and glm::int4_linear, the weight-only quantized linear layers of decode:
// y[M, N] = x[M, K] W[N, K]^T (+ b) with W[n, k] = q[n, k] * scales[n, k / group_size].
//
// Layout (THUDM's QuantizedLinear, which glm keeps as its own):
// - int8: qweight int8 [N, K].
// - int4: qweight int8 [N, K / 2], input column 2j in the high nibble of byte j and 2j + 1 in the low
//   one, both two's-complement: high = (int8)b >> 4, low = (int8)(b << 4) >> 4.
// - scales [N, G] (or [N], meaning G = 1) in fp32, fp16 or bf16: one scale per output row (G = 1) or
//   per group of K / G consecutive input columns.
//
// Like glm::small_linear these products are a pass over the weights, bound by memory bandwidth for a
// few rows of x, so the output features are split over all threads (parallel_over_outputs) and each
// weight row is read once for all rows of x. The integers are widened to fp32 in registers, exactly
// (an int8 or int4 is exact in fp32), and never written out. Accumulation is fp32; x may be fp32, bf16
// or fp16 and the result has x's dtype.
//
// The weights are read in blocks (Int8Block, Int4Block: per lane, a block's weights share one scale) by
// two loops:
// - one row of x (decode): with groups, each block's products are summed first and the block's scales
//   applied to that sum (one FMA per block, not a multiply per weight vector);
// - 2..8 rows of x: each decoded weight vector is scaled once and multiplied into every row of x, over
//   slices of K whose x (every row) stays in L1; with the whole of x (128 KB for 8 rows of 4096 columns)
//   every weight row read x again from L2.
// More rows of x are taken eight at a time from a tile of weight rows that stays in L2 (a slow GEMM:
// glm.kernels routes many rows to dequantize-then-F.linear). Group sizes the blocks cannot follow
// (blocks_fit) dequantize each weight row with a scalar loop, then use vector FMAs.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"
#include "message.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace glm_kernels {
namespace {

constexpr int kMaxRows = 8;          // rows of x per pass over a weight tile
constexpr int64_t kSliceFloats = 6144;   // x per K slice, all rows of x (24 KB of the 32 KB L1)
constexpr int64_t kTileBytes = 128 * 1024;  // weight tile re-read for every 8 rows of x past 8 (L2)

// f(std::integral_constant<int, i>{}) for i = 0..N-1. The register-blocked loops index their accumulator
// arrays with these compile-time constants: indexed by a loop counter (even one GCC unrolls later) or by a
// lambda's argument, the arrays stayed in memory and every FMA went through a store and a reload.
template <int N, typename F, int... I>
inline void static_for_impl(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void static_for(const F& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

typedef int32_t i32xW __attribute__((vector_size(4 * kVecWidth)));
typedef uint32_t u32xW __attribute__((vector_size(4 * kVecWidth)));
typedef uint16_t u16xW __attribute__((vector_size(4 * kVecWidth)));
typedef uint8_t u8xW __attribute__((vector_size(4 * kVecWidth)));

// kVecWidth int8s sign-extended to int32 lanes: one vpmovsxbd. (GCC's __builtin_convertvector from an
// int8 vector extracted and shifted each byte in scalar registers, which made the int8 kernel slower
// than fp32.)
inline i32xW load_i8(const int8_t* p) {
  i32xW v;
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &w, sizeof v);
#elif defined(__AVX2__)
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &w, sizeof v);
#elif defined(__AVX__) || !defined(__SSE4_1__)
  // AVX without AVX2 has no 256-bit integer ops; neither has a plain SSE2 build a byte widening.
  for (int l = 0; l < kVecWidth; ++l) v[l] = p[l];
#else
  int32_t bytes;
  std::memcpy(&bytes, p, 4);
  const __m128i w = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(bytes));
  std::memcpy(&v, &w, sizeof v);
#endif
  return v;
}

inline vreg to_vreg(const i32xW& v) { return __builtin_convertvector(v, vreg); }

// The two nibbles of byte b, sign-extended (THUDM's extraction rule).
inline int nib_hi(int8_t b) { return b >> 4; }
inline int nib_lo(int8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4; }

// The byte shuffle (vpshufb: each byte of idx picks one of 16 table bytes, per 16-byte lane) and the
// byte interleaves of a register of packed int4s, where the target has them: the same three intrinsics
// at each width. The AVX-512 path mirrors the AVX2 one (it is not run on the machine these kernels are
// measured on).
#define GLM_NIBBLE_OPS(T, P)                                                                       \
  inline u8xW lookup(const u8xW& t, const u8xW& i) { return (u8xW)P##_shuffle_epi8((T)t, (T)i); }  \
  inline u32xW zip_lo(const u8xW& a, const u8xW& b) { return (u32xW)P##_unpacklo_epi8((T)a, (T)b); } \
  inline u32xW zip_hi(const u8xW& a, const u8xW& b) { return (u32xW)P##_unpackhi_epi8((T)a, (T)b); }
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define GLM_NIBBLE_LOOKUP 1
GLM_NIBBLE_OPS(__m512i, _mm512)
#elif defined(__AVX2__) && !defined(__AVX512F__)
#define GLM_NIBBLE_LOOKUP 1
GLM_NIBBLE_OPS(__m256i, _mm256)
#elif defined(__SSSE3__) && !defined(__AVX__)
#define GLM_NIBBLE_LOOKUP 1
GLM_NIBBLE_OPS(__m128i, _mm)
#endif

// Each nibble's int4 value (0..7, then -8..-1) as a bfloat16, split into its high and low bytes, the 16
// entries repeated in every 16-byte lane for the byte shuffle. bf16 holds -8..7 exactly, and a bf16 in
// the top half of a 32-bit lane is that value as an fp32.
struct NibbleTables {
  u8xW high, low;
};

inline NibbleTables nibble_tables() {
  NibbleTables t;
  for (int i = 0; i < 4 * kVecWidth; ++i) {
    const int u = i % 16;
    const float v = static_cast<float>(u < 8 ? u : u - 16);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    t.high[i] = static_cast<uint8_t>(bits >> 24);
    t.low[i] = static_cast<uint8_t>(bits >> 16);
  }
  return t;
}

// A block of int8 weights: 32 consecutive columns (one 32-column group, or part of a larger one), read as
// 32 / kVecWidth vectors of consecutive columns, each one vpmovsxbd and one conversion.
struct Int8Block {
  static constexpr int kBits = 8, kWeights = 32, kBytes = 32, kVectors = 32 / kVecWidth;
  // use(v, w) for each vector v (an integral_constant) and its weights w.
  template <typename F>
  static void decode(const int8_t* p, const NibbleTables&, const F& use) {
    static_for<kVectors>([&](auto v) { use(v, to_vreg(load_i8(p + v * kVecWidth))); });
  }
  // The block's scales: one for all lanes (groups are whole multiples of 32 columns).
  static vreg scales(const float* s, const i32xW&) { return splat(*s); }
};

// A block of int4 weights: one register of packed bytes (4 * kVecWidth bytes, 8 * kVecWidth columns),
// read as 8 vectors. The nibbles are looked up (byte shuffle) in the tables of their values' bf16 high
// and low bytes, the two bytes interleaved into bf16 words, and each word moved to the top of a 32-bit
// lane by a shift or a mask: the fp32 value, with no sign extension and no int-to-float conversion.
// Those steps fix which column lands in which lane (`column`); x is permuted to match once per call.
// Each 16-byte lane of the register holds 32 consecutive columns, so a block of 64 or 128 columns may hold
// several groups of 32 or 64, one or more lanes each: `scales` gives each lane its group's scale.
struct Int4Block {
  static constexpr int kBits = 4, kWeights = 8 * kVecWidth, kBytes = 4 * kVecWidth, kVectors = 8;
  static constexpr int column(int v, int l) {
    // Vectors 0-3 hold high nibbles (even columns), 4-7 low ones; vector v % 4 = 0, 1 comes from the
    // lane's bytes 0-7 (even bytes by the shift, odd ones by the mask), 2, 3 from bytes 8-15.
    const int r = v % 4, byte = 16 * (l / 4) + 8 * (r / 2) + 2 * (l % 4) + r % 2;
    return 2 * byte + v / 4;
  }
  template <typename F>
  static void decode(const int8_t* p, const NibbleTables& t, const F& use) {
#ifdef GLM_NIBBLE_LOOKUP
    u8xW b;
    std::memcpy(&b, p, sizeof b);
    const u8xW low = b & 0x0F, high = (u8xW)((u16xW)b >> 4) & 0x0F;
    const u32xW top = (u32xW){} + 0xFFFF0000u;
    static_for<2>([&](auto s) {  // s = 0: high nibbles, vectors 0-3; s = 1: low nibbles, vectors 4-7
      const u8xW& idx = s == 0 ? high : low;
      const u8xW th = lookup(t.high, idx), tl = lookup(t.low, idx);
      const u32xW w0 = zip_lo(tl, th), w1 = zip_hi(tl, th);
      use(std::integral_constant<int, 4 * s + 0>{}, (vreg)(w0 << 16));
      use(std::integral_constant<int, 4 * s + 1>{}, (vreg)(w0 & top));
      use(std::integral_constant<int, 4 * s + 2>{}, (vreg)(w1 << 16));
      use(std::integral_constant<int, 4 * s + 3>{}, (vreg)(w1 & top));
    });
#else
    // No byte shuffle on this target (a plain SSE2 or AVX build): the same lanes, one by one.
    static_for<kVectors>([&](auto v) {
      vreg w;
      for (int l = 0; l < kVecWidth; ++l) {
        const int c = column(v, l);
        const int8_t byte = p[c / 2];
        w[l] = static_cast<float>(c % 2 ? nib_lo(byte) : nib_hi(byte));
      }
      use(v, w);
    });
#endif
  }
  // s points at the scale of the block's first group; lane_group[l] is lane l's group counted from it.
  static vreg scales(const float* s, const i32xW& lane_group) {
    if constexpr (kVecWidth == 4) {
      return splat(*s);  // a block is one 16-byte lane: 32 columns, one group
    } else {
      return __builtin_shuffle(loadr(s), lane_group);
    }
  }
};

// Whether the blocks can follow a group size (gs = K / G columns): per-row scales (G = 1) always; groups
// only when each block lies in one group (int8: 32 columns) or, for int4, each of a block's 16-byte lanes
// does (32 columns) and the lanes' groups repeat from block to block. Otherwise rows_generic.
template <class B>
bool blocks_fit(int64_t G, int64_t gs) {
  return G == 1 || (gs % 32 == 0 && (B::kWeights == 32 || gs % B::kWeights == 0 || B::kWeights % gs == 0));
}

// Blocks per K slice for `rows` (2 or more) rows of x: K's `blocks` split evenly into the fewest slices
// whose x (every row) fits in kSliceFloats.
inline int64_t slice_blocks(int64_t rows, int block_weights, int64_t blocks) {
  const int64_t most = std::max<int64_t>(1, kSliceFloats / (rows * block_weights));
  const int64_t slices = std::max<int64_t>(1, (blocks + most - 1) / most);
  return std::max<int64_t>(1, (blocks + slices - 1) / slices);
}

// x as the kernels read it: fp32, in blocks of up to kMaxRows rows; within one, block of weights by block
// of weights (B::kWeights columns), the rows' columns of that block side by side, then the columns past
// the last whole block (the tail) row by row. So a block's x for every row is one contiguous piece at
// fixed offsets (the loops address it from one pointer; x rows 16 KB apart would also compete for the
// same L1 sets). Within a block the columns are in the order the decoded vectors hold them (`order`,
// B::column); block_weights = 0 leaves x [M, K] in natural order (rows_generic).
template <typename T>
void prepare_x(const T* x, int64_t M, int64_t K, int block_weights, const int* order, float* out) {
  const int64_t blocks = block_weights == 0 ? 0 : K / block_weights, body = blocks * block_weights;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    float* base = out + m0 * K;
    for (int64_t m = 0; m < rows; ++m) {
      const T* src = x + (m0 + m) * K;
      for (int64_t b = 0; b < blocks; ++b) {
        float* o = base + (b * rows + m) * block_weights;
        for (int i = 0; i < block_weights; ++i) o[i] = to_f(src[b * block_weights + order[i]]);
      }
      float* tail = base + body * rows + m * (K - body);
      for (int64_t k = body; k < K; ++k) tail[k - body] = to_f(src[k]);
    }
  }
}

// One call's operands, as the loops read them.
struct Problem {
  int64_t M, K, N;
  const int8_t* q;  // qweight rows, row stride ldq
  int64_t ldq, G, gs;
  int gs_shift;        // log2(gs) when gs is a power of two, else -1
  i32xW lane_group;    // Int4Block::scales' lane spread for this group size
  const float* x;      // prepared x (prepare_x)
  const float* bias;   // fp32 [N] or null
  float* y;            // fp32 [M, N]
  NibbleTables tables;

  int64_t group_of(int64_t k) const { return gs_shift >= 0 ? k >> gs_shift : k / gs; }
};

// The `count` scales from element `first` of the scales tensor (`total` elements) as fp32: fp32 scales in
// place, where a vector read from the last of them (Int4Block::scales) stays inside the tensor; others, and
// the tensor's last few, converted into buf.
template <typename S>
inline const float* scales_f32(const S* scales, int64_t first, int64_t count, int64_t total, float* buf) {
  if constexpr (std::is_same_v<S, float>) {
    if (total - first >= count + kVecWidth) return scales + first;
  }
  for (int64_t i = 0; i < count; ++i) buf[i] = to_f(scales[first + i]);
  for (int l = 0; l < kVecWidth; ++l) buf[count + l] = 0.0f;
  return buf;
}

// Weight row n's columns [k0, K) (past the last whole block) times xt (x at those columns, natural
// order), scaled per group unless PerRow (whose row sum is scaled afterwards).
template <int Bits, bool PerRow, typename S>
inline float tail_dot(const Problem& p, const S* scales, int64_t n, int64_t k0, const float* xt) {
  const int8_t* qr = p.q + n * p.ldq;
  float sum = 0.0f;
  for (int64_t k = k0; k < p.K; ++k) {
    const int w = Bits == 8 ? qr[k] : (k % 2 ? nib_lo(qr[k / 2]) : nib_hi(qr[k / 2]));
    const float s = PerRow ? 1.0f : to_f(scales[n * p.G + p.group_of(k)]);
    sum += static_cast<float>(w) * s * xt[k - k0];
  }
  return sum;
}

// One row of x (decode; x: its prepared row, y: its output row), weight rows [n0, n1) one after the other.
// With per-row scales the products go straight into four accumulators, so that the FMA latency is hidden;
// with groups each block's products are summed first (two chains) and the block's scales multiply that sum
// (one FMA per block instead of a multiply per weight vector). Decoding four weight rows together, to share
// each vector of x, measured no faster (int8 ~10% slower: the accumulators no longer fit in registers).
template <class B, typename S, bool PerRow>
GLM_ROW_LOOP void rows_one_x(const Problem& p, const S* scales, const float* x, float* y, int64_t n0, int64_t n1,
                             float* sbuf) {
  // One FMA chain per decoded vector of a block (int4: 8, int8: 4): with fewer, each chain took two
  // dependent FMAs per block and the FMA latency, not the decoding, bounded the loop.
  constexpr int A = B::kVectors;
  // Grouped: the block's products in P chains (two FMAs each for int4), summed before the block's scale.
  constexpr int P = B::kVectors >= 8 ? 4 : 2;
  const int64_t blocks = p.K / B::kWeights, body = blocks * B::kWeights, ldq = p.ldq;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = p.q + n * ldq;
    // Two rows ahead: the hardware prefetcher alone leaves gaps between rows.
    const int8_t* ahead = n + 2 < n1 ? qr + 2 * ldq : nullptr;
    const float* srow = nullptr;
    if constexpr (!PerRow) srow = scales_f32(scales, n * p.G, p.G, p.N * p.G, sbuf);
    vreg acc[A];
    static_for<A>([&](auto a) { acc[a] = vreg{}; });
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * B::kWeights, byte0 = b * B::kBytes;
      if (ahead != nullptr && (byte0 & 63) == 0) __builtin_prefetch(ahead + byte0, 0, 0);
      const float* xb = x + k0;
      if constexpr (PerRow) {
        B::decode(qr + byte0, p.tables, [&](auto v, const vreg& w) { acc[v % A] += w * loadr(xb + v * kVecWidth); });
      } else {
        vreg part[P];
        static_for<P>([&](auto i) { part[i] = vreg{}; });
        B::decode(qr + byte0, p.tables, [&](auto v, const vreg& w) { part[v % P] += w * loadr(xb + v * kVecWidth); });
        vreg sum = part[0];
        static_for<P - 1>([&](auto i) { sum += part[i + 1]; });
        acc[0] += B::scales(srow + p.group_of(k0), p.lane_group) * sum;  // a constant index: in a register
      }
    }
    vreg total = acc[0];
    static_for<A - 1>([&](auto a) { total += acc[a + 1]; });
    float sum = hsum(total) + tail_dot<B::kBits, PerRow>(p, scales, n, body, x + body);
    if (PerRow) sum *= to_f(scales[n]);
    if (p.bias != nullptr) sum += p.bias[n];
    y[n] = sum;
  }
}

// M = 2..kMaxRows rows of x (x: their prepared block, y: their output rows), weight rows [n0, n1): each
// decoded weight vector is scaled once and multiplied into every row of x, with A accumulators per row so
// that the FMA latency is hidden when M is small. K is walked in slices whose x stays in L1; y gathers the
// slices' partial sums and is finished (row scale, bias) at the end.
template <class B, typename S, int M, int A, bool PerRow>
GLM_ROW_LOOP void rows_few_x(const Problem& p, const S* scales, const float* x, float* y, int64_t n0, int64_t n1,
                             float* sbuf) {
  const int64_t blocks = p.K / B::kWeights, body = blocks * B::kWeights, sb = slice_blocks(M, B::kWeights, blocks);
  const int64_t N = p.N, ldq = p.ldq;
  for (int m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) y[m * N + n] = 0.0f;
  for (int64_t s0 = 0; s0 < blocks; s0 += sb) {
    const int64_t s1 = std::min(blocks, s0 + sb);
    const int64_t g_first = PerRow ? 0 : p.group_of(s0 * B::kWeights);
    const int64_t g_count = PerRow ? 0 : p.group_of(s1 * B::kWeights - 1) - g_first + 1;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qr = p.q + n * ldq;
      // Prefetched: this slice of the row two below; past the range's end, the next slice of its first
      // rows. The slice's scales too: read slice by slice, they are a strided stream the hardware misses.
      int64_t ahead_row = -1, ahead_s0 = s0;
      if (n + 2 < n1) {
        ahead_row = n + 2;
      } else if (s1 < blocks && n0 + (n + 2 - n1) < n1) {
        ahead_row = n0 + n + 2 - n1;
        ahead_s0 = s1;
      }
      const int8_t* ahead = ahead_row < 0 ? nullptr : p.q + ahead_row * ldq + (ahead_s0 - s0) * B::kBytes;
      const float* sl = nullptr;  // this row's scales from group g_first
      if constexpr (!PerRow) {
        if (ahead_row >= 0) {
          const char* sa = reinterpret_cast<const char*>(scales + ahead_row * p.G + p.group_of(ahead_s0 * B::kWeights));
          for (int64_t i = 0; i < g_count * static_cast<int64_t>(sizeof(S)); i += 64) __builtin_prefetch(sa + i, 0, 0);
        }
        sl = scales_f32(scales, n * p.G + g_first, g_count, p.N * p.G, sbuf);
      }
      vreg acc[M][A];
      static_for<M>([&](auto m) { static_for<A>([&](auto a) { acc[m][a] = vreg{}; }); });
      for (int64_t b = s0; b < s1; ++b) {
        const int64_t k0 = b * B::kWeights, byte0 = b * B::kBytes;
        if (ahead != nullptr && (byte0 & 63) == 0) __builtin_prefetch(ahead + byte0, 0, 0);
        const float* xb = x + b * M * B::kWeights;  // M rows of this block's columns
        vreg sv;
        if constexpr (!PerRow) sv = B::scales(sl + p.group_of(k0) - g_first, p.lane_group);
        B::decode(qr + byte0, p.tables, [&](auto v, vreg w) {
          if constexpr (!PerRow) w *= sv;
          static_for<M>([&](auto m) { acc[m][v % A] += w * loadr(xb + (m * B::kVectors + v) * kVecWidth); });
        });
      }
      static_for<M>([&](auto m) {
        vreg t = acc[m][0];
        static_for<A - 1>([&](auto a) { t += acc[m][a + 1]; });
        y[m * N + n] += hsum(t);
      });
    }
  }
  const float* xt = x + body * M;  // the tail: M rows of K - body columns
  for (int64_t n = n0; n < n1; ++n)
    for (int m = 0; m < M; ++m) {
      float sum = y[m * N + n] + tail_dot<B::kBits, PerRow>(p, scales, n, body, xt + m * (p.K - body));
      if (PerRow) sum *= to_f(scales[n]);
      if (p.bias != nullptr) sum += p.bias[n];
      y[m * N + n] = sum;
    }
}

// Group sizes the blocks cannot follow (blocks_fit): each weight row is dequantized into fp32 by a scalar
// loop (each weight q * scale, as dequantize_weight forms it), then multiplied into every row of x with
// vector FMAs. x in natural order.
template <int Bits, typename S>
void rows_generic(const Problem& p, const S* scales, int64_t n0, int64_t n1) {
  const int64_t K = p.K, whole = K / (2 * kVecWidth) * (2 * kVecWidth);
  std::vector<float> w(K);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = p.q + n * p.ldq;
    for (int64_t g = 0; g < p.G; ++g) {
      const float s = to_f(scales[n * p.G + g]);
      for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k)
        w[k] = static_cast<float>(Bits == 8 ? qr[k] : (k % 2 ? nib_lo(qr[k / 2]) : nib_hi(qr[k / 2]))) * s;
    }
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xm = p.x + m * K;
      vreg acc[2] = {vreg{}, vreg{}};
      for (int64_t k = 0; k < whole; k += 2 * kVecWidth) {
        acc[0] += loadr(w.data() + k) * loadr(xm + k);
        acc[1] += loadr(w.data() + k + kVecWidth) * loadr(xm + k + kVecWidth);
      }
      float sum = hsum(acc[0] + acc[1]);
      for (int64_t k = whole; k < K; ++k) sum += w[k] * xm[k];
      if (p.bias != nullptr) sum += p.bias[n];
      p.y[m * p.N + n] = sum;
    }
  }
}

// Accumulators per row of x for M rows: enough independent FMA chains to cover the FMA latency where
// registers allow (M x A accumulators, the weight vector and its scales within 16 registers).
template <int M>
constexpr int accumulators() {
  return M == 2 ? 4 : M <= 4 ? 2 : 1;
}

template <class B, typename S, bool PerRow>
void run_blocks(const Problem& p, const S* scales) {
  // Several rows of x take the weight rows a tile at a time: the tile's partial sums (y) stay in L1 beside
  // the K slice of x (over a whole range of weight rows, y streamed through L1 and pushed x out of it), and
  // past kMaxRows rows of x the tile's weights stay in L2 for every block of eight.
  const int64_t tile = p.M == 1 ? p.N : std::clamp<int64_t>(kTileBytes / std::max<int64_t>(p.ldq, 1), 16, 64);
  parallel_over_outputs(p.N, 1, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> sbuf(p.G + kVecWidth);
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
        const float* x = p.x + m0 * p.K;
        float* y = p.y + m0 * p.N;
        dispatch_rows<kMaxRows>(std::min<int64_t>(kMaxRows, p.M - m0), [&](auto rows) {
          if constexpr (rows == 1)
            rows_one_x<B, S, PerRow>(p, scales, x, y, t0, t1, sbuf.data());
          else
            rows_few_x<B, S, rows, accumulators<rows>(), PerRow>(p, scales, x, y, t0, t1, sbuf.data());
        });
      }
    }
  });
}

template <int Bits, typename S>
void quant_linear_impl(Problem& p, const S* scales) {
  using B = std::conditional_t<Bits == 8, Int8Block, Int4Block>;
  if (!blocks_fit<B>(p.G, p.gs)) {
    parallel_over_outputs(p.N, 1, 16, [&](int64_t n0, int64_t n1) { rows_generic<Bits>(p, scales, n0, n1); });
  } else if (p.G == 1) {
    run_blocks<B, S, true>(p, scales);
  } else {
    for (int l = 0; l < kVecWidth; ++l) p.lane_group[l] = static_cast<int32_t>((32 * (l / 4)) / p.gs);
    run_blocks<B, S, false>(p, scales);
  }
}

at::Tensor quant_linear(int bits, const char* name, const at::Tensor& x_, const at::Tensor& qw_,
                        const at::Tensor& scales_, const c10::optional<at::Tensor>& b_) {
  TORCH_CHECK(x_.dim() == 2, msg("glm ", name, ": x must be [M, K], got ", x_.sizes()));
  const auto xt = x_.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              msg("glm ", name, ": x must be float32, bfloat16 or float16, got ", xt));
  TORCH_CHECK(qw_.dim() == 2 && qw_.scalar_type() == at::kChar,
              msg("glm ", name, ": qweight must be a 2-D int8 tensor, got ", qw_.scalar_type(), " ", qw_.sizes()));
  const int64_t M = x_.size(0), K = x_.size(1), N = qw_.size(0);
  const int64_t packed = bits == 4 ? K / 2 : K;
  TORCH_CHECK(bits == 8 || K % 2 == 0, msg("glm ", name, ": K (x's last dim) must be even for packed int4, got ", K));
  TORCH_CHECK(qw_.size(1) == packed,
              msg("glm ", name, ": qweight must be [N, ", bits == 4 ? "K / 2" : "K", "] = [N, ", packed,
                  "] for x ", x_.sizes(), ", got ", qw_.sizes()));
  TORCH_CHECK((scales_.dim() == 2 || scales_.dim() == 1) && scales_.size(0) == N,
              msg("glm ", name, ": scales must be [N, G] (or [N]) with N = ", N, ", got ", scales_.sizes()));
  const auto st = scales_.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              msg("glm ", name, ": scales must be float32, bfloat16 or float16, got ", st));
  const int64_t G = scales_.dim() == 2 ? scales_.size(1) : 1;
  TORCH_CHECK(G >= 1 && K % G == 0,
              msg("glm ", name, ": scales' group count G = ", G, " must divide K = ", K, " (groups of K / G columns)"));
  TORCH_CHECK(bits == 8 || (K / G) % 2 == 0,
              msg("glm ", name, ": the int4 group size K / G = ", K / G, " must be even (a byte holds two columns)"));
  at::Tensor b;
  if (b_.has_value()) {
    TORCH_CHECK(b_->dim() == 1 && b_->size(0) == N && at::isFloatingType(b_->scalar_type()),
                msg("glm ", name, ": bias must be a floating [N] = [", N, "] tensor, got ", b_->sizes()));
    b = b_->to(at::kFloat).contiguous();
  }
  const at::Tensor qw = qw_.stride(1) == 1 ? qw_ : qw_.contiguous();
  const at::Tensor sc = scales_.contiguous();
  const at::Tensor x = x_.contiguous();
  auto yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return yf.to(xt);
  if (K == 0) {
    yf.zero_();
    if (b.defined()) yf += b;
    return yf.to(xt);
  }
  Problem p{};
  p.M = M;
  p.K = K;
  p.N = N;
  p.G = G;
  p.gs = K / G;
  p.gs_shift = (p.gs & (p.gs - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(p.gs)) : -1;
  p.q = qw.data_ptr<int8_t>();
  p.ldq = qw.stride(0);
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.y = yf.data_ptr<float>();
  p.tables = nibble_tables();
  // The column order of a block of weights (identity for int8), and no blocks for rows_generic.
  const bool fit = bits == 8 ? blocks_fit<Int8Block>(G, p.gs) : blocks_fit<Int4Block>(G, p.gs);
  const int block_weights = !fit ? 0 : bits == 8 ? Int8Block::kWeights : Int4Block::kWeights;
  int order[Int4Block::kWeights];
  for (int v = 0; v < Int4Block::kVectors; ++v)
    for (int l = 0; l < kVecWidth; ++l)
      order[v * kVecWidth + l] = bits == 8 ? v * kVecWidth + l : Int4Block::column(v, l);
  std::vector<float> xf(M * K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "glm_quant_linear_x", [&] {
    prepare_x(x.data_ptr<scalar_t>(), M, K, block_weights, order, xf.data());
  });
  p.x = xf.data();
  auto run = [&](auto* sp) {
    if (bits == 8)
      quant_linear_impl<8>(p, sp);
    else
      quant_linear_impl<4>(p, sp);
  };
  if (st == at::kFloat)
    run(sc.data_ptr<float>());
  else if (st == at::kHalf)
    run(sc.data_ptr<at::Half>());
  else
    run(sc.data_ptr<at::BFloat16>());
  return xt == at::kFloat ? yf : yf.to(xt);
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  return quant_linear(8, "int8_linear", x, qweight, scales, bias);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  return quant_linear(4, "int4_linear", x, qweight, scales, bias);
}

TORCH_LIBRARY_FRAGMENT(glm, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}

}  // namespace glm_kernels
