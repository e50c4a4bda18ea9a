// What the CPU ops share (attention_cpu.cpp, small_linear.cpp): a 16-float vector type and the
// loaders that widen any float dtype to fp32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace glm_kernels {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

}  // namespace glm_kernels
