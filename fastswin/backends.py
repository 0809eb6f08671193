"""Which backend runs an op, and why not the others.

Backends:

``"reference"``
    Plain PyTorch (``fastswin.reference``), the correctness oracle. Runs everything, any
    float dtype, any device.
``"triton"``
    Triton kernels (``fastswin.kernels``). CUDA tensors; CPU tensors only under
    ``TRITON_INTERPRET=1`` (a test tool: ``auto`` never picks the interpreter).
``"cuda"``
    The compiled extension ``fastswin._C``: CUDA C++ kernels for CUDA tensors and C++
    (``at::parallel_for``) kernels for CPU tensors. Needs the extension to be built.
``"auto"``
    The first backend, in :data:`AUTO_ORDER`, that can run the call. The choice is logged on
    the ``fastswin`` logger at DEBUG level (once per op, backend and device).

Every implementation registers a *reasons* function: given the call's arguments it returns a
list of human-readable reasons why it cannot run them (empty: it can). An explicitly requested
backend that cannot run a call raises :class:`BackendUnavailableError` with those reasons; it
never falls back to another backend.

``FASTSWIN_BACKEND=<name>`` in the environment replaces the ``backend`` argument of every call
(useful to A/B a whole model without editing it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

log = logging.getLogger("fastswin")

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cuda")
AUTO = "auto"
# Fastest first. Later issues replace this with a per-shape table measured on a GPU.
AUTO_ORDER: Tuple[str, ...] = ("cuda", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists why."""


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    reasons: Callable[..., List[str]]
    # Extra reasons that only stop ``auto`` (the backend may still be asked for by name),
    # e.g. the Triton interpreter on CPU tensors: correct but ~1000x slower.
    auto_reasons: Callable[..., List[str]] = lambda *a, **k: []


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
_LOGGED: set = set()
_LAST: Dict[str, str] = {}  # op -> backend of its most recent select(), for benchmarks and tests


def register(op: str, backend: str, *, reasons: Callable[..., List[str]], auto_reasons=None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Implementation(
            op, backend, fn, reasons, auto_reasons or (lambda *a, **k: [])
        )
        return fn

    return deco


def resolve_name(backend) -> str:
    """The backend name in force for a call: ``FASTSWIN_BACKEND`` if set, else ``backend`` (default
    ``"auto"``); raises on an unknown name."""
    env = os.environ.get("FASTSWIN_BACKEND", "").strip()
    chosen = env or backend or AUTO
    if not isinstance(chosen, str) or chosen not in BACKENDS + (AUTO,):
        src = "FASTSWIN_BACKEND" if env else "backend"
        raise ValueError(f"{src}: expected one of {BACKENDS + (AUTO,)}, got {chosen!r}")
    return chosen


def check_backend_name(backend) -> str:
    """Validate a ``backend=`` argument early (module constructors), without the env override."""
    if not isinstance(backend, str) or backend not in BACKENDS + (AUTO,):
        raise ValueError(f"backend: expected one of {BACKENDS + (AUTO,)}, got {backend!r}")
    return backend


def explain(op: str, *args, **kwargs) -> Dict[str, List[str]]:
    """For each backend, the reasons it cannot run ``op(*args, **kwargs)`` (empty list: it can)."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"op: no backend registered for {op!r}; known ops: {sorted(_REGISTRY)}")
    out = {}
    for b in BACKENDS:
        impl = impls.get(b)
        out[b] = ["not implemented for this op"] if impl is None else list(impl.reasons(*args, **kwargs))
    return out


def select(op: str, backend, *args, **kwargs) -> Implementation:
    """The implementation that runs ``op`` for these arguments, or raise with every reason."""
    name = resolve_name(backend)
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"op: no backend registered for {op!r}; known ops: {sorted(_REGISTRY)}")
    if name != AUTO:
        impl = impls.get(name)
        why = ["not implemented for this op"] if impl is None else impl.reasons(*args, **kwargs)
        if why:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {op}: " + "; ".join(why) + ". Pass backend='auto' or another backend."
            )
        _LAST[op] = name
        return impl
    refused = {}
    for b in AUTO_ORDER:
        impl = impls.get(b)
        if impl is None:
            refused[b] = ["not implemented for this op"]
            continue
        why = list(impl.reasons(*args, **kwargs)) + list(impl.auto_reasons(*args, **kwargs))
        if not why:
            _log_choice(op, b, args, refused)
            _LAST[op] = b
            return impl
        refused[b] = why
    raise BackendUnavailableError(
        f"no backend can run {op}: " + "; ".join(f"{b}: {', '.join(r)}" for b, r in refused.items())
    )


def last_selected(op: str):
    """The backend that ran ``op`` most recently in this process (None if it never ran)."""
    return _LAST.get(op)


def note_selected(op: str, backend: str) -> None:
    """Record ``backend`` as the one that ran ``op`` (what :func:`last_selected` reports), for
    callers that pick an implementation without :func:`select` (e.g. the attention-dropout path,
    which only the reference implements)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _LAST[op] = backend


def dispatch(op: str, backend, *args, **kwargs):
    """Run ``op`` on the selected backend."""
    return select(op, backend, *args, **kwargs).fn(*args, **kwargs)


def _log_choice(op, backend, args, refused):
    # Under torch.compile the choice is made once, at trace time; dynamo cannot trace Logger
    # methods (a graph break on every auto-dispatched op), so compiled code does not log it.
    if torch.compiler.is_compiling() or not log.isEnabledFor(logging.DEBUG):
        return
    dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "?")
    key = (op, backend, dev)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    skipped = "; ".join(f"{b}: {', '.join(r)}" for b, r in refused.items()) or "none"
    log.debug("fastswin: %s on %s runs on backend %r (skipped: %s)", op, dev, backend, skipped)


# ---- reasons shared by many ops --------------------------------------------------------------

def always_able(*args, **kwargs) -> List[str]:
    """The reasons function of an implementation that runs every call (the reference): none."""
    return []


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_reasons(*tensors) -> List[str]:
    """Why Triton cannot run on these tensors' device."""
    t = next((x for x in tensors if isinstance(x, torch.Tensor)), None)
    if t is None:
        return []
    if t.device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return ["triton is not installed"]
        return []
    if t.device.type == "cpu":
        if triton_interpreter_on():
            return []
        return ["tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton needs a CUDA device)"]
    return [f"Triton does not support device type {t.device.type!r}"]


def triton_auto_reasons(*tensors) -> List[str]:
    t = next((x for x in tensors if isinstance(x, torch.Tensor)), None)
    if t is not None and t.device.type == "cpu":
        return ["the Triton interpreter on CPU is a test tool, not a fast path"]
    return []


def compiled_extension_reasons(*tensors, op: str) -> List[str]:
    """Why the compiled extension cannot run ``op`` on these tensors."""
    from . import _extension

    why = list(_extension.unavailable_reasons())
    if why:
        return why
    t = next((x for x in tensors if isinstance(x, torch.Tensor)), None)
    if t is not None and t.device.type == "cuda" and not _extension.has_cuda_kernels():
        why.append("fastswin._C was built without CUDA kernels (rebuild with a CUDA toolkit, FASTSWIN_BUILD_CUDA=1)")
    if t is not None and t.device.type not in ("cpu", "cuda"):
        why.append(f"device type {t.device.type!r} is not supported")
    if not why and not _extension.has_op(op):
        why.append(f"fastswin._C has no op {op!r} (stale build? rebuild the extension)")
    return why
