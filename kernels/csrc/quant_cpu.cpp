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
// few rows of x, so the output features are split over all threads and each weight row is read once
// for all rows of x. The weights are widened to fp32 in registers (an int8 or int4 times an fp16/bf16
// scale is exact in fp32, so the dequantized weight is the reference's exactly) and never written out.
// Accumulation is fp32; x may be fp32, bf16 or fp16 and the result has x's dtype.
//
// Rows of x are taken eight at a time. Past eight the weights are read once per block of eight from
// a cache-sized tile of weight rows, so large M works but is a slow GEMM: kernels/ops.py routes large
// M to dequantize-and-matmul instead.
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
#include <vector>

namespace glm_kernels {
namespace {

constexpr int kRowBlock = 8;
// Weight rows per tile when x has more than kRowBlock rows: the tile is re-read once per block of
// rows, so it should stay in L2.
constexpr int64_t kTileBytes = 128 * 1024;

typedef int32_t i32xW __attribute__((vector_size(4 * kVecWidth)));
typedef uint32_t u32xW __attribute__((vector_size(4 * kVecWidth)));

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

inline vreg splat(float s) {
  vreg v;
  for (int l = 0; l < kVecWidth; ++l) v[l] = s;
  return v;
}

inline float hsum(const vreg& v) {
  float lanes[kVecWidth];
  std::memcpy(lanes, &v, sizeof v);
  for (int w = kVecWidth / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// The two nibbles of byte b, sign-extended (THUDM's extraction rule).
inline int nib_hi(int8_t b) { return b >> 4; }
inline int nib_lo(int8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4; }

// x as the kernels read it: fp32, row stride K. For int4 each group's columns are reordered in
// chunks of 2 * kVecWidth (even columns, then odd ones), so that the high and low nibbles of
// kVecWidth bytes, widened in place, multiply contiguous vectors of x without a shuffle. A group's
// last group_size % (2 * kVecWidth) columns keep their order (the scalar tail reads them).
template <typename T>
std::vector<float> prepare_x(const T* x, int64_t M, int64_t K, int64_t gs, bool deinterleave) {
  std::vector<float> out(M * K);
  for (int64_t m = 0; m < M; ++m) {
    const T* s = x + m * K;
    float* o = out.data() + m * K;
    if (!deinterleave) {
      for (int64_t k = 0; k < K; ++k) o[k] = to_f(s[k]);
      continue;
    }
    for (int64_t g0 = 0; g0 < K; g0 += gs) {
      int64_t k = g0;
      for (; k + 2 * kVecWidth <= g0 + gs; k += 2 * kVecWidth)
        for (int l = 0; l < kVecWidth; ++l) {
          o[k + l] = to_f(s[k + 2 * l]);
          o[k + kVecWidth + l] = to_f(s[k + 2 * l + 1]);
        }
      for (; k < g0 + gs; ++k) o[k] = to_f(s[k]);
    }
  }
  return out;
}

// Output rows n0..n1 for M rows of x (x: prepared, row stride K; y: fp32, row stride N). With PerRow
// (G = 1) the scale multiplies the finished dot product; with groups it multiplies each widened
// weight vector, so the accumulators stay M registers whatever the group count.
template <int Bits, typename S, int M, bool PerRow>
void quant_rows(const float* x, int64_t K, const int8_t* q, int64_t ldq, const S* scales, int64_t G, int64_t n0,
                int64_t n1, const float* bias, float* y, int64_t N) {
  const int64_t gs = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * ldq;
    // Two rows ahead, as in small_linear: the hardware prefetcher alone leaves gaps between rows.
    const char* ahead = reinterpret_cast<const char*>(qr + 2 * ldq);
    const bool prefetch = n + 2 < n1;
    vreg acc[M];
    float tail[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = vreg{};
      tail[m] = 0.0f;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float s = PerRow ? 1.0f : to_f(scales[n * G + g]);
      const vreg sv = splat(s);
      const int64_t k1 = (g + 1) * gs;
      int64_t k = g * gs;
      if constexpr (Bits == 8) {
        for (; k + kVecWidth <= k1; k += kVecWidth) {
          if (prefetch && (k & 63) == 0) __builtin_prefetch(ahead + k, 0, 0);
          vreg w = to_vreg(load_i8(qr + k));
          if (!PerRow) w *= sv;
          for (int m = 0; m < M; ++m) acc[m] += w * loadr(x + m * K + k);
        }
        for (; k < k1; ++k) {
          const float w = static_cast<float>(qr[k]) * s;
          for (int m = 0; m < M; ++m) tail[m] += w * x[m * K + k];
        }
      } else {
        for (; k + 2 * kVecWidth <= k1; k += 2 * kVecWidth) {
          if (prefetch && ((k / 2) & 63) == 0) __builtin_prefetch(ahead + k / 2, 0, 0);
          const i32xW b = load_i8(qr + k / 2);
          // Low nibble: shifted to the top as unsigned (no signed overflow), then back down arithmetically.
          const i32xW low = (i32xW)((u32xW)b << 28) >> 28;
          vreg hi = to_vreg(b >> 4), lo = to_vreg(low);
          if (!PerRow) {
            hi *= sv;
            lo *= sv;
          }
          for (int m = 0; m < M; ++m) {
            const float* xm = x + m * K + k;
            // Two separate updates: as one expression GCC emitted mul + fma + add.
            acc[m] += hi * loadr(xm);
            acc[m] += lo * loadr(xm + kVecWidth);
          }
        }
        for (; k < k1; k += 2) {
          const int8_t byte = qr[k / 2];
          const float wh = static_cast<float>(nib_hi(byte)) * s, wl = static_cast<float>(nib_lo(byte)) * s;
          for (int m = 0; m < M; ++m) tail[m] += wh * x[m * K + k] + wl * x[m * K + k + 1];
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      float sum = hsum(acc[m]) + tail[m];
      if (PerRow) sum *= to_f(scales[n]);
      if (bias != nullptr) sum += bias[n];
      y[m * N + n] = sum;
    }
  }
}

// The common case, every group a whole number of vector chunks (C columns: kVecWidth int8s, or the
// 2 * kVecWidth nibbles of kVecWidth bytes) and a power-of-two count of them (log2: shift): the loop runs
// over the row's chunks regardless of groups, each chunk's weights scaled by its group's scale, with U
// independent accumulators per row of x. One accumulator made M = 1 wait on the FMA latency (4 cycles
// per chunk), which capped int8 at ~5 GB/s per core.
template <int Bits, typename S, int M, int U, bool PerRow>
void quant_rows_chunked(const float* x, int64_t K, const int8_t* q, int64_t ldq, const S* scales, int64_t G,
                        int shift, int64_t n0, int64_t n1, const float* bias, float* y, int64_t N) {
  constexpr int C = Bits == 8 ? kVecWidth : 2 * kVecWidth;
  const int64_t chunks = K / C;
  std::vector<float> sbuf(std::is_same_v<S, float> || PerRow ? 0 : G);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * ldq;
    const char* ahead = reinterpret_cast<const char*>(qr + 2 * ldq);
    const bool prefetch = n + 2 < n1;
    const float* srow = nullptr;
    if constexpr (!PerRow) {
      if constexpr (std::is_same_v<S, float>) {
        srow = scales + n * G;
      } else {
        for (int64_t g = 0; g < G; ++g) sbuf[g] = to_f(scales[n * G + g]);
        srow = sbuf.data();
      }
    }
    vreg acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = vreg{};
    auto step = [&](int64_t c, int u) {
      const int64_t k = c * C;
      if constexpr (Bits == 8) {
        vreg w = to_vreg(load_i8(qr + k));
        if constexpr (!PerRow) w *= splat(srow[c >> shift]);
        for (int m = 0; m < M; ++m) acc[m][u] += w * loadr(x + m * K + k);
      } else {
        const i32xW b = load_i8(qr + k / 2);
        const i32xW low = (i32xW)((u32xW)b << 28) >> 28;
        vreg hi = to_vreg(b >> 4), lo = to_vreg(low);
        if constexpr (!PerRow) {
          const vreg sv = splat(srow[c >> shift]);
          hi *= sv;
          lo *= sv;
        }
        for (int m = 0; m < M; ++m) {
          acc[m][u] += hi * loadr(x + m * K + k);
          acc[m][u] += lo * loadr(x + m * K + k + kVecWidth);
        }
      }
    };
    int64_t c = 0;
    for (; c + U <= chunks; c += U) {
      if (prefetch) __builtin_prefetch(ahead + c * C * Bits / 8, 0, 0);
      for (int u = 0; u < U; ++u) step(c + u, u);
    }
    for (; c < chunks; ++c) step(c, 0);
    for (int m = 0; m < M; ++m) {
      vreg total = acc[m][0];
      for (int u = 1; u < U; ++u) total += acc[m][u];
      float sum = hsum(total);
      // Columns past the last whole chunk (per-row scales only: grouped rows are whole chunks).
      for (int64_t k = chunks * C; k < K; k += Bits == 8 ? 1 : 2) {
        if constexpr (Bits == 8) {
          sum += static_cast<float>(qr[k]) * x[m * K + k];
        } else {
          const int8_t byte = qr[k / 2];
          sum += static_cast<float>(nib_hi(byte)) * x[m * K + k] + static_cast<float>(nib_lo(byte)) * x[m * K + k + 1];
        }
      }
      if (PerRow) sum *= to_f(scales[n]);
      if (bias != nullptr) sum += bias[n];
      y[m * N + n] = sum;
    }
  }
}

template <int Bits, typename S, bool PerRow>
void quant_block_chunked(int rows, const float* x, int64_t K, const int8_t* q, int64_t ldq, const S* sc, int64_t G,
                         int shift, int64_t n0, int64_t n1, const float* bias, float* y, int64_t N) {
  switch (rows) {
    case 1: quant_rows_chunked<Bits, S, 1, 4, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    case 2: quant_rows_chunked<Bits, S, 2, 2, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    case 3: quant_rows_chunked<Bits, S, 3, 2, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    case 4: quant_rows_chunked<Bits, S, 4, 2, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    case 5: quant_rows_chunked<Bits, S, 5, 1, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    case 6: quant_rows_chunked<Bits, S, 6, 1, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    case 7: quant_rows_chunked<Bits, S, 7, 1, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
    default: quant_rows_chunked<Bits, S, 8, 1, PerRow>(x, K, q, ldq, sc, G, shift, n0, n1, bias, y, N); break;
  }
}

template <int Bits, typename S, bool PerRow>
void quant_block(int rows, const float* x, int64_t K, const int8_t* q, int64_t ldq, const S* sc, int64_t G,
                 int64_t n0, int64_t n1, const float* bias, float* y, int64_t N) {
  switch (rows) {
    case 1: quant_rows<Bits, S, 1, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    case 2: quant_rows<Bits, S, 2, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    case 3: quant_rows<Bits, S, 3, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    case 4: quant_rows<Bits, S, 4, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    case 5: quant_rows<Bits, S, 5, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    case 6: quant_rows<Bits, S, 6, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    case 7: quant_rows<Bits, S, 7, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
    default: quant_rows<Bits, S, 8, PerRow>(x, K, q, ldq, sc, G, n0, n1, bias, y, N); break;
  }
}

template <int Bits, typename S>
void quant_linear_impl(const float* x, int64_t M, int64_t K, const int8_t* q, int64_t ldq, const S* sc, int64_t G,
                       int64_t N, const float* bias, float* y) {
  const int64_t row_bytes = std::max<int64_t>(ldq, 1);
  const int64_t tile = M <= kRowBlock ? N : std::max<int64_t>(1, kTileBytes / row_bytes);
  // The chunked loop applies when each group is 2^shift whole chunks (always with per-row scales).
  constexpr int64_t C = Bits == 8 ? kVecWidth : 2 * kVecWidth;
  const int64_t gs = K / G, cpg = gs / C;
  const bool chunked = G == 1 || (gs % C == 0 && (cpg & (cpg - 1)) == 0);
  int shift = 0;
  while (G > 1 && (int64_t{1} << shift) < cpg) ++shift;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, M - m0));
        if (chunked && G == 1)
          quant_block_chunked<Bits, S, true>(rows, x + m0 * K, K, q, ldq, sc, G, shift, t0, t1, bias, y + m0 * N, N);
        else if (chunked)
          quant_block_chunked<Bits, S, false>(rows, x + m0 * K, K, q, ldq, sc, G, shift, t0, t1, bias, y + m0 * N, N);
        else
          quant_block<Bits, S, false>(rows, x + m0 * K, K, q, ldq, sc, G, t0, t1, bias, y + m0 * N, N);
      }
    }
  });
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
  std::vector<float> xf;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "glm_quant_linear_x", [&] {
    xf = prepare_x(x.data_ptr<scalar_t>(), M, K, K / G, bits == 4);
  });
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int8_t* qp = qw.data_ptr<int8_t>();
  float* yp = yf.data_ptr<float>();
  auto run = [&](auto* sp) {
    if (bits == 8)
      quant_linear_impl<8>(xf.data(), M, K, qp, qw.stride(0), sp, G, N, bp, yp);
    else
      quant_linear_impl<4>(xf.data(), M, K, qp, qw.stride(0), sp, G, N, bp, yp);
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
