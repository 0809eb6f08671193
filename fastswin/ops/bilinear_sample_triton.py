"""Triton backend of :func:`fastswin.functional.bilinear_sample`: torch.library ops and autograd.

Ops (gradients not asked for come back as empty (0,) tensors)::

    fastswin::bilinear_sample_triton_fwd(feat, pos) -> out
    fastswin::bilinear_sample_triton_bwd(grad_out, feat, pos, bool need_feat, bool need_pos)
        -> (grad_feat, grad_pos)

Shapes: ``feat`` (N, C, H, W) any strides, ``pos`` (N, Hk, Wk, 2) in DAT's (y, x) order,
normalized to [-1, 1], align_corners=True, zero padding; ``out`` (N, C, Hk, Wk) contiguous::

    out = F.grid_sample(feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True)

Formulas, NaN/Inf rule (that of CPU ``grid_sample`` in float32/float64) and the two grad_feat
modes: :mod:`fastswin.kernels.bilinear_sample`. Deterministic mode
(``torch.are_deterministic_algorithms_enabled()``, read inside the backward op when it runs) uses
no atomics and is bitwise reproducible; grad_pos never uses atomics.

Registration: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` (not
``triton_op``), for the reason given in :mod:`fastswin.ops.window_attention_triton`: it is the
registration that passes ``opcheck`` and ``torch.compile`` under the CPU interpreter.

Under ``torch.autocast`` (CPU or CUDA) half-precision inputs are cast to float32 first, as ATen's
grid_sampler runs (it is on autocast's fp32 list). No double backward.
"""
from __future__ import annotations

import importlib
from typing import List, Tuple

import torch
from torch import Tensor

from .. import backends

OP = "bilinear_sample"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels():
    """``fastswin.kernels.bilinear_sample``, imported on first use (so ``import fastswin`` does not
    import triton). Uses the source-checkout fallback of the window-attention backend."""
    from . import window_attention_triton as _w

    _w._kernels()  # makes ``fastswin.kernels`` importable in an un-installed checkout
    return importlib.import_module("fastswin.kernels.bilinear_sample")


def _det() -> bool:
    return torch.are_deterministic_algorithms_enabled()


@torch.library.custom_op("fastswin::bilinear_sample_triton_fwd", mutates_args=())
def bilinear_sample_triton_fwd(feat: Tensor, pos: Tensor) -> Tensor:
    return _kernels().bilinear_sample_fwd(feat, pos)


@bilinear_sample_triton_fwd.register_fake
def _(feat, pos):
    return feat.new_empty((feat.shape[0], feat.shape[1], pos.shape[1], pos.shape[2]))


@torch.library.custom_op("fastswin::bilinear_sample_triton_bwd", mutates_args=())
def bilinear_sample_triton_bwd(
    grad_out: Tensor, feat: Tensor, pos: Tensor, need_feat: bool, need_pos: bool,
) -> Tuple[Tensor, Tensor]:
    gf, gp = _kernels().bilinear_sample_bwd(grad_out, feat, pos, need_feat, need_pos, _det())
    return (gf if gf is not None else feat.new_empty((0,))), (gp if gp is not None else pos.new_empty((0,)))


@bilinear_sample_triton_bwd.register_fake
def _(grad_out, feat, pos, need_feat, need_pos):
    return (feat.new_empty(feat.shape if need_feat else (0,)), pos.new_empty(pos.shape if need_pos else (0,)))


def _setup(ctx, inputs, output):
    feat, pos = inputs
    ctx.save_for_backward(feat, pos)


def _backward(ctx, grad_out):
    feat, pos = ctx.saved_tensors
    need_feat, need_pos = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    gf, gp = torch.ops.fastswin.bilinear_sample_triton_bwd(grad_out, feat, pos, need_feat, need_pos)
    return (gf if need_feat else None), (gp if need_pos else None)


bilinear_sample_triton_fwd.register_autograd(_backward, setup_context=_setup)


def _double_backward(ctx, ggf, ggp):
    raise RuntimeError(
        "fastswin::bilinear_sample (triton): double backward (create_graph=True) is not supported; "
        "use backend='reference' (F.grid_sample) for it"
    )


def _setup_bwd(ctx, inputs, output):
    pass


bilinear_sample_triton_bwd.register_autograd(_double_backward, setup_context=_setup_bwd)


def _reasons(feat, pos) -> List[str]:
    """Why the Triton backend cannot run this call (empty: it can)."""
    tensors = [t for t in (feat, pos) if isinstance(t, Tensor)]
    why = list(backends.triton_device_reasons(*tensors))
    if len({t.device for t in tensors}) > 1:
        why.append("tensors are on different devices")
    for name, t in (("feat", feat), ("pos", pos)):
        if isinstance(t, Tensor) and t.dtype not in _DTYPES:
            why.append(f"{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32, float64)")
    if isinstance(feat, Tensor) and feat.device.type == "cpu" and torch.bfloat16 in (feat.dtype, getattr(pos, "dtype", None)):
        why.append("bfloat16 is silently wrong in the Triton interpreter (test it on a GPU)")
    return why


def _auto_reasons(feat, pos) -> List[str]:
    return backends.triton_auto_reasons(feat)


def _autocast_fp32(t: Tensor) -> Tensor:
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def bilinear_sample_triton(feat: Tensor, pos: Tensor) -> Tensor:
    """feat (N, C, H, W), pos (N, Hk, Wk, 2) in (y, x) order -> (N, C, Hk, Wk), on the Triton
    kernels; differentiable in feat and pos. Raises :class:`fastswin.BackendUnavailableError` with
    the reasons when the kernels cannot run the input."""
    why = _reasons(feat, pos)
    if why:
        raise backends.BackendUnavailableError("backend 'triton' cannot run bilinear_sample: " + "; ".join(why))
    feat, pos = _autocast_fp32(feat), _autocast_fp32(pos)
    if feat.dim() != 4 or pos.dim() != 4 or pos.shape[3] != 2 or pos.shape[0] != feat.shape[0]:
        raise ValueError(f"bilinear_sample: expected feat (N, C, H, W) and pos (N, Hk, Wk, 2), got "
                         f"{tuple(feat.shape)} and {tuple(pos.shape)}")
    return torch.ops.fastswin.bilinear_sample_triton_fwd(feat, pos)


backends.register(OP, "triton", reasons=_reasons, auto_reasons=_auto_reasons)(bilinear_sample_triton)
