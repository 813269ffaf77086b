"""fastdistil.kernels resolves without an install (a checkout on PYTHONPATH) and, installed, to the installed copy.

Each case imports fastdistil in a new process from a copy of the package laid out as a checkout or as an
install. That process drops the editable install's finder (which maps fastdistil.kernels to this checkout) from
sys.meta_path, so only the copy can be found.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastdistil

ROOT = Path(fastdistil.__file__).resolve().parent.parent

IMPORT = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import fastdistil.kernels.gradient_scale
print(json.dumps({name: sys.modules[name].__file__ for name in
                  ("fastdistil", "fastdistil.kernels", "fastdistil.kernels.gradient_scale")}))
"""


@pytest.mark.parametrize("layout", ["checkout", "installed"])
def test_the_kernels_import_from_a_checkout_and_from_an_install(tmp_path, layout):
    root = tmp_path.resolve()
    skip = shutil.ignore_patterns("__pycache__", "assets")  # the bundled corpus and models, not needed here
    shutil.copytree(ROOT / "fastdistil", root / "fastdistil", ignore=skip)
    # Both layouts have a top-level kernels/; an install must ignore it for its own fastdistil/kernels/.
    shutil.copytree(ROOT / "kernels", root / "kernels", ignore=skip)
    kernels = root / "kernels"
    if layout == "installed":
        kernels = root / "fastdistil" / "kernels"
        shutil.copytree(ROOT / "kernels", kernels, ignore=skip)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", IMPORT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "fastdistil": str(root / "fastdistil" / "__init__.py"),
        "fastdistil.kernels": str(kernels / "__init__.py"),
        "fastdistil.kernels.gradient_scale": str(kernels / "gradient_scale.py")}
