"""Builds fastdistil._C, the CPU kernels, from csrc/ with torch's cpp_extension.

The kernels are compiled once per instruction set inside the same objects (see csrc/cpu_dispatch.h), so the
build never bakes the build machine's ISA in: nothing like -march=native. DEBUG=1 builds without optimization;
FASTDISTIL_SKIP_CPP_BUILD=1 installs the pure-Python package (the op then falls back to the reference).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("FASTDISTIL_SKIP_CPP_BUILD", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is implemented in headers with OpenMP pragmas; without -fopenmp it runs serially.
    cxx_flags += ["-fopenmp", "-fno-math-errno", "-std=c++17"]
    ext_modules.append(
        CppExtension(
            "fastdistil._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
