"""Fused attention kernels (C++ for CPU, CUDA for GPU) registered as torch ops; see docs/."""
