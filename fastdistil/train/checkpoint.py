"""Checkpoints that survive being killed at any moment.

A checkpoint is a directory `step-XXXXXXXX/` holding `state.pt` (the whole training state: tensors, numbers,
strings, lists and dicts only) and `manifest.json` (its size and SHA-256). It is written under a temporary
name, fsynced, and renamed into place, so a reader sees a complete checkpoint or none. Loading verifies the
manifest and reads with `weights_only=True`, which never unpickles arbitrary objects; a damaged checkpoint is
skipped, with a warning, for the previous one.
"""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

STATE = "state.pt"
MANIFEST = "manifest.json"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Writes `state` as checkpoint `step` in `directory` and deletes all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a write that was killed earlier
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    _fsync(tmp / STATE)
    manifest = {"step": step, "files": {STATE: {"bytes": (tmp / STATE).stat().st_size,
                                                "sha256": _sha256(tmp / STATE)}}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # the same step saved again (a resumed run): the old copy goes only once the new is whole
        old = directory / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(directory)
    for stale in checkpoints(directory)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def checkpoints(directory: Path) -> list[Path]:
    """The completed checkpoint directories in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is whole, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved at checkpoint `path`. A ValueError if it is damaged."""
    problem = verify(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
    return torch.load(path / STATE, map_location=map_location, weights_only=True)


def load_latest(directory: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest whole checkpoint in `directory`, warning about each damaged one skipped;
    None if there is none."""
    for path in reversed(checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            return path, torch.load(path / STATE, map_location=map_location, weights_only=True)
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
    return None
