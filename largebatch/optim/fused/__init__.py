"""Fused CPU kernels for LARS and LAMB, compiled on first use with torch.utils.cpp_extension.

The build lands in $TORCH_EXTENSIONS_DIR (torch's default cache when unset) under a name keyed on
the SIMD level torch detected (`torch.backends.cpu.get_cpu_capability()`), so a cache shared by
machines with different CPUs never loads code built for instructions the CPU lacks, and on the
source (its text and its path, which the build recipe names), so an edited source or another
checkout gets a build of its own instead of loading a stale one or rebuilding over it. torch's loader
holds a file lock while building, so concurrent processes build once. A build (about 30 s) is
announced in one line before and after; the trainer `warm`s the kernel before it times any step,
and `largebatch build` builds it ahead.
"""

import functools
import hashlib
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from largebatch import builds

IMPLS = ("auto", "foreach", "fused")
WHAT = "the fused LAMB/LARS kernel"
SOURCE = Path(__file__).with_name("kernels.cpp")

_SIMD_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "AVX2": ["-mavx2", "-mfma"],
}
_build_lock = threading.Lock()


def check_impl(impl: str) -> str:
    """Return `impl` if it names an implementation, else raise with the choices."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def _source_key() -> str:
    """Ten hex digits of the SHA-256 of the source's path and text."""
    digest = hashlib.sha256(str(SOURCE.resolve()).encode() + b"\0" + SOURCE.read_bytes())
    return digest.hexdigest()[:10]


@functools.cache
def _build() -> ModuleType | str:
    """The compiled module, or the reason it could not be built (cached: a failed build runs once)."""
    capability = torch.backends.cpu.get_cpu_capability()
    cpp_extension = builds.cpp_extension()
    name = f"largebatch_fused_optim_{capability.lower()}_{_source_key()}"
    try:
        with builds.announced(WHAT, name, [SOURCE]):
            return cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=[
                    "-O3",
                    "-fno-math-errno",
                    "-fopenmp",
                    *_SIMD_FLAGS.get(capability, []),
                ],
                extra_ldflags=["-fopenmp"],
            )
    except Exception as exc:  # noqa: BLE001 - any build failure means "no fused kernel"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        reason = next(
            (line for line in lines[1:] if "error" in line or "not found" in line), lines[0]
        )
        return f"{type(exc).__name__}: {reason[:200]}"


def load() -> ModuleType:
    """The compiled kernels, building them if needed; raise if they cannot be built."""
    with _build_lock:
        built = _build()
    if isinstance(built, str):
        raise RuntimeError(
            f"the fused optimizer kernel failed to build ({built}); "
            "install g++ and ninja, or use impl='foreach'"
        )
    return built


@functools.cache
def _load_or_warn() -> ModuleType | None:
    """The compiled kernels, or None after one warning that 'auto' falls back to foreach."""
    try:
        return load()
    except RuntimeError as exc:
        warnings.warn(
            f"{exc}. impl='auto' falls back to impl='foreach' (slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def kernels_for(
    impl: str, params: list[torch.Tensor], tensors: list[list[torch.Tensor]]
) -> ModuleType | None:
    """The fused kernels if `impl` allows them and `params` and the parameter-shaped `tensors`
    are all contiguous fp32 on the CPU; None means: use foreach (always so on CUDA or for bf16).
    """
    if impl == "foreach" or not all(p.is_cpu and p.dtype == torch.float32 for p in params):
        return None
    kernels = load() if impl == "fused" else _load_or_warn()
    return kernels if kernels is not None and kernels.fusable([params, *tensors]) else None


def warm(optimizer: torch.optim.Optimizer) -> None:
    """Build (or load) the kernels now if `optimizer`'s first step would (an `impl` of auto or fused with fp32 CPU
    parameters), so that a build happens before training is timed rather than inside step 1."""
    impl = getattr(optimizer, "impl", "foreach")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if impl != "foreach" and any(p.is_cpu and p.dtype == torch.float32 for p in params):
        if impl == "fused":
            load()
        else:
            _load_or_warn()


def build_ahead() -> tuple[str, str]:
    """Build (or find) the kernels for `largebatch build`: (what, the built library or why there is none)."""
    try:
        return WHAT, load().__file__
    except RuntimeError as exc:
        return WHAT, f"not built: {exc}"
