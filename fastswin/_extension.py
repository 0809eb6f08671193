"""Loading of the compiled extension ``fastswin._C``.

The package must import, and the reference and Triton paths must work, without it. Loading is
lazy and the failure is remembered, so ``backend="cuda"`` can say exactly why it is unavailable.
"""
from __future__ import annotations

from typing import List

import torch


_LOADED = None  # (module or None, error message), once loaded


def _load():
    """Import ``fastswin._C`` (which registers its ops with the dispatcher) once. Returns
    ``(module, error_message)``. Remembered in a global, not ``functools.lru_cache``: backend
    choice calls this inside ``torch.compile``d code, and dynamo traces through an lru_cache
    wrapper with a warning, while a global read is a plain guarded constant."""
    global _LOADED
    if _LOADED is None:
        _LOADED = _import()
    return _LOADED


def _import():
    try:
        from . import _C  # noqa: F401  (import registers TORCH_LIBRARY ops)
    except ImportError as e:  # not built, or built against another torch
        return None, f"fastswin._C is not importable ({e}); build it with `pip install -e . --no-build-isolation`"
    except Exception as e:  # e.g. RuntimeError: a second copy of _C registering the same TORCH_LIBRARY
        return None, f"fastswin._C failed to load ({type(e).__name__}: {e})"
    return _C, ""


def unavailable_reasons() -> List[str]:
    mod, err = _load()
    return [err] if mod is None else []


def available() -> bool:
    return not unavailable_reasons()


def has_op(name: str) -> bool:
    """Is ``torch.ops.fastswin.<name>`` registered by the extension?"""
    if not available():
        return False
    return hasattr(torch.ops.fastswin, name)


_CUDA_BUILT = None


def has_cuda_kernels() -> bool:
    """Was the extension compiled with its CUDA sources? (Asked once: the answer is a global,
    so compiled code reads a constant instead of calling into pybind11, which dynamo cannot
    trace.)"""
    global _CUDA_BUILT
    if _CUDA_BUILT is None:
        mod, _ = _load()
        _CUDA_BUILT = bool(mod is not None and getattr(mod, "cuda_built", lambda: False)())
    return _CUDA_BUILT
