"""pyproject.toml ships every package of the tree: an editable install finds a subpackage the list leaves out, a
wheel does not (fastdistil.train.families was once missing)."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(settings["packages"])
    found = {".".join(("fastdistil", *init.parent.relative_to(REPO / "fastdistil").parts))
             for init in (REPO / "fastdistil").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert settings["package-dir"]["fastdistil.kernels"] == "kernels" and "fastdistil.kernels" in listed
