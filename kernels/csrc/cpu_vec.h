// What the CPU ops share (attention_cpu.cpp, small_linear.cpp, elementwise_cpu.cpp, quant_cpu.cpp): a
// vectorisable 2^x, a 16-float vector type, the target's register-wide vector, the loaders that widen
// any float dtype to fp32, and the frame of the few-row linears (their thread split and row dispatch).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace glm_kernels {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 2^x for x <= 0, exactly 0 below -126 (and for -inf). Round-to-nearest range reduction leaves
// f in [-0.5, 0.5], where the degree-7 Taylor polynomial of 2^f is accurate to ~5e-9 relative, below
// fp32 rounding. Written branch-free on plain floats so GCC vectorises the loops that call it.
inline float exp2_neg(float x) {
  const float xc = x < -126.0f ? -126.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = xc + shifter;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const float n = t - shifter;
  const float f = xc - n;
  float p = 1.5252733804059841e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const int32_t bits = ((ti - 0x4B400000) + 127) << 23;  // 2^n as a float's exponent field
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -126.0f ? 0.0f : p * scale;
}

// 16 floats as one GCC/Clang vector, which the compiler maps onto whatever the target has (one
// AVX-512 register, two AVX2 registers, ...). The hot loops are written with it rather than left to
// the auto-vectoriser, which picked a shuffle-heavy layout for 16-wide blocks.
typedef float v16 __attribute__((vector_size(64)));

inline v16 loadv(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void storev(float* p, const v16& v) { std::memcpy(p, &v, sizeof v); }

// One vector register of floats on the target (kVecWidth lanes). Register-blocked loops use it rather
// than v16: where v16 is wider than a register GCC keeps arrays of v16 in memory and moves them
// through the stack in 64-bit pieces (an 8 x 2 block of v16 accumulators ran at ~4 GFLOP/s on AVX2).
#if defined(__AVX512F__)
constexpr int kVecWidth = 16;
#elif defined(__AVX__)
constexpr int kVecWidth = 8;
#else
constexpr int kVecWidth = 4;
#endif
typedef float vreg __attribute__((vector_size(4 * kVecWidth)));

inline vreg loadr(const float* p) {
  vreg v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void storer(float* p, const vreg& v) { std::memcpy(p, &v, sizeof v); }

// s in every lane: one broadcast. (Written as a loop over the lanes, it became one insert per lane
// where GCC inlined it into the quantized kernels' loops.) s - 0 is s, -0 included.
inline vreg splat(float s) { return s - vreg{}; }

// Sum of the lanes as a halving tree (lane l + lane l + w, w = width/2, width/4, ...).
inline float hsum(const vreg& v) {
  float lanes[kVecWidth];
  std::memcpy(lanes, &v, sizeof v);
  for (int w = kVecWidth / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// ---------------------------------------------------------------------------------------------
// Tile loading: any float dtype in, fp32 out, zero padding so every N dimension is a multiple of 16.

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// bfloat16 is the top half of a float: widening it is a shift, which (unlike c10's scalar
// conversion) the compiler vectorises.
inline float to_f(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// dst[r * ldd + c] = src row r (rows*d elements, row stride srs), times mul; columns d..ldd-1 zeroed.
template <typename T>
void load_rows(const T* src, int64_t srs, int64_t rows, int64_t d, float mul, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * srs;
    float* o = dst + r * ldd;
    for (int64_t c = 0; c < d; ++c) o[c] = to_f(s[c]) * mul;
    for (int64_t c = d; c < ldd; ++c) o[c] = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// The few-row linears (small_linear.cpp, quant_cpu.cpp): y[M, N] = x[M, K] W[N, K]^T for a few rows of x.

// With a few rows of x the product is a pass over the weights, bound by memory bandwidth, which one core
// cannot saturate: the output features [0, N) are split over all threads, each streaming its own weight
// rows. Ranges are whole multiples of `unit` features (a kernel's register block of weight rows) and at
// least `grain` features; f(n0, n1) runs once per task.
template <typename F>
inline void parallel_over_outputs(int64_t N, int64_t unit, int64_t grain, const F& f) {
  const int64_t units = (N + unit - 1) / unit;
  at::parallel_for(0, units, std::max<int64_t>(1, grain / unit),
                   [&](int64_t u0, int64_t u1) { f(u0 * unit, std::min(N, u1 * unit)); });
}

// f(std::integral_constant<int, m>{}) with m = rows for rows in 1..Max (Max past it), so that a kernel
// templated on its row count (its accumulators live in registers) is instantiated once per count. Such
// kernels are declared GLM_ROW_LOOP (noinline): inlined into the dispatching lambdas, GCC spilled their
// accumulators to the stack, which made small_linear 1.7x slower at 2 and 3 rows and the quantized
// kernels up to 3x slower at 8.
#define GLM_ROW_LOOP __attribute__((noinline))

template <int Max, int M = 1, typename F>
inline void dispatch_rows(int64_t rows, F&& f) {
  if constexpr (M == Max) {
    f(std::integral_constant<int, M>{});
  } else {
    if (rows <= M)
      f(std::integral_constant<int, M>{});
    else
      dispatch_rows<Max, M + 1>(rows, std::forward<F>(f));
  }
}

}  // namespace glm_kernels
