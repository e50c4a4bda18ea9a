// glm::small_linear, the linear layer of decode: y[M, N] = x[M, K] W[N, K]^T (+ b) for a few rows of
// x. With M this small the product is a pass over W, so it is bound by memory bandwidth; MKL's GEMV
// ran it on one core (~13 GB/s on the test machine, and slower still for M = 8), whereas one core
// cannot saturate the memory bus. Here the output features are split over all threads
// (parallel_over_outputs, cpu_vec.h), each weight row is read once for all M rows of x, and bf16/fp16
// weights are widened on the fly.
//
// Built into the same library as the attention ops (glm.kernels._C): attention_cpu.cpp holds the
// library's TORCH_LIBRARY(glm) block, so this file adds its schema with a TORCH_LIBRARY_FRAGMENT.
// kernels/ops.py registers the op's fake and routes glm.kernels.linear to it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"
#include "message.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace glm_kernels {
namespace {

constexpr int kLinearMaxRows = 8;

// kVecWidth consecutive weights widened to fp32 in one register (bf16: zero-extend and shift into the
// top half). Register-wide, not v16: with arrays of v16 accumulators GCC spilled to the stack on AVX2,
// which made this kernel 2.6-4x slower than F.linear there.
typedef uint16_t u16xW __attribute__((vector_size(2 * kVecWidth)));
typedef uint32_t u32xW __attribute__((vector_size(4 * kVecWidth)));

inline vreg load_widen(const float* p) { return loadr(p); }

inline vreg load_widen(const at::BFloat16* p) {
  u16xW h;
  std::memcpy(&h, p, sizeof h);
  const u32xW wide = __builtin_convertvector(h, u32xW) << 16;
  vreg f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

template <typename T>
inline vreg load_widen(const T* p) {
  vreg f;
  for (int l = 0; l < kVecWidth; ++l) f[l] = to_f(p[l]);
  return f;
}

template <typename T, int M>
GLM_ROW_LOOP void linear_rows(const float* x, int64_t kpad, const T* w, int64_t swn, int64_t K, int64_t n0, int64_t n1,
                 const T* bias, T* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * swn;
    vreg acc[M];
    for (int m = 0; m < M; ++m) acc[m] = vreg{};
    int64_t k = 0;
    // Prefetch the weight row two ahead: at 8 rows the loop is compute-heavy enough that the
    // hardware prefetcher alone leaves the memory bus idle between rows.
    const char* ahead = reinterpret_cast<const char*>(wr + 2 * swn);
    for (; k + kVecWidth <= K; k += kVecWidth) {
      if (n + 2 < n1) __builtin_prefetch(ahead + k * sizeof(T), 0, 0);
      const vreg wv = load_widen(wr + k);
      for (int m = 0; m < M; ++m) acc[m] += wv * loadr(x + m * kpad + k);
    }
    for (int m = 0; m < M; ++m) {
      float sum = hsum(acc[m]);
      for (int64_t kk = k; kk < K; ++kk) sum += to_f(wr[kk]) * x[m * kpad + kk];
      if (bias != nullptr) sum += to_f(bias[n]);
      y[m * N + n] = static_cast<T>(sum);
    }
  }
}

}  // namespace

at::Tensor small_linear(const at::Tensor& x_, const at::Tensor& w_, const c10::optional<at::Tensor>& b_) {
  TORCH_CHECK(x_.dim() == 2 && w_.dim() == 2 && x_.size(1) == w_.size(1),
              msg("glm small_linear: x must be [M, K] and weight [N, K], got ", x_.sizes(), " and ", w_.sizes()));
  TORCH_CHECK(x_.size(0) <= kLinearMaxRows, msg("glm small_linear: at most ", kLinearMaxRows, " rows, got ", x_.size(0)));
  TORCH_CHECK(x_.scalar_type() == w_.scalar_type(), "glm small_linear: x and weight must share a dtype");
  const at::Tensor x = x_.contiguous(), w = w_.stride(1) == 1 ? w_ : w_.contiguous();
  const at::Tensor b = b_.has_value() ? b_->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == w.size(0) && b.scalar_type() == w.scalar_type()),
              "glm small_linear: bias must be [N] in the weight's dtype");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), kpad = round_up(K, 16);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "glm_small_linear", [&] {
    std::vector<float> xf(M * kpad, 0.0f);
    load_rows(x.data_ptr<scalar_t>(), K, M, K, 1.0f, xf.data(), kpad);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    parallel_over_outputs(N, 1, 64, [&](int64_t n0, int64_t n1) {
      dispatch_rows<kLinearMaxRows>(M, [&](auto rows) {
        linear_rows<scalar_t, rows>(xf.data(), kpad, wp, w.stride(0), K, n0, n1, bp, yp, N);
      });
    });
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(glm, m) { m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(glm, CPU, m) { m.impl("small_linear", &small_linear); }

}  // namespace glm_kernels
