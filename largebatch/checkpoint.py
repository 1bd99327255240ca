"""Checkpoints that survive kill -9: atomic directories with a checksum manifest, verified on load.

Layout: `<run.dir>/checkpoints/step_00000100/{state.pt, manifest.json}`, plus the files each rank writes
alone under an engine's sub-directory (DeepSpeed: `deepspeed/`). A checkpoint is written
into a temporary sibling directory, every file fsynced, the manifest written last, then renamed
into place, so a directory named `step_*` is complete or absent. Loading re-hashes every file, and
`latest_good` falls back to the previous checkpoint when the newest is truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from largebatch.dist import DistInfo, broadcast_from_main
from largebatch.errors import TrainingStopped, UserError, warn
from largebatch.stop import StopFlags

if TYPE_CHECKING:
    from largebatch.engine import Engine

STATE = "state.pt"
MANIFEST = "manifest.json"
PREFIX = "step_"


def directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def begin(run_dir: Path) -> Path:
    """A fresh temporary directory for the next checkpoint (rank 0; every rank may write its shards into it)."""
    parent = directory(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{PREFIX}*"):  # left by a writer killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=parent))


def commit(
    tmp: Path, run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Add `state` for `step` and a manifest of every file in `tmp` (with `meta`), rename it into place, then keep
    only the newest `keep` (rank 0, after every rank wrote its shards)."""
    with (tmp / STATE).open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        if (
            path.name != STATE
        ):  # shards written by other ranks: make them durable before the manifest says so
            _fsync_file(path)
    manifest = {
        "step": step,
        "meta": meta,
        "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files},
    }
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    parent = directory(run_dir)
    final = parent / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(parent)
    for old in sorted(parent.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_collective(
    engine: Engine,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    flags: StopFlags,
    info: DistInfo,
) -> None:
    """Every rank writes its engine's shards (if it has any) into a directory rank 0 made, then rank 0 adds `state`
    and the manifest and renames it into place (collective). A failed write on any rank becomes a fault in `flags`
    that stops every rank here, at one of two agreements; rank 0 then removes the unfinished directory (the previous
    checkpoint stays the latest)."""
    where = f"a checkpoint under {directory(run_dir)}"
    tmp = None
    if info.is_main:
        with flags.guard(where):
            tmp = begin(run_dir)
    tmp = broadcast_from_main(tmp)
    try:
        if tmp is not None:
            with flags.guard(where):
                engine.save_shards(tmp)
        flags.agree_now(info.device)
        if info.is_main:
            with flags.guard(where):
                commit(tmp, run_dir, step, state, meta, keep)
        flags.agree_now(info.device)
    except TrainingStopped:
        if info.is_main and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write `state` for `step` atomically in one process."""
    return commit(begin(run_dir), run_dir, step, state, meta, keep)


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete and its checksums match, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (incomplete or not a checkpoint)"
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def latest_good(run_dir: Path) -> Path | None:
    """The newest checkpoint in `run_dir` that verifies; each bad newer one is reported in one line."""
    for path in sorted(directory(run_dir).glob(f"{PREFIX}*"), reverse=True):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    return None


def check_explicit(path: Path) -> Path:
    """A user-named checkpoint (run.resume=PATH) must exist and verify; a run directory means its latest good one."""
    if not path.exists():
        raise UserError(
            f"run.resume={path} does not exist; give a checkpoint directory, a run directory, auto or never"
        )
    if directory(path).is_dir():
        found = latest_good(path)
        if found is None:
            raise UserError(f"run.resume={path} has no complete checkpoint in {directory(path)}")
        return found
    problem = verify(path)
    if problem:
        raise UserError(
            f"checkpoint {path} is unusable: {problem}; pick an older one under checkpoints/"
        )
    return path


def load(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE, map_location="cpu", weights_only=True)


def manifest(path: Path) -> dict[str, Any]:
    """`step` and `meta` (what the run was: batch plan, model, data) of a verified checkpoint, without loading it."""
    return json.loads((path / MANIFEST).read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
