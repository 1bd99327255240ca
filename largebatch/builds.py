"""Compiled extensions (our fused LAMB/LARS kernel, DeepSpeed's CPU ops): each is built once into
$TORCH_EXTENSIONS_DIR, its build announced with one line when it starts and one when it ends, and always
before training is timed; `largebatch build` builds them ahead (for CI and images).

A build is announced once per machine (by the process with LOCAL_RANK 0, or a lone process), since the
cache is per machine and torch's file lock makes the other local processes wait for that build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


def cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported quietly: torch's CUDA builds log "No CUDA runtime is found" on importing
    it on a CPU machine, which is not news for CPU code."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    return cpp_extension


def build_directory(name: str) -> Path:
    """Where torch.utils.cpp_extension.load builds (and finds) the extension `name`."""
    return Path(cpp_extension()._get_build_directory(name, verbose=False))


def is_built(name: str, sources: list[Path]) -> bool:
    """The extension `name` is in the cache, built from these `sources` (ninja rebuilds for sources elsewhere, e.g.
    another checkout) and newer than them: loading it builds nothing."""
    folder = build_directory(name)
    library, recipe = folder / f"{name}.so", folder / "build.ninja"
    return (
        library.exists()
        and recipe.exists()
        and all(os.path.abspath(source) in recipe.read_text() for source in sources)
        and all(library.stat().st_mtime >= source.stat().st_mtime for source in sources)
    )


@contextlib.contextmanager
def announced(what: str, name: str, sources: list[Path]) -> Iterator[None]:
    """Around the load of extension `name`: if it has to be built, say so before and after (with the seconds)."""
    if is_built(name, sources):
        yield
        return
    _say(f"building {what} (once; cached in {build_directory(name).parent}) ...")
    start = time.perf_counter()
    yield
    _say(f"built {what} in {time.perf_counter() - start:.1f} s")


def _say(line: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, flush=True)
