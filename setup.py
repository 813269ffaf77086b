"""Builds fastdistil._C, the op schemas and the CPU kernels, from csrc/ with torch's cpp_extension.

The row kernels are compiled once per instruction set, each copy in a translation unit of its own
(csrc/triple_loss_rows_{avx512,avx2,vec128}.cpp) and chosen at run time (csrc/cpu_isa.cpp), so the build never
bakes the build machine's ISA in: nothing like -march=native. DEBUG=1 builds without optimization;
FASTDISTIL_GENERIC_ONLY=1 builds the 16-byte vector copy alone, what a CPU other than x86-64 gets (to check that
build on x86-64); FASTDISTIL_SKIP_CPP_BUILD=1 installs the pure-Python package (no ops: the Python API then runs
the reference loss and SDPA).
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
    if os.environ.get("FASTDISTIL_GENERIC_ONLY", "0") == "1":
        cxx_flags.append("-DFASTDISTIL_GENERIC_ONLY")
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
