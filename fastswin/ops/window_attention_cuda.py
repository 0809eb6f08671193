"""CUDA C++ backend of Swin V1 / V2 window attention: fake kernels, autograd, backend table.

The ops live in the compiled extension ``fastswin._C`` (schemas in ``csrc/ops.cpp``, kernels in
``csrc/window_attention/window_attention_cuda.cu``, CUDA only: there is no CPU kernel)::

    window_attention_cuda_fwd(q, k, v, rel_pos_table, window_h, window_w, mask?, scale, cosine)
        -> (out, lse)
    window_attention_cuda_bwd(dout, q, k, v, rel_pos_table, out, lse, window_h, window_w, mask?,
        scale, cosine, need_dtable, deterministic) -> (dq, dk, dv, dtable, dscale)
    shifted_window_attention_cuda_fwd(qkv, rel_pos_table, window_h, window_w, shift_h, shift_w,
        pad_qkv?, scale, cosine) -> (out, lse)
    shifted_window_attention_cuda_bwd(dout, qkv, rel_pos_table, out, lse, window_h, window_w,
        shift_h, shift_w, pad_qkv?, scale, cosine, need_dtable, need_dpad, deterministic)
        -> (dqkv, dtable, dpad_qkv, dscale)

One op pair per entry serves V1 and V2: ``scale`` is a (heads,) float32 tensor, the per-head
logit multiplier -- V1's ``scale`` repeated, or V2's ``exp(min(logit_scale, log 100))`` computed
here with torch ops (as the Triton wrapper does, so autograd reaches ``logit_scale`` through it);
``cosine=True`` selects V2, whose table is ``16 * sigmoid(cpb output)``, also computed by torch.
Semantics, shapes and formulas are those of the Triton ops (:mod:`fastswin.ops.window_attention_triton`,
:mod:`fastswin.kernels.window_attention`); the public functions here have the Triton functions'
signatures and validation.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()``, read when the backward
runs) is passed to the backward op: the table gradient then uses no atomics.

Status: these kernels compile but have never run on a GPU. ``auto`` never picks them; ask for
``backend="cuda"`` by name (see :func:`_auto_reasons`).

Without the extension (or with a build that lacks these ops) this module still imports; it
registers nothing with ``torch.library`` and the ``"cuda"`` backend's reasons say why.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import _extension, backends
from .window_attention_triton import (
    MAX_HEAD_DIM,
    OPS,
    reasons_by_op,
    register_backend,
    _bias_table,
    _check_block,
    _check_windowed,
    _det,
    _logit_mult,
    _n_windows,
)

FWD = "window_attention_cuda_fwd"
BWD = "window_attention_cuda_bwd"
BLOCK_FWD = "shifted_window_attention_cuda_fwd"
BLOCK_BWD = "shifted_window_attention_cuda_bwd"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
UNVERIFIED = ("the CUDA window-attention kernels have never run on a GPU (unverified): "
              "ask for backend='cuda' by name")

AVAILABLE = all(_extension.has_op(name) for name in (FWD, BWD, BLOCK_FWD, BLOCK_BWD))

if AVAILABLE:

    def _acc_like(t: Tensor, shape) -> Tensor:
        return t.new_empty(shape, dtype=torch.float32)

    # ---- fake kernels --------------------------------------------------------------------------

    @torch.library.register_fake("fastswin::" + FWD)
    def _fwd_fake(q, k, v, rel_pos_table, window_h, window_w, mask, scale, cosine):
        torch._check(q.dim() == 4, lambda: f"fastswin::{FWD}: q: expected (B*nW, heads, N, head_dim)")
        return q.new_empty(q.shape), _acc_like(q, q.shape[:3])

    @torch.library.register_fake("fastswin::" + BWD)
    def _bwd_fake(dout, q, k, v, rel_pos_table, out, lse, window_h, window_w, mask, scale, cosine, need_dtable,
                  deterministic):
        dtab = rel_pos_table.new_empty(rel_pos_table.shape if need_dtable else (0,))
        dscale = scale.new_empty(scale.shape if cosine else (0,))
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtab, dscale

    @torch.library.register_fake("fastswin::" + BLOCK_FWD)
    def _block_fwd_fake(qkv, rel_pos_table, window_h, window_w, shift_h, shift_w, pad_qkv, scale, cosine):
        torch._check(qkv.dim() == 6, lambda: f"fastswin::{BLOCK_FWD}: qkv: expected (B, H, W, 3, heads, head_dim)")
        b, h, w, _, heads, d = qkv.shape
        nwin = _n_windows(h, w, window_h, window_w)
        return qkv.new_empty((b, h, w, heads * d)), _acc_like(qkv, (b * nwin, heads, window_h * window_w))

    @torch.library.register_fake("fastswin::" + BLOCK_BWD)
    def _block_bwd_fake(dout, qkv, rel_pos_table, out, lse, window_h, window_w, shift_h, shift_w, pad_qkv, scale,
                        cosine, need_dtable, need_dpad, deterministic):
        dtab = rel_pos_table.new_empty(rel_pos_table.shape if need_dtable else (0,))
        dpad = pad_qkv.new_empty(pad_qkv.shape) if (need_dpad and pad_qkv is not None) else qkv.new_empty((0,))
        dscale = scale.new_empty(scale.shape if cosine else (0,))
        return qkv.new_empty(qkv.shape), dtab, dpad, dscale

    # ---- autograd --------------------------------------------------------------------------------

    def _win_setup(ctx, inputs, output):
        q, k, v, table, wh, ww, mask, scale, cosine = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, table, mask, scale, out, lse)
        ctx.args = (wh, ww, cosine)
        ctx.mark_non_differentiable(lse)

    def _win_backward(ctx, dout, dlse):
        q, k, v, table, mask, scale, out, lse = ctx.saved_tensors
        wh, ww, cosine = ctx.args
        need_dtable = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dtab, dscale = torch.ops.fastswin.window_attention_cuda_bwd(
            dout, q, k, v, table, out, lse, wh, ww, mask, scale, cosine, need_dtable, _det())
        dscale = dscale if (cosine and ctx.needs_input_grad[7]) else None
        return dq, dk, dv, (dtab if need_dtable else None), None, None, None, dscale, None

    torch.library.register_autograd("fastswin::" + FWD, _win_backward, setup_context=_win_setup)

    def _block_setup(ctx, inputs, output):
        qkv, table, wh, ww, sh, sw, pad, scale, cosine = inputs
        out, lse = output
        ctx.save_for_backward(qkv, table, pad, scale, out, lse)
        ctx.args = (wh, ww, sh, sw, cosine)
        ctx.mark_non_differentiable(lse)

    def _block_backward(ctx, dout, dlse):
        qkv, table, pad, scale, out, lse = ctx.saved_tensors
        wh, ww, sh, sw, cosine = ctx.args
        need_dtable, need_dpad = bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[6])
        dqkv, dtab, dpad, dscale = torch.ops.fastswin.shifted_window_attention_cuda_bwd(
            dout, qkv, table, out, lse, wh, ww, sh, sw, pad, scale, cosine, need_dtable, need_dpad, _det())
        dscale = dscale if (cosine and ctx.needs_input_grad[7]) else None
        return (dqkv, dtab if need_dtable else None, None, None, None, None,
                dpad if (need_dpad and pad is not None) else None, dscale, None)

    torch.library.register_autograd("fastswin::" + BLOCK_FWD, _block_backward, setup_context=_block_setup)

    # The backward ops get an autograd formula only to fail clearly on double backward.
    def _double_backward(ctx, *grads):
        raise RuntimeError("fastswin CUDA window attention: double backward (create_graph=True) is not supported; "
                           "use backend='reference' for it")

    def _no_setup(ctx, inputs, output) -> None:
        pass

    for _name in (BWD, BLOCK_BWD):
        torch.library.register_autograd("fastswin::" + _name, _double_backward, setup_context=_no_setup)


# ================================ reasons ========================================================

def _common_reasons(main: Tensor, others, head_dim: int, op: str) -> List[str]:
    tensors = [main] + [t for t in others if isinstance(t, Tensor)]
    why = list(backends.compiled_extension_reasons(*tensors, op=op))
    if main.device.type != "cuda":
        why.append("CUDA tensors only (the CUDA window-attention kernels have no CPU implementation)")
    if len({t.device for t in tensors}) > 1:
        why.append("tensors are on different devices")
    if main.dtype not in _DTYPES:
        why.append(f"dtype {main.dtype} is not supported (float16, bfloat16, float32)")
    for t in others:
        # a bool mask is added as 1.0 / 0.0, as timm's ``attn + mask`` does
        if isinstance(t, Tensor) and t.dtype not in _DTYPES + (torch.float64, torch.bool):
            why.append(f"dtype {t.dtype} of an auxiliary tensor is not supported")
            break
    if head_dim > MAX_HEAD_DIM:
        why.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
    return why


def _windowed_reasons(q, k, v, aux) -> List[str]:
    if not isinstance(q, Tensor):
        return ["q is not a tensor"]
    why = _common_reasons(q, [k, v] + list(aux), q.shape[-1] if q.dim() else 0, FWD)
    if any(isinstance(t, Tensor) and t.dtype != q.dtype for t in (k, v)):
        why.append("q, k and v must share one dtype")
    return why


def _block_reasons(qkv, aux) -> List[str]:
    if not isinstance(qkv, Tensor):
        return ["qkv is not a tensor"]
    return _common_reasons(qkv, list(aux), qkv.shape[-1] if qkv.dim() else 0, BLOCK_FWD)


_REASONS = reasons_by_op(_windowed_reasons, _block_reasons)
_reasons, _reasons_v2, _reasons_block, _reasons_block_v2 = (_REASONS[op] for op in OPS)


def _auto_reasons(*args, **kwargs) -> List[str]:
    # Never picked by ``auto`` until a GPU session has verified the kernels (the GPU tier of
    # tests/test_window_attention_cuda.py) and measured them against Triton.
    return [UNVERIFIED]


def _raise_if(op: str, why: List[str]) -> None:
    if why:
        raise backends.BackendUnavailableError(f"backend 'cuda' cannot run {op}: " + "; ".join(why))


def _scale_tensor(value: float, heads: int, device) -> Tensor:
    return torch.full((heads,), float(value), dtype=torch.float32, device=device)


# ================================ public functions ===============================================

def window_attention_cuda(
    q: Tensor, k: Tensor, v: Tensor, rel_pos_table: Tensor, window_size, mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Swin V1 window attention on the CUDA C++ kernels; arguments and result as
    :func:`fastswin.ops.window_attention_triton.window_attention_triton`."""
    mh, mw = _check_windowed(q, k, v, rel_pos_table, window_size, mask)
    _raise_if("window_attention", _reasons(q, k, v, rel_pos_table, window_size, mask, scale))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.fastswin.window_attention_cuda_fwd(
        q, k, v, rel_pos_table, mh, mw, mask, _scale_tensor(scale, q.shape[1], q.device), False)
    return out


def window_attention_v2_cuda(
    q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, rel_pos_table: Tensor, window_size,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Swin V2 scaled cosine window attention on the CUDA C++ kernels; arguments and result as
    :func:`fastswin.ops.window_attention_triton.window_attention_v2_triton`."""
    mh, mw = _check_windowed(q, k, v, rel_pos_table, window_size, mask)
    _raise_if("window_attention_v2", _reasons_v2(q, k, v, logit_scale, rel_pos_table, window_size, mask))
    mult = _logit_mult(logit_scale, q.shape[1], q.dtype)
    out, _ = torch.ops.fastswin.window_attention_cuda_fwd(
        q, k, v, _bias_table(rel_pos_table), mh, mw, mask, mult, True)
    return out


def shifted_window_attention_cuda(
    qkv: Tensor, rel_pos_table: Tensor, window_size, shift_size, scale: Optional[float] = None,
    pad_qkv: Optional[Tensor] = None,
) -> Tensor:
    """Swin V1 (S)W-MSA at block level on the CUDA C++ kernels; arguments and result as
    :func:`fastswin.ops.window_attention_triton.shifted_window_attention_triton`."""
    mh, mw, sh, sw = _check_block(qkv, rel_pos_table, window_size, shift_size, pad_qkv)
    _raise_if("shifted_window_attention",
              _reasons_block(qkv, rel_pos_table, window_size, shift_size, scale, pad_qkv))
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.fastswin.shifted_window_attention_cuda_fwd(
        qkv, rel_pos_table, mh, mw, sh, sw, pad_qkv, _scale_tensor(scale, qkv.shape[4], qkv.device), False)
    return out


def shifted_window_attention_v2_cuda(
    qkv: Tensor, logit_scale: Tensor, rel_pos_table: Tensor, window_size, shift_size,
    pad_qkv: Optional[Tensor] = None,
) -> Tensor:
    """Swin V2 (S)W-MSA at block level on the CUDA C++ kernels; arguments and result as
    :func:`fastswin.ops.window_attention_triton.shifted_window_attention_v2_triton`."""
    mh, mw, sh, sw = _check_block(qkv, rel_pos_table, window_size, shift_size, pad_qkv)
    _raise_if("shifted_window_attention_v2",
              _reasons_block_v2(qkv, logit_scale, rel_pos_table, window_size, shift_size, pad_qkv))
    mult = _logit_mult(logit_scale, qkv.shape[4], qkv.dtype)
    out, _ = torch.ops.fastswin.shifted_window_attention_cuda_fwd(
        qkv, _bias_table(rel_pos_table), mh, mw, sh, sw, pad_qkv, mult, True)
    return out


register_backend("cuda", (window_attention_cuda, window_attention_v2_cuda, shifted_window_attention_cuda,
                          shifted_window_attention_v2_cuda), _REASONS, _auto_reasons)


# FlopCounterMode counts these ops like the unfused matmuls (formulas shared with the Triton ops).
from .flop_formulas import register as _register_flop_formulas  # noqa: E402

_register_flop_formulas()
