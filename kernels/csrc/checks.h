// Argument checks both kernel libraries share (the CPU ops and the CUDA ops take the same schema);
// what each device can compute (dtypes, head dims) is checked by the caller between the two.
#pragma once

#include <ATen/ATen.h>

#include "message.h"

namespace glm_kernels {

// q [B, n, Tq, d], k and v [B, g, Tk, d] with g dividing n, one dtype.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(),
              "glm attention: q must be [B,n,Tq,d] and k, v [B,g,Tk,d]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              msg("glm attention: q ", q.sizes(), " and k ", k.sizes(), " disagree on batch, head dim or head groups"));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "glm attention: q, k, v must share a dtype");
}

// The mask structure: int32 prefix_len / kv_start [B, Tq] and kv_len [B], contiguous; the queries
// at key indices [q_offset, q_offset + Tq) inside the Tk keys.
inline void check_structure(const at::Tensor& q, const at::Tensor& k, const at::Tensor& prefix,
                            const at::Tensor& kv_start, const at::Tensor& kv_len, int64_t q_offset) {
  const int64_t B = q.size(0), Tq = q.size(2);
  TORCH_CHECK(prefix.scalar_type() == at::kInt && kv_start.scalar_type() == at::kInt && kv_len.scalar_type() == at::kInt,
              "glm attention: prefix_len, kv_start and kv_len must be int32");
  TORCH_CHECK(prefix.numel() == B * Tq && kv_start.numel() == B * Tq && kv_len.numel() == B,
              "glm attention: prefix_len and kv_start must be [B, Tq], kv_len [B]");
  TORCH_CHECK(prefix.is_contiguous() && kv_start.is_contiguous() && kv_len.is_contiguous(),
              "glm attention: structure tensors must be contiguous");
  TORCH_CHECK(q_offset >= 0 && q_offset + Tq <= k.size(2), "glm attention: q_offset out of range");
}

}  // namespace glm_kernels
