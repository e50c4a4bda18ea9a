// The torch side of the CUDA attention kernels: the CUDA implementations of glm::attention_fwd,
// glm::attention_decode and glm::attention_bwd (schemas in attention_cpu.cpp), with their argument
// checks and allocations. The kernels themselves are in attention_cuda.cu; this file is compiled by
// the host compiler, so every error is an ordinary c10::Error raised from host code.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "attention_cuda.h"
#include "checks.h"
#include "message.h"

namespace glm_kernels_cuda {
namespace {

using glm_kernels::msg;

constexpr float kLog2e = 1.4426950408889634f;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, msg("glm attention (CUDA): ", what, " failed: ", cudaGetErrorString(err)));
}

DType dtype_of(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kHalf; }

// cp.async moves 16-byte chunks: the base must be 16-byte aligned and every row stride a multiple of
// 8 elements; anything else is copied to a contiguous tensor first.
at::Tensor aligned(const at::Tensor& x) {
  const bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0;
  return ok ? x : x.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix,
                  const at::Tensor& kv_start, const at::Tensor& kv_len, int64_t q_offset) {
  glm_kernels::check_qkv(q, k, v);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              msg("glm attention CUDA kernels take bfloat16 or float16 (tensor cores, fp32 accumulation), got ",
                  q.scalar_type(), "; use the 'sdpa' or 'reference' backend for float32/float64 on CUDA"));
  const int64_t d = q.size(3);
  TORCH_CHECK(d % 8 == 0 && d <= 128, msg("glm attention CUDA kernels take head dims that are multiples of 8 up to "
                                          "128, got ", d, "; use the 'sdpa' backend for this model"));
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && prefix.device() == q.device() &&
                  kv_start.device() == q.device() && kv_len.device() == q.device(),
              msg("glm attention: all tensors must be on ", q.device().str()));
  glm_kernels::check_structure(q, k, prefix, kv_start, kv_len, q_offset);
  const int64_t B = q.size(0), Tq = q.size(2);
  TORCH_CHECK(q.size(1) * Tq < INT_MAX / 2 && k.size(2) < INT_MAX / 2 && B * k.size(1) < 65536,
              "glm attention (CUDA): sizes too large for the kernels' grid");
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix,
                   const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset,
                   double scale) {
  check_inputs(q, k, v, prefix, kv_start, kv_len, q_offset);
  Params p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_st = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_st = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_st = v.stride(2);
  p.prefix = prefix.data_ptr<int>(), p.kv_start = kv_start.data_ptr<int>(), p.kv_len = kv_len.data_ptr<int>();
  p.B = q.size(0), p.n = q.size(1), p.g = k.size(1), p.group = p.n / p.g, p.Tq = q.size(2), p.Tk = k.size(2);
  p.d = q.size(3), p.rows = p.group * p.Tq;
  p.q_offset = q_offset, p.causal = causal;
  p.scale = static_cast<float>(scale), p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.num_splits = 1, p.tiles_per_split = 0;
  return p;
}

struct Forward {
  at::Tensor q, k, v, out, lse, stats;
  Params p;
  Forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& prefix,
          const at::Tensor& kv_start, const at::Tensor& kv_len, bool causal, int64_t q_offset, double scale)
      : q(aligned(q_)), k(aligned(k_)), v(aligned(v_)) {
    p = make_params(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
    out = at::empty({p.B, p.n, p.Tq, p.d}, q.options());
    lse = at::empty({p.B, p.n, p.Tq}, q.options().dtype(at::kFloat));
    stats = at::empty({p.B, p.n, p.Tq, 2}, q.options().dtype(at::kFloat));
    p.out = out.data_ptr(), p.lse = lse.data_ptr<float>(), p.stats = stats.data_ptr<float>();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& prefix,
                                                                  const at::Tensor& kv_start, const at::Tensor& kv_len,
                                                                  bool causal, int64_t q_offset, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  Forward f(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
  if (f.out.numel() > 0) check(forward(f.p, dtype_of(f.q), c10::cuda::getCurrentCUDAStream()), "attention forward");
  return {f.out, f.lse, f.stats};
}

// Decode: the forward kernel with the keys split across blocks so that a handful of query rows still
// fills the GPU, then a merge. The split count depends only on shapes (never on kv_len's values), so
// a CUDA graph captured once stays valid as the cache fills.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_decode_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const at::Tensor& prefix,
                                                                     const at::Tensor& kv_start,
                                                                     const at::Tensor& kv_len, bool causal,
                                                                     int64_t q_offset, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  Forward f(q, k, v, prefix, kv_start, kv_len, causal, q_offset, scale);
  Params& p = f.p;
  if (f.out.numel() == 0) return {f.out, f.lse, f.stats};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int bm = forward_block_rows(p);
  const int64_t blocks = static_cast<int64_t>((p.rows + bm - 1) / bm) * p.B * p.g;
  const int tiles = (p.Tk + kKeyTile - 1) / kKeyTile;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  // About 4 blocks per SM, each with at least 4 key tiles (256 keys).
  int splits = static_cast<int>(std::min<int64_t>((4 * sms + blocks - 1) / blocks, (tiles + 3) / 4));
  splits = std::max(1, std::min(splits, 64));
  if (splits > 1) {
    p.tiles_per_split = (tiles + splits - 1) / splits;
    p.num_splits = (tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  }
  if (p.num_splits == 1) {
    check(forward(p, dtype_of(f.q), stream), "attention decode");
    return {f.out, f.lse, f.stats};
  }
  at::Tensor part_o = at::empty({p.num_splits, p.B, p.n, p.Tq, p.d}, f.q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({p.num_splits, p.B, p.n, p.Tq, 2}, f.q.options().dtype(at::kFloat));
  p.part_o = part_o.data_ptr<float>(), p.part_ml = part_ml.data_ptr<float>();
  check(forward(p, dtype_of(f.q), stream), "attention decode (split keys)");
  check(combine(p, dtype_of(f.q), stream), "attention decode (merge)");
  return {f.out, f.lse, f.stats};
}

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
  // The kernels read these with plain row-major indexing (and 16-byte copies for dO).
  const at::Tensor dout = grad_out.contiguous(), out = out_.contiguous(), stats = stats_.contiguous(),
                   glse = grad_lse.contiguous();
  at::Tensor dq = at::empty({p.B, p.n, p.Tq, p.d}, q.options());
  at::Tensor dk = at::empty({p.B, p.g, p.Tk, p.d}, q.options());
  at::Tensor dv = at::empty({p.B, p.g, p.Tk, p.d}, q.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor delta = at::empty({p.B, p.n, p.Tq}, q.options().dtype(at::kFloat));
  check(backward_delta(dout.data_ptr(), out.data_ptr(), glse.data_ptr<float>(), delta.data_ptr<float>(),
                       static_cast<int64_t>(p.B) * p.n * p.Tq, p.d, dtype_of(q), stream),
        "attention backward (delta)");
  p.dout = dout.data_ptr(), p.delta = delta.data_ptr<float>(), p.stats = stats.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  check(backward(p, dtype_of(q), stream), "attention backward");
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
