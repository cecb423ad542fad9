"""Build of the C++ extension ``libra_kernels._C`` (the only job of this file; metadata is in pyproject.toml).

CPU torch (``torch.version.cuda is None``) or ``LIBRA_SKIP_CUDA_BUILD=1``: a CppExtension with the CPU kernels.
CUDA torch: a CUDAExtension that adds the CUDA launchers ``csrc/cuda/*.cu`` (the drivers ``csrc/*.cpp`` then
register themselves for the CUDA key too).

Environment switches:
    CUDA_HOME               default /usr/local/cuda
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0a" (always set, so a build never guesses from the local GPU)
    MAX_JOBS                parallel compile jobs (ninja), default: the CPU count
    NVCC_THREADS            threads per nvcc invocation, default 4
    LIBRA_SKIP_CUDA_BUILD=1 build the CPU kernels only, even with CUDA torch
    LIBRA_SKIP_BUILD=1      build nothing (pure-Python install; the "cpp" backend is then unavailable)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if os.environ.get("LIBRA_SKIP_BUILD") == "1":
        return [], {}
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-g0"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    with_cuda = torch.version.cuda is not None and os.environ.get("LIBRA_SKIP_CUDA_BUILD") != "1"
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu")
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo",
                      f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
        ext = CUDAExtension("libra_kernels._C", sources, include_dirs=include_dirs,
                            define_macros=[("LIBRA_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    else:
        ext = CppExtension("libra_kernels._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
