// The small model's elementwise layers as one pass each, forward and backward (fp32, CPU):
//
// - glm::rms_norm(x [.., H], weight [H], eps) -> (y, rstd [rows]):  y = weight * (x * rstd),
//   rstd = 1 / sqrt(mean(x^2) + eps) (transformers' Glm order, which in fp32 is ChatGLM2's too);
//   glm::rms_norm_bwd(grad, x, weight, rstd) -> (grad_x, grad_weight).
// - glm::rope(x [B, h, T, d], cos, sin [B|1, T, S * d2/2], segments) -> y [B, h, T, d] contiguous:
//   the half-split rotary embedding of glm.model.Rotary (segment s = dims [s*d2, (s+1)*d2), dim j of
//   its first half paired with j + d2/2), the dims past S * d2 copied. The backward is the same op
//   with the rotation reversed (`inverse`), as a rotation's transpose is its inverse.
// - glm::swiglu(h [.., 2F]) -> silu(h[.., :F]) * h[.., F:];  glm::swiglu_bwd(grad, h) -> grad_h.
//
// Plain PyTorch spends 6-10 elementwise kernels (and the temporaries between them) on each of these,
// forward and backward again; at the widths of a small model each of those is a full pass over
// memory with little arithmetic, which is what made glm's training step slower than a GPT-2 loop
// of the same size.
//
// The autograd formulas are here too (torch::autograd::Function, registered for the Autograd key):
// written as Python autograd functions they cost ~0.2 ms of interpreter time per call, as much as
// the kernels themselves at these sizes. A backward that is itself being differentiated
// (create_graph=True) runs in ATen ops on the saved inputs, so higher-order gradients stay exact.
// kernels/ops.py registers the fake impls and keeps the plain-PyTorch references the tests compare
// against.
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu_vec.h"
#include "message.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace glm_kernels {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Rows per parallel chunk: ~32k elements, so a small call runs on one thread without a fork.
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// sum(a[i] * b[i]) in register-wide partial sums (a plain float loop is not vectorised: without
// -ffast-math the compiler keeps the sequential summation order).
inline float dot(const float* a, const float* b, int64_t n) {
  vreg acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * kVecWidth <= n; i += 2 * kVecWidth) {
    acc0 += loadr(a + i) * loadr(b + i);
    acc1 += loadr(a + i + kVecWidth) * loadr(b + i + kVecWidth);
  }
  for (; i + kVecWidth <= n; i += kVecWidth) acc0 += loadr(a + i) * loadr(b + i);
  acc0 += acc1;
  float s = 0.0f;
  for (int j = 0; j < kVecWidth; ++j) s += acc0[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// sum(a[i] * b[i] * c[i]), as `dot`.
inline float dot3(const float* a, const float* b, const float* c, int64_t n) {
  vreg acc{};
  int64_t i = 0;
  for (; i + kVecWidth <= n; i += kVecWidth) acc += loadr(a + i) * loadr(b + i) * loadr(c + i);
  float s = 0.0f;
  for (int j = 0; j < kVecWidth; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i] * c[i];
  return s;
}

// sigmoid(x) from 2^-|x| log2(e) (exact at the tails: 0 and 1 where fp32 saturates).
inline float sigmoid(float x) {
  const float e = exp2_neg(-std::fabs(x) * kLog2e);
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(),
              msg("glm ", op, ": ", name, " must be a float32 CPU tensor, got ", t.scalar_type(),
                  " (the op computes in fp32; other dtypes take the plain-PyTorch path)"));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// RMSNorm

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x_, const at::Tensor& weight_, double eps) {
  check_float(x_, "rms_norm", "x");
  check_float(weight_, "rms_norm", "weight");
  const int64_t H = x_.size(-1);
  TORCH_CHECK(weight_.dim() == 1 && weight_.size(0) == H,
              msg("glm rms_norm: weight must be [", H, "] for x ", x_.sizes(), ", got ", weight_.sizes()));
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  const int64_t rows = H ? x.numel() / H : 0;
  at::Tensor y = at::empty_like(x), rstd = at::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * H;
      float* yr = yp + r * H;
      const float inv = 1.0f / std::sqrt(dot(xr, xr, H) / static_cast<float>(H) + e);
      rp[r] = inv;
      for (int64_t i = 0; i < H; ++i) yr[i] = wp[i] * (xr[i] * inv);
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_, const at::Tensor& x_,
                                                const at::Tensor& weight_, const at::Tensor& rstd_) {
  check_float(grad_, "rms_norm_bwd", "grad");
  check_float(x_, "rms_norm_bwd", "x");
  check_float(weight_, "rms_norm_bwd", "weight");
  check_float(rstd_, "rms_norm_bwd", "rstd");
  const at::Tensor g = grad_.contiguous(), x = x_.contiguous(), w = weight_.contiguous(), rstd = rstd_.contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(g.sizes() == x.sizes() && w.numel() == H && rstd.numel() == rows,
              "glm rms_norm_bwd: grad must match x, weight be [H] and rstd [rows] (the forward's)");
  at::Tensor dx = at::empty_like(x);
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  // grad_weight = sum over rows of grad * xhat: one partial sum per thread, added up afterwards.
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(threads * H, 0.0f);
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t r0, int64_t r1) {
    float* __restrict dw = partial.data() + at::get_thread_num() * H;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict gr = gp + r * H;
      const float* __restrict xr = xp + r * H;
      float* __restrict dr = dxp + r * H;
      const float inv = rp[r];
      // With xhat = x inv:  dx = inv (g w - xhat mean(g w xhat)) = inv (g w - x k),  k = inv^2 sum(g w x) / H.
      const float k = inv * inv * dot3(gr, wp, xr, H) / static_cast<float>(H);
      for (int64_t i = 0; i < H; ++i) {
        dr[i] = inv * (gr[i] * wp[i] - xr[i] * k);
        dw[i] += gr[i] * (xr[i] * inv);
      }
    }
  });
  at::Tensor dw = at::zeros({H}, x.options());
  float* dwp = dw.data_ptr<float>();
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < H; ++i) dwp[i] += partial[t * H + i];
  return {dx, dw};
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

at::Tensor rope(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, int64_t segments,
                bool inverse) {
  check_float(x_, "rope", "x");
  check_float(cos_, "rope", "cos");
  check_float(sin_, "rope", "sin");
  TORCH_CHECK(x_.dim() == 4, msg("glm rope: x must be [B, heads, T, head_dim], got ", x_.sizes()));
  const int64_t B = x_.size(0), h = x_.size(1), T = x_.size(2), d = x_.size(3);
  const at::Tensor x = x_.stride(3) == 1 ? x_ : x_.contiguous();
  const at::Tensor c = cos_.contiguous(), s = sin_.contiguous();
  TORCH_CHECK(segments >= 1 && c.dim() == 3 && c.sizes() == s.sizes() && (c.size(0) == B || c.size(0) == 1) &&
                  c.size(1) == T,
              msg("glm rope: cos and sin must be [B or 1, T, segments * half] = [", B, ", ", T, ", ...] for x ",
                  x_.sizes(), ", got ", c.sizes(), " and ", s.sizes()));
  const int64_t half = c.size(2) / segments, seg = 2 * half, rot = segments * seg;
  TORCH_CHECK(c.size(2) == segments * half && rot <= d,
              msg("glm rope: ", segments, " segment(s) of cos width ", c.size(2), " do not fit head dim ", d));
  at::Tensor y = at::empty({B, h, T, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2), cw = c.size(2);
  const int64_t cb = c.size(0) == 1 ? 0 : T * cw;
  const float sign = inverse ? -1.0f : 1.0f;
  at::parallel_for(0, B * h, std::max<int64_t>(1, grain_rows(T * d)), [&](int64_t i0, int64_t i1) {
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / h, hh = bh % h;
      for (int64_t t = 0; t < T; ++t) {
        const float* __restrict xr = xp + b * sb + hh * sh + t * st;
        const float* __restrict cr = cp + b * cb + t * cw;
        const float* __restrict sr = sp + b * cb + t * cw;
        float* __restrict yr = yp + (bh * T + t) * d;
        for (int64_t k = 0; k < segments; ++k) {
          const int64_t o = k * seg, oc = k * half;
          for (int64_t j = 0; j < half; ++j) {
            const float x1 = xr[o + j], x2 = xr[o + half + j], cs = cr[oc + j], sn = sign * sr[oc + j];
            yr[o + j] = x1 * cs - x2 * sn;
            yr[o + half + j] = x2 * cs + x1 * sn;
          }
        }
        for (int64_t j = rot; j < d; ++j) yr[j] = xr[j];
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

at::Tensor swiglu(const at::Tensor& h_) {
  check_float(h_, "swiglu", "h");
  const int64_t F2 = h_.size(-1), F = F2 / 2;
  TORCH_CHECK(F2 % 2 == 0, msg("glm swiglu: the last dim holds [gate | up] and must be even, got ", F2));
  const at::Tensor h = h_.contiguous();
  const int64_t rows = F2 ? h.numel() / F2 : 0;
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, h.options());
  const float* hp = h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(F2), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = hp + r * F2;
      const float* u = g + F;
      float* o = yp + r * F;
      for (int64_t i = 0; i < F; ++i) o[i] = g[i] * sigmoid(g[i]) * u[i];
    }
  });
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& grad_, const at::Tensor& h_) {
  check_float(grad_, "swiglu_bwd", "grad");
  check_float(h_, "swiglu_bwd", "h");
  const at::Tensor g_out = grad_.contiguous(), h = h_.contiguous();
  const int64_t F2 = h.size(-1), F = F2 / 2, rows = F2 ? h.numel() / F2 : 0;
  TORCH_CHECK(g_out.numel() == rows * F, "glm swiglu_bwd: grad must be the forward's output shape");
  at::Tensor dh = at::empty_like(h);
  const float* gp = g_out.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  float* dp = dh.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(F2), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = hp + r * F2;
      const float* u = g + F;
      const float* go = gp + r * F;
      float* dg = dp + r * F2;
      float* du = dg + F;
      for (int64_t i = 0; i < F; ++i) {
        const float sg = sigmoid(g[i]);
        // d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
        dg[i] = go[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
        du[i] = go[i] * g[i] * sg;
      }
    }
  });
  return dh;
}

// ---------------------------------------------------------------------------------------------
// Autograd

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op through the dispatcher, to be called below autograd (under AutoDispatchBelowADInplaceOrView):
// its CPU kernel, or a fake/meta impl while tracing.
template <typename Fn>
auto below_autograd(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = below_autograd<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>(
        "glm::rms_norm");
    auto [y, rstd] = op.call(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({rstd});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    if (!at::GradMode::is_enabled()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = below_autograd<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&)>(
          "glm::rms_norm_bwd");
      auto [dx, dw] = op.call(g, x, w, rstd);
      return {dx, dw, at::Tensor()};
    }
    const double eps = ctx->saved_data["eps"].toDouble();
    const at::Tensor r = at::rsqrt(x.pow(2).mean(-1, true) + eps), xhat = x * r, gw = g * w;
    const at::Tensor dx = r * (gw - xhat * (gw * xhat).mean(-1, true));
    return {dx, (g * xhat).reshape({-1, x.size(-1)}).sum(0), at::Tensor()};
  }
};

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                               int64_t segments, bool inverse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = below_autograd<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               bool)>("glm::rope");
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["segments"] = segments;
    ctx->saved_data["inverse"] = inverse;
    return {op.call(x, cos, sin, segments, inverse)};
  }

  // A rotation's transpose is its inverse; the op is linear in x, so its backward is itself.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t segments = ctx->saved_data["segments"].toInt();
    const bool inverse = ctx->saved_data["inverse"].toBool();
    at::Tensor dx;
    if (grads[0].defined() && at::GradMode::is_enabled()) {
      dx = RopeFunction::apply(grads[0], saved[0], saved[1], segments, !inverse)[0];
    } else if (grads[0].defined()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = below_autograd<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                 bool)>("glm::rope");
      dx = op.call(grads[0], saved[0], saved[1], segments, !inverse);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct SwigluFunction : public torch::autograd::Function<SwigluFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = below_autograd<at::Tensor(const at::Tensor&)>("glm::swiglu");
    ctx->save_for_backward({h});
    return {op.call(h)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor h = ctx->get_saved_variables()[0];
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor()};
    if (!at::GradMode::is_enabled()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      static auto op = below_autograd<at::Tensor(const at::Tensor&, const at::Tensor&)>("glm::swiglu_bwd");
      return {op.call(g, h)};
    }
    const auto parts = h.chunk(2, -1);
    const at::Tensor &gate = parts[0], &up = parts[1], sg = at::sigmoid(gate);
    return {at::cat({g * up * sg * (1 + gate * (1 - sg)), g * gate * sg}, -1)};
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto out = RmsNormFunction::apply(x, weight, eps);
  return {out[0], out[1]};
}

at::Tensor rope_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t segments,
                         bool inverse) {
  return RopeFunction::apply(x, cos, sin, segments, inverse)[0];
}

at::Tensor swiglu_autograd(const at::Tensor& h) { return SwigluFunction::apply(h)[0]; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(glm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, int segments, bool inverse) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("swiglu_bwd(Tensor grad, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("rope", &rope);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

TORCH_LIBRARY_IMPL(glm, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("rope", &rope_autograd);
  m.impl("swiglu", &swiglu_autograd);
}

}  // namespace glm_kernels
