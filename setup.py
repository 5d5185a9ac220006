"""Build script for nnsim_fast and its native extension ``nnsim_fast._C``.

The C++ (CPU) ops are always built.  The CUDA ops are added when torch was
built with CUDA and nvcc is found; ``NNSIM_FAST_CUDA=1`` forces them on (and
fails loudly if that is impossible), ``NNSIM_FAST_CUDA=0`` forces them off.
Build without isolation so the installed torch is used:
``pip install --no-build-isolation -e .``
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit(
        "nnsim_fast needs torch installed before it is built; run\n"
        "  pip install torch==2.13.0 && pip install --no-build-isolation -e .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("NNSIM_FAST_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag is None:
        return possible
    if flag not in ("0", "1"):
        sys.exit(f"NNSIM_FAST_CUDA must be 0 or 1, got {flag!r}")
    if flag == "1" and not possible:
        sys.exit("NNSIM_FAST_CUDA=1 but torch has no CUDA "
                 f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found "
                 f"(CUDA_HOME={CUDA_HOME})")
    return flag == "1"


def extension():
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) +
               sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function", "-ffp-contract=off"]
    include = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        sources += [os.path.relpath(p, ROOT) for p in
                    sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) +
                    sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
        return CUDAExtension(
            "nnsim_fast._C", sources, include_dirs=include,
            define_macros=[("NNSIM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    return CppExtension("nnsim_fast._C", sources, include_dirs=include,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
