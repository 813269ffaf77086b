"""The tree's layers, read from every module's imports (at any depth in the module, lazy ones included): the
Triton kernels import nothing of fastdistil above them, the ops nothing of the training recipe, the evaluation or
the export, the recipe nothing of the evaluation or the export, the evaluation not the export, and neither the
evaluation nor the export the training loop."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The importing modules (by prefix) and the fastdistil modules (by prefix) they must not import.
FORBIDDEN = {
    "fastdistil.kernels": ("fastdistil.ops", "fastdistil.train", "fastdistil.evaluate", "fastdistil.export",
                           "fastdistil.commands", "fastdistil.env", "fastdistil.assets"),
    "fastdistil.ops": ("fastdistil.train", "fastdistil.evaluate", "fastdistil.export", "fastdistil.commands",
                       "fastdistil.env"),
    "fastdistil.train": ("fastdistil.evaluate", "fastdistil.export", "fastdistil.env"),
    "fastdistil.evaluate": ("fastdistil.train.loop", "fastdistil.export", "fastdistil.env"),
    # Export sits beside the recipe as evaluation does, and reads evaluation's held-out split.
    "fastdistil.export": ("fastdistil.train.loop", "fastdistil.env"),
}


def modules() -> dict[str, Path]:
    """{dotted name: file} of the package, with kernels/ under the name it is installed as."""
    found = {}
    for root, package in ((REPO / "fastdistil", "fastdistil"), (REPO / "kernels", "fastdistil.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """The fastdistil modules path imports, resolved to dotted names (from-imports of names give the module or,
    for a submodule, the submodule)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, node.level - 1 packages up
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("fastdistil")}


def test_every_module_is_read():
    names = modules()
    assert {"fastdistil.kernels.triple_loss", "fastdistil.ops.triple_loss", "fastdistil.train.loop",
            "fastdistil.evaluate.finetune", "fastdistil.export.command"} <= set(names)


@pytest.mark.parametrize("name, path", sorted(modules().items()), ids=sorted(modules()))
def test_no_module_imports_from_a_layer_above_its_own(name, path):
    rules = [forbidden for prefix, forbidden in FORBIDDEN.items() if name == prefix or name.startswith(prefix + ".")]
    for forbidden in rules:
        wrong = sorted(m for m in imports(path, name) if any(m == f or m.startswith(f + ".") for f in forbidden))
        assert not wrong, f"{name} imports {wrong}, from a layer above its own"


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk resolves the kinds of import the package uses; kernels/triple_loss.py once imported its input
    checks from fastdistil.triple_loss inside a function."""
    module = tmp_path / "kernel.py"
    module.write_text("def launch():\n    from fastdistil.ops.checks import triple_loss\n")
    assert "fastdistil.ops.checks" in imports(module, "fastdistil.kernels.kernel")
