"""Builds the optional C++ kernels (glm.kernels._C: attention, the small-batch linear and the fused
elementwise layers RMSNorm, RoPE and SwiGLU); everything else lives in setup.cfg.

The extension is compiled ahead, at `pip install`, never at import. If it cannot be built the
install still succeeds: `glm.kernels.available()` is then False, `glm.kernels.load_error()` says why,
and the `auto` attention backend falls back to sdpa.

GLM_KERNELS_MARCH picks the target CPU (default: native, the machine that builds is the one that
runs, as with `make test`); set it to e.g. x86-64-v3 to build for other machines.

The CUDA kernels (glm.kernels._C_cuda) are a second extension, built only where torch is a CUDA
build and nvcc is found (CUDA_HOME); a CPU-only install never tries. They target the GPUs present at
build time, or TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") when set; GLM_KERNELS_CUDA=0 skips them.
"""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # torch missing at build time (an isolated build): pure-Python install
    print(f"glm: not building the C++ kernels, torch is not importable at build time ({exc}); "
          "install with --no-build-isolation to build them", file=sys.stderr)
else:
    march = os.environ.get("GLM_KERNELS_MARCH", "native")
    ext_modules.append(CppExtension(
        "glm.kernels._C",
        ["kernels/csrc/attention_cpu.cpp", "kernels/csrc/small_linear.cpp", "kernels/csrc/elementwise_cpu.cpp",
         "kernels/csrc/quant_cpu.cpp"],
        # -fopenmp: at::parallel_for's OpenMP loop is inlined from the header. No -ffast-math: the
        # kernels rely on -inf for masked scores.
        extra_compile_args=["-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                            "-ffp-contract=fast"],
        extra_link_args=["-fopenmp"],
    ))

    if torch.version.cuda and CUDA_HOME and os.environ.get("GLM_KERNELS_CUDA", "1") != "0":
        ext_modules.append(CUDAExtension(
            "glm.kernels._C_cuda",
            ["kernels/csrc/attention_cuda_host.cpp", "kernels/csrc/attention_cuda.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        ))

    class OptionalBuild(BuildExtension):
        """A failed kernel build warns and leaves the pure-Python package installable."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, unsupported flags, ...
                # Forget the extension, so that the install does not look for its output.
                self.extensions = [e for e in self.extensions if e is not ext]
                which = "CUDA" if ext.name.endswith("_cuda") else "C++"
                print(f"\nglm: WARNING: the {which} attention kernels failed to build ({exc}); glm works without "
                      "them (attention backend 'auto' -> 'sdpa'). See docs/kernels.md.\n", file=sys.stderr)

    cmdclass["build_ext"] = OptionalBuild.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
