"""The build a CPU other than x86-64 gets: FASTDISTIL_GENERIC_ONLY=1 compiles the 16-byte vector copy of the row
kernels alone (the AVX copies become the stubs such a CPU links), here on x86-64. The extension is built from a
copy of the checkout and imported in a new process, which must run only vec128 and match the reference."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastdistil

ROOT = Path(fastdistil.__file__).resolve().parent.parent

CHECK = """
import functools, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import pytest, torch
import fastdistil
from fastdistil import _C
from helpers import check_against_reference, make_inputs
assert fastdistil.__file__.startswith(sys.argv[1]), fastdistil.__file__
assert _C.supported_cpu_isas() == ["vec128"] and _C.cpu_isa() == "vec128", _C.supported_cpu_isas()
with pytest.raises(RuntimeError, match="not supported by this CPU"):
    _C.set_cpu_isa("avx2")
cpp = functools.partial(fastdistil.triple_loss, backend="cpp")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for temperature in (1.0, 2.0, 1.5):
        check_against_reference(cpp, make_inputs((3, 14), 1001, dtype=dtype), temperature=temperature)
print("generic build ok")
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_the_generic_only_build_runs_vec128_alone_and_matches_the_reference(tmp_path):
    root = tmp_path.resolve()
    skip = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    for folder in ("fastdistil", "kernels", "csrc"):
        shutil.copytree(ROOT / folder, root / folder, ignore=skip)
    for file in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, root / file)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root,
                           env={**os.environ, "FASTDISTIL_GENERIC_ONLY": "1"}, capture_output=True, text=True,
                           timeout=900, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT / "tests")]),
           "FASTDISTIL_REQUIRE_EXTENSION": "1"}
    env.pop("FASTDISTIL_CPU_ISA", None)
    proc = subprocess.run([sys.executable, "-c", CHECK, str(root)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generic build ok" in proc.stdout
