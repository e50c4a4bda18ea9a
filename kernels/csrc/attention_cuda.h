// The interface between the CUDA attention kernels (attention_cuda.cu, compiled by nvcc, no torch
// headers) and their torch ops (attention_cuda_host.cpp, compiled by the host compiler: argument
// checks, allocation, errors). Launchers return the CUDA error of the launch (cudaSuccess if none).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace glm_kernels_cuda {

enum class DType { kBFloat16, kHalf };

// Problem description shared by every kernel. Strides in elements; last dims are unit-stride.
struct Params {
  const void *q, *k, *v;
  int64_t q_sb, q_sh, q_st;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  const int *prefix, *kv_start, *kv_len;  // [B, Tq], [B, Tq], [B]
  int B, n, g, group, Tq, Tk, d, rows;    // rows = group * Tq per (sample, KV head)
  int q_offset;
  bool causal;
  float scale, scale_log2;  // softmax scale, and scale * log2(e)
  // forward / decode outputs: out [B, n, Tq, d] (contiguous), lse [B, n, Tq], stats [B, n, Tq, 2]
  void* out;
  float *lse, *stats;
  // decode: splits along the keys; partial outputs [split, B, n, Tq, d] and (max, log2 sum)
  int num_splits, tiles_per_split;
  float *part_o, *part_ml;
  // backward
  const void* dout;    // [B, n, Tq, d] contiguous
  const float* delta;  // [B, n, Tq]: rowsum(dO * O) - grad_lse
  void *dq, *dk, *dv;  // dq [B, n, Tq, d], dk/dv [B, g, Tk, d], contiguous
};

constexpr int kKeyTile = 64;  // keys per tile (forward, dQ) and per dK/dV block

// Query rows per forward block for this problem (16 for a few rows: decode).
int forward_block_rows(const Params& p);

// Forward (num_splits == 1: writes out/lse/stats) or the split-KV pass of decode (writes the partials;
// grid z = p.num_splits), then `combine` merges the partials into out/lse/stats.
cudaError_t forward(const Params& p, DType dt, cudaStream_t stream);
cudaError_t combine(const Params& p, DType dt, cudaStream_t stream);

// Backward: delta = rowsum(dO * O) - grad_lse, then dK/dV and dQ.
cudaError_t backward_delta(const void* dout, const void* out, const float* grad_lse, float* delta, int64_t rows, int d,
                           DType dt, cudaStream_t stream);
cudaError_t backward(const Params& p, DType dt, cudaStream_t stream);

}  // namespace glm_kernels_cuda
