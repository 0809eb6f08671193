"""What every provider module shares: the :class:`Work` a provider builds, the timed-callable
wrappers, input rotation and the refusal probe.

A provider is a function ``(case, provider, device, dtype, batch) -> Work | str``; a string is
the reason it cannot run here, which the runner prints (nothing is dropped silently).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

import fastswin

ROTATE = 3  # input sets per case, cycled so no call finds the previous one's data in cache


@dataclass
class Work:
    """One provider on one case: ``fwd(i)`` runs the forward on input set ``i % ROTATE``;
    ``fwd_bwd(i)`` forward and backward, or a string saying why this provider has no backward
    here (the runner prints it), or None (no backward, nothing to say)."""

    fwd: Callable[[int], object]
    fwd_bwd: Union[Callable[[int], object], str, None]
    flops: int
    bytes: int
    shape: str


def backend_of(provider):
    """The fastswin backend a provider name stands for (None: not a fastswin backend)."""
    return {"naive": "reference", "fastswin_triton": "triton", "fastswin_cuda": "cuda", "fastswin_auto": "auto"}.get(
        provider
    )


def fwd_only(fn, inputs):
    """Forward only, without building the autograd graph (inference timing)."""

    def run(i):
        with torch.no_grad():
            return fn(*inputs[i % ROTATE])

    return run


def fwd_bwd(fn, inputs, grads, params=()):
    """Forward and backward to every input that requires grad (and to ``params``, a module's
    weights). ``autograd.grad`` returns the gradients instead of accumulating into ``.grad``: no
    extra read-modify-write is timed."""
    params = [p for p in params if p.requires_grad]

    def run(i):
        args = inputs[i % ROTATE]
        out = fn(*args)
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + params
        return torch.autograd.grad(out, wrt, grads[i % ROTATE])

    return run


def refusal(fn, args, provider=None, op=None) -> Optional[str]:
    """The backend's own reasons if it refuses these inputs (one trial call, no grad); for
    ``fastswin_auto``, also a refusal when auto picked the reference (that row would be ``naive``)."""
    try:
        with torch.no_grad():
            fn(*args)
    except fastswin.BackendUnavailableError as e:
        return str(e)
    if provider == "fastswin_auto" and fastswin.backends.last_selected(op) == "reference":
        return f"auto runs the reference backend for {op} here (the same work as the naive/grid_sample row)"
    return None


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for a skip reason."""
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    line = msg[0] if msg else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
