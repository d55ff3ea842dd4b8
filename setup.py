"""Builds obd_ext._C with torch.utils.cpp_extension.

CPU kernels are always built. CUDA kernels are built when the installed torch
has CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME), with no GPU
needed at build time. OBD_EXT_CUDA=1 forces the CUDA build (and fails if it
cannot), OBD_EXT_CUDA=0 disables it. OBD_EXT_CUDA_ARCH sets the target
architectures (default "8.0;9.0"). Build with `pip install --no-build-isolation`.

Release builds strip debug info from _C (29.7 MB -> about 2.3 MB);
OBD_EXT_DEBUG=1 keeps it. The binary links against the C++ ABI of the torch it
was built with, which changes between torch minor releases, so the built
package requires that torch's major.minor (the sdist's range, torch>=2.4, is
only what the sources compile against).
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    switch = os.environ.get("OBD_EXT_CUDA", "auto").lower()
    home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from nvcc's folder; through a link such as
    # /usr/local/bin/nvcc it gives /usr/local, which has no CUDA headers, and
    # the build would fail late with "cuda_runtime.h: No such file".
    headers = home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    possible = torch.version.cuda is not None and headers
    if switch in ("1", "true", "on", "yes"):
        if not possible:
            sys.exit(
                f"OBD_EXT_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and CUDA_HOME={home!r}"
                f"{'' if headers or home is None else ' (no include/cuda_runtime.h there: set CUDA_HOME)'}"
                ": a CUDA build of torch and the CUDA toolkit are needed"
            )
        return True
    if switch in ("0", "false", "off", "no"):
        return False
    return possible


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def torch_requirement() -> str:
    """``torch==X.Y.*`` of the torch this build links against (its C++ ABI)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def link_args() -> list:
    # -Wl,--strip-debug drops DWARF only: the dynamic symbols torch resolves stay.
    return ["-fopenmp"] + ([] if os.environ.get("OBD_EXT_DEBUG") == "1" else ["-Wl,--strip-debug"])


def extension():
    cuda = want_cuda()
    # csrc/cpu: CPU kernels; csrc/generic: device-generic ops (no per-device kernel).
    sources = rel([os.path.join(ROOT, "csrc", "ops.cpp")]
                  + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                  + glob.glob(os.path.join(ROOT, "csrc", "generic", "*.cpp")))
    # The C++ standard is left to torch.utils.cpp_extension (torch 2.13 needs C++20).
    # -fno-trapping-math: no kernel reads floating-point exception flags, and
    # without it GCC will not if-convert the selects of csrc/cpu/vec_math.h's
    # exp/erf (it may not evaluate a multiply speculatively), so those loops
    # would stay scalar. It changes no result.
    # -ffp-contract=off: where a compiler targets FMA (CXXFLAGS=-march=native)
    # it would fuse a * b + c in some loops and not others, so one kernel
    # could give different bits on different machines, or round a product
    # differently in two passes over a row. Every CPU kernel rounds each
    # operation, and the baseline and AVX2 copies of a loop agree bit for bit.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if cuda:
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
        archs = os.environ.get("OBD_EXT_CUDA_ARCH", "8.0;9.0").replace(",", ";").split(";")
        gencode = []
        for a in archs:
            a = a.strip().replace(".", "")
            if a:
                gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode
        ext = cpp_extension.CUDAExtension(
            "obd_ext._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DOBD_EXT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link_args(),
            define_macros=define_macros,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "obd_ext._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link_args(),
            define_macros=define_macros,
            py_limited_api=True,
        )
    print("obd_ext build configuration:")
    print(f"  torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}")
    print(f"  CUDA kernels: {'yes' if cuda else 'no'} (OBD_EXT_CUDA={os.environ.get('OBD_EXT_CUDA', 'auto')})")
    if cuda:
        print(f"  CUDA archs: {os.environ.get('OBD_EXT_CUDA_ARCH', '8.0;9.0')}")
    print(f"  requires {torch_requirement()}; debug info: {'kept' if os.environ.get('OBD_EXT_DEBUG') == '1' else 'stripped'}")
    print(f"  MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}, sources: {len(sources)}")
    return ext


setup(
    ext_modules=[extension()],
    install_requires=[torch_requirement(), "numpy", "tqdm"],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
