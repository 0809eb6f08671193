"""Triton backend of Swin V1 / V2 window attention: torch.library ops, autograd, backend table.

Four entries (the ``fastswin.functional`` op names), each a forward and a backward op::

    window_attention              fastswin::window_attention_triton_fwd / _bwd
    window_attention_v2           fastswin::window_attention_v2_triton_fwd / _bwd
    shifted_window_attention      fastswin::shifted_window_attention_triton_fwd / _bwd
    shifted_window_attention_v2   fastswin::shifted_window_attention_v2_triton_fwd / _bwd

Schemas (``Tensor?`` = optional; gradients not asked for come back as empty (0,) tensors)::

    window_attention_triton_fwd(q, k, v, rel_pos_table, int window_h, int window_w, Tensor? mask,
        float scale) -> (out, lse)
    window_attention_triton_bwd(dout, q, k, v, rel_pos_table, out, lse, int window_h, int window_w,
        Tensor? mask, float scale, bool need_dtable) -> (dq, dk, dv, dtable)
    window_attention_v2_triton_fwd(q, k, v, logit_mult, bias_table, int window_h, int window_w,
        Tensor? mask) -> (out, lse)
    window_attention_v2_triton_bwd(dout, q, k, v, logit_mult, bias_table, out, lse, int window_h,
        int window_w, Tensor? mask, bool need_dtable) -> (dq, dk, dv, dlogit_mult, dbias_table)
    shifted_window_attention_triton_fwd(qkv, rel_pos_table, int window_h, int window_w,
        int shift_h, int shift_w, Tensor? pad_qkv, float scale) -> (out, lse)
    shifted_window_attention_triton_bwd(dout, qkv, rel_pos_table, out, lse, int window_h,
        int window_w, int shift_h, int shift_w, Tensor? pad_qkv, float scale, bool need_dtable,
        bool need_dpad) -> (dqkv, dtable, dpad_qkv)
    shifted_window_attention_v2_triton_fwd(qkv, logit_mult, bias_table, int window_h, int window_w,
        int shift_h, int shift_w, Tensor? pad_qkv) -> (out, lse)
    shifted_window_attention_v2_triton_bwd(dout, qkv, logit_mult, bias_table, out, lse,
        int window_h, int window_w, int shift_h, int shift_w, Tensor? pad_qkv, bool need_dtable,
        bool need_dpad) -> (dqkv, dlogit_mult, dbias_table, dpad_qkv)

Shapes: q, k, v (B*nW, heads, N, d) any strides; qkv (B, H, W, 3, heads, d) any strides;
rel_pos_table ((2Mh-1)(2Mw-1), heads); mask (nW, N, N); pad_qkv (3, heads, d); windowed out
(B*nW, heads, N, d), block out (B, H, W, heads*d), both contiguous; lse (windows, heads, N)
float32 (float64 for float64 inputs). For V2 the ops take ``logit_mult = exp(min(logit_scale,
log 100))`` (heads,) in the accumulation dtype and ``bias_table = 16 * sigmoid(cpb output)``; the
public functions compute both with torch ops, so autograd reaches ``logit_scale`` and the raw
table through them. Formulas: :mod:`fastswin.kernels.window_attention`.

Registration choice: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``,
not ``triton_op`` + ``wrap_triton``. Under the CPU interpreter (where this project's CI runs the
Triton tier) ``triton_op`` fails ``opcheck``'s fake-tensor test and ``torch.compile``, while
``custom_op`` passes both (DESIGN.md, checked on torch 2.14 / triton 3.8), so the registration
we ship is the one the tests can actually verify. The cost: on a GPU Inductor sees the op as
opaque instead of tracing into the Triton kernels (no fusion of neighbouring pointwise ops into
our launch); here the kernel is the whole attention, so that loses little.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()``) is read inside the backward
ops when they run (not baked into a traced graph): the table gradient then uses no atomics.
The mask gets no gradient (timm's is a buffer). No double backward.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import check_same, check_tensor, pair

MAX_HEAD_DIM = 128
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm V2: clamp(logit_scale, max=log(1/0.01)).exp()
CPB_BIAS_SCALE = 16.0  # timm V2: 16 * sigmoid(cpb_mlp(...))
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels():
    """``fastswin.kernels.window_attention``, imported on first use (so ``import fastswin`` does
    not import triton, and ``TRITON_INTERPRET`` may be set any time before the first call).

    In a source checkout that was not ``pip install -e .``-ed, ``fastswin.kernels`` does not
    exist (setup.py maps it onto ``kernels/``); then load ``kernels/`` under that name."""
    try:
        return importlib.import_module("fastswin.kernels.window_attention")
    except ModuleNotFoundError as e:
        if e.name not in ("fastswin.kernels", "fastswin.kernels.window_attention"):
            raise
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pkg_dir = os.path.join(root, "kernels")
    if "fastswin.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fastswin.kernels", os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastswin.kernels"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module("fastswin.kernels.window_attention")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _det() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _empty_if(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


def _n_windows(h, w, mh, mw):
    return (-(-h // mh)) * (-(-w // mw))


# ================================ V1, windowed ===================================================

@torch.library.custom_op("fastswin::window_attention_triton_fwd", mutates_args=())
def window_attention_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, rel_pos_table: Tensor, window_h: int, window_w: int,
    mask: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    return _kernels().window_attention_fwd(q, k, v, rel_pos_table, (window_h, window_w), mask, scale)


@window_attention_triton_fwd.register_fake
def _(q, k, v, rel_pos_table, window_h, window_w, mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))


@torch.library.custom_op("fastswin::window_attention_triton_bwd", mutates_args=())
def window_attention_triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_pos_table: Tensor, out: Tensor, lse: Tensor,
    window_h: int, window_w: int, mask: Optional[Tensor], scale: float, need_dtable: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dtab = _kernels().window_attention_bwd(
        dout, q, k, v, rel_pos_table, out, lse, (window_h, window_w), mask, scale, need_dtable, _det())
    return dq, dk, dv, _empty_if(dtab, rel_pos_table)


@window_attention_triton_bwd.register_fake
def _(dout, q, k, v, rel_pos_table, out, lse, window_h, window_w, mask, scale, need_dtable):
    dtab = rel_pos_table.new_empty(rel_pos_table.shape if need_dtable else (0,))
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtab


def _v1_setup(ctx, inputs, output):
    q, k, v, table, wh, ww, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, table, mask, out, lse)
    ctx.args = (wh, ww, scale)
    ctx.mark_non_differentiable(lse)


def _v1_backward(ctx, dout, dlse):
    q, k, v, table, mask, out, lse = ctx.saved_tensors
    wh, ww, scale = ctx.args
    need_dtable = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dtab = torch.ops.fastswin.window_attention_triton_bwd(
        dout, q, k, v, table, out, lse, wh, ww, mask, scale, need_dtable)
    return dq, dk, dv, (dtab if need_dtable else None), None, None, None, None


window_attention_triton_fwd.register_autograd(_v1_backward, setup_context=_v1_setup)


# ================================ V2, windowed ===================================================

@torch.library.custom_op("fastswin::window_attention_v2_triton_fwd", mutates_args=())
def window_attention_v2_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, logit_mult: Tensor, bias_table: Tensor, window_h: int, window_w: int,
    mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    return _kernels().window_attention_fwd(q, k, v, bias_table, (window_h, window_w), mask, None, logit_mult)


@window_attention_v2_triton_fwd.register_fake
def _(q, k, v, logit_mult, bias_table, window_h, window_w, mask):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))


@torch.library.custom_op("fastswin::window_attention_v2_triton_bwd", mutates_args=())
def window_attention_v2_triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, logit_mult: Tensor, bias_table: Tensor, out: Tensor,
    lse: Tensor, window_h: int, window_w: int, mask: Optional[Tensor], need_dtable: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dtab, dls = _kernels().window_attention_bwd(
        dout, q, k, v, bias_table, out, lse, (window_h, window_w), mask, None, need_dtable, _det(), logit_mult)
    return dq, dk, dv, dls.to(logit_mult.dtype), _empty_if(dtab, bias_table)


@window_attention_v2_triton_bwd.register_fake
def _(dout, q, k, v, logit_mult, bias_table, out, lse, window_h, window_w, mask, need_dtable):
    dtab = bias_table.new_empty(bias_table.shape if need_dtable else (0,))
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), logit_mult.new_empty(logit_mult.shape), dtab


def _v2_setup(ctx, inputs, output):
    q, k, v, mult, table, wh, ww, mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mult, table, mask, out, lse)
    ctx.args = (wh, ww)
    ctx.mark_non_differentiable(lse)


def _v2_backward(ctx, dout, dlse):
    q, k, v, mult, table, mask, out, lse = ctx.saved_tensors
    wh, ww = ctx.args
    need_dtable = bool(ctx.needs_input_grad[4])
    dq, dk, dv, dmult, dtab = torch.ops.fastswin.window_attention_v2_triton_bwd(
        dout, q, k, v, mult, table, out, lse, wh, ww, mask, need_dtable)
    return dq, dk, dv, dmult, (dtab if need_dtable else None), None, None, None


window_attention_v2_triton_fwd.register_autograd(_v2_backward, setup_context=_v2_setup)


# ================================ V1, block level ================================================

def _block_fake(qkv, window_h, window_w):
    b, h, w, _, heads, d = qkv.shape
    acc = _acc(qkv.dtype)
    nwin = _n_windows(h, w, window_h, window_w)
    return qkv.new_empty((b, h, w, heads * d)), qkv.new_empty((b * nwin, heads, window_h * window_w), dtype=acc)


@torch.library.custom_op("fastswin::shifted_window_attention_triton_fwd", mutates_args=())
def shifted_window_attention_triton_fwd(
    qkv: Tensor, rel_pos_table: Tensor, window_h: int, window_w: int, shift_h: int, shift_w: int,
    pad_qkv: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    return _kernels().shifted_window_attention_fwd(
        qkv, rel_pos_table, (window_h, window_w), (shift_h, shift_w), scale, pad_qkv)


@shifted_window_attention_triton_fwd.register_fake
def _(qkv, rel_pos_table, window_h, window_w, shift_h, shift_w, pad_qkv, scale):
    return _block_fake(qkv, window_h, window_w)


@torch.library.custom_op("fastswin::shifted_window_attention_triton_bwd", mutates_args=())
def shifted_window_attention_triton_bwd(
    dout: Tensor, qkv: Tensor, rel_pos_table: Tensor, out: Tensor, lse: Tensor, window_h: int, window_w: int,
    shift_h: int, shift_w: int, pad_qkv: Optional[Tensor], scale: float, need_dtable: bool, need_dpad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dqkv, dtab, dpad = _kernels().shifted_window_attention_bwd(
        dout, qkv, rel_pos_table, out, lse, (window_h, window_w), (shift_h, shift_w), scale, pad_qkv,
        need_dtable, need_dpad, _det())
    return dqkv, _empty_if(dtab, rel_pos_table), _empty_if(dpad, qkv)


@shifted_window_attention_triton_bwd.register_fake
def _(dout, qkv, rel_pos_table, out, lse, window_h, window_w, shift_h, shift_w, pad_qkv, scale, need_dtable,
      need_dpad):
    dtab = rel_pos_table.new_empty(rel_pos_table.shape if need_dtable else (0,))
    dpad = pad_qkv.new_empty(pad_qkv.shape) if (need_dpad and pad_qkv is not None) else qkv.new_empty((0,))
    return qkv.new_empty(qkv.shape), dtab, dpad


def _blk1_setup(ctx, inputs, output):
    qkv, table, wh, ww, sh, sw, pad, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, table, pad, out, lse)
    ctx.args = (wh, ww, sh, sw, scale)
    ctx.mark_non_differentiable(lse)


def _blk1_backward(ctx, dout, dlse):
    qkv, table, pad, out, lse = ctx.saved_tensors
    wh, ww, sh, sw, scale = ctx.args
    need_dtable, need_dpad = bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[6])
    dqkv, dtab, dpad = torch.ops.fastswin.shifted_window_attention_triton_bwd(
        dout, qkv, table, out, lse, wh, ww, sh, sw, pad, scale, need_dtable, need_dpad)
    return (dqkv, dtab if need_dtable else None, None, None, None, None, dpad if need_dpad else None, None)


shifted_window_attention_triton_fwd.register_autograd(_blk1_backward, setup_context=_blk1_setup)


# ================================ V2, block level ================================================

@torch.library.custom_op("fastswin::shifted_window_attention_v2_triton_fwd", mutates_args=())
def shifted_window_attention_v2_triton_fwd(
    qkv: Tensor, logit_mult: Tensor, bias_table: Tensor, window_h: int, window_w: int, shift_h: int,
    shift_w: int, pad_qkv: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    return _kernels().shifted_window_attention_fwd(
        qkv, bias_table, (window_h, window_w), (shift_h, shift_w), None, pad_qkv, logit_mult)


@shifted_window_attention_v2_triton_fwd.register_fake
def _(qkv, logit_mult, bias_table, window_h, window_w, shift_h, shift_w, pad_qkv):
    return _block_fake(qkv, window_h, window_w)


@torch.library.custom_op("fastswin::shifted_window_attention_v2_triton_bwd", mutates_args=())
def shifted_window_attention_v2_triton_bwd(
    dout: Tensor, qkv: Tensor, logit_mult: Tensor, bias_table: Tensor, out: Tensor, lse: Tensor, window_h: int,
    window_w: int, shift_h: int, shift_w: int, pad_qkv: Optional[Tensor], need_dtable: bool, need_dpad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dqkv, dtab, dpad, dls = _kernels().shifted_window_attention_bwd(
        dout, qkv, bias_table, out, lse, (window_h, window_w), (shift_h, shift_w), None, pad_qkv,
        need_dtable, need_dpad, _det(), logit_mult)
    return dqkv, dls.to(logit_mult.dtype), _empty_if(dtab, bias_table), _empty_if(dpad, qkv)


@shifted_window_attention_v2_triton_bwd.register_fake
def _(dout, qkv, logit_mult, bias_table, out, lse, window_h, window_w, shift_h, shift_w, pad_qkv, need_dtable,
      need_dpad):
    dtab = bias_table.new_empty(bias_table.shape if need_dtable else (0,))
    dpad = pad_qkv.new_empty(pad_qkv.shape) if (need_dpad and pad_qkv is not None) else qkv.new_empty((0,))
    return qkv.new_empty(qkv.shape), logit_mult.new_empty(logit_mult.shape), dtab, dpad


def _blk2_setup(ctx, inputs, output):
    qkv, mult, table, wh, ww, sh, sw, pad = inputs
    out, lse = output
    ctx.save_for_backward(qkv, mult, table, pad, out, lse)
    ctx.args = (wh, ww, sh, sw)
    ctx.mark_non_differentiable(lse)


def _blk2_backward(ctx, dout, dlse):
    qkv, mult, table, pad, out, lse = ctx.saved_tensors
    wh, ww, sh, sw = ctx.args
    need_dtable, need_dpad = bool(ctx.needs_input_grad[2]), bool(ctx.needs_input_grad[7])
    dqkv, dmult, dtab, dpad = torch.ops.fastswin.shifted_window_attention_v2_triton_bwd(
        dout, qkv, mult, table, out, lse, wh, ww, sh, sw, pad, need_dtable, need_dpad)
    return (dqkv, dmult, dtab if need_dtable else None, None, None, None, None, dpad if need_dpad else None)


shifted_window_attention_v2_triton_fwd.register_autograd(_blk2_backward, setup_context=_blk2_setup)


# ================================ reasons ========================================================

def _common_reasons(main: Tensor, others, head_dim: int) -> List[str]:
    tensors = [main] + [t for t in others if isinstance(t, Tensor)]
    why = list(backends.triton_device_reasons(*tensors))
    if len({t.device for t in tensors}) > 1:
        why.append("tensors are on different devices")
    if main.dtype not in _DTYPES:
        why.append(f"dtype {main.dtype} is not supported (float16, bfloat16, float32, float64)")
    for t in others:
        # a bool mask is added as 1.0 / 0.0, as timm's ``attn + mask`` does
        if isinstance(t, Tensor) and t.dtype not in _DTYPES + (torch.bool,):
            why.append(f"dtype {t.dtype} of an auxiliary tensor is not supported")
            break
    if main.device.type == "cuda" and main.dtype == torch.float64:
        why.append("float64 runs only under the Triton interpreter (an fp64 tl.dot is not a supported GPU path)")
    if main.device.type == "cpu" and main.dtype == torch.bfloat16:
        why.append("bfloat16 is silently wrong in the Triton interpreter (test it on a GPU)")
    if head_dim > MAX_HEAD_DIM:
        why.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
    return why


def _windowed_reasons(q, k, v, aux) -> List[str]:
    if not isinstance(q, Tensor):
        return ["q is not a tensor"]
    why = _common_reasons(q, [k, v] + list(aux), q.shape[-1] if q.dim() else 0)
    if any(isinstance(t, Tensor) and t.dtype != q.dtype for t in (k, v)):
        why.append("q, k and v must share one dtype")
    return why


def _block_reasons(qkv, aux) -> List[str]:
    if not isinstance(qkv, Tensor):
        return ["qkv is not a tensor"]
    return _common_reasons(qkv, list(aux), qkv.shape[-1] if qkv.dim() else 0)


OPS = ("window_attention", "window_attention_v2", "shifted_window_attention", "shifted_window_attention_v2")


def reasons_by_op(windowed, block) -> dict:
    """A fused backend's reasons functions for the four ops, with the functional entries' argument
    lists, from its two checks ``windowed(q, k, v, aux)`` and ``block(qkv, aux)`` (``aux``: the
    other tensors, for device checks). Shapes are the validator's business; these list what the
    kernels do not support. Shared by the Triton and CUDA backends."""

    def window_attention(q, k, v, rel_pos_table, window_size, mask=None, scale=None) -> List[str]:
        return windowed(q, k, v, (rel_pos_table, mask))

    def window_attention_v2(q, k, v, logit_scale, rel_pos_table, window_size, mask=None) -> List[str]:
        return windowed(q, k, v, (logit_scale, rel_pos_table, mask))

    def shifted_window_attention(qkv, rel_pos_table, window_size, shift_size, scale=None, pad_qkv=None):
        return block(qkv, (rel_pos_table, pad_qkv))

    def shifted_window_attention_v2(qkv, logit_scale, rel_pos_table, window_size, shift_size, pad_qkv=None):
        return block(qkv, (logit_scale, rel_pos_table, pad_qkv))

    fns = (window_attention, window_attention_v2, shifted_window_attention, shifted_window_attention_v2)
    return dict(zip(OPS, fns))


def register_backend(backend: str, fns, reasons: dict, auto_reasons) -> None:
    """Register ``fns`` (the four public functions, in :data:`OPS` order) as ``backend``."""
    for op, fn in zip(OPS, fns):
        backends.register(op, backend, reasons=reasons[op], auto_reasons=auto_reasons)(fn)


_REASONS = reasons_by_op(_windowed_reasons, _block_reasons)
_reasons, _reasons_v2, _reasons_block, _reasons_block_v2 = (_REASONS[op] for op in OPS)


def _auto_reasons(first, *args, **kwargs) -> List[str]:
    return backends.triton_auto_reasons(first)


def _raise_if(op: str, why: List[str]) -> None:
    if why:
        raise backends.BackendUnavailableError(f"backend 'triton' cannot run {op}: " + "; ".join(why))


# ================================ validation (direct calls) ======================================
# fastswin.functional validates before dispatching; these checks make the functions below safe to
# call directly too (a bad shape would otherwise make the kernels read out of bounds).

def _check_window(window_size):
    mh, mw = pair("window_size", window_size)
    if mh < 1 or mw < 1:
        raise ValueError(f"window_size: expected sizes >= 1, got {(mh, mw)}")
    return mh, mw


def _check_table(name, table, mh, mw, heads):
    t = (2 * mh - 1) * (2 * mw - 1)
    check_tensor(name, table, ndim=2, layout="((2Mh-1)*(2Mw-1), heads)", shape=(t, heads))


def _check_windowed(q, k, v, table, window_size, mask):
    mh, mw = _check_window(window_size)
    layout = "(B*nW, heads, N, head_dim)"
    check_tensor("q", q, ndim=4, layout=layout)
    bw, nh, n, d = q.shape
    check_tensor("k", k, ndim=4, layout=layout, shape=q.shape)
    check_tensor("v", v, ndim=4, layout=layout, shape=q.shape)
    if mh * mw != n:
        raise ValueError(f"window_size: expected Mh*Mw == N = {n} (q's dimension 2), got {(mh, mw)}")
    _check_table("rel_pos_table", table, mh, mw, nh)
    if mask is not None:
        check_tensor("mask", mask, ndim=3, layout="(nW, N, N)", shape=(None, n, n), dtypes=_DTYPES + (torch.bool,))
        if mask.shape[0] < 1 or bw % mask.shape[0]:
            raise ValueError(f"mask: expected nW dividing B*nW = {bw}, got shape {tuple(mask.shape)}")
    check_same(("q", "k", "v", "rel_pos_table", "mask"), (q, k, v, table, mask), dtype=False)
    return mh, mw


def _check_block(qkv, table, window_size, shift_size, pad_qkv):
    mh, mw = _check_window(window_size)
    sh, sw = pair("shift_size", shift_size)
    if not (0 <= sh < mh and 0 <= sw < mw):
        raise ValueError(f"shift_size: expected 0 <= shift < window, got {(sh, sw)} for window_size {(mh, mw)}")
    check_tensor("qkv", qkv, ndim=6, layout="(B, H, W, 3, heads, head_dim)", shape=(None, None, None, 3))
    _check_table("rel_pos_table", table, mh, mw, qkv.shape[4])
    if pad_qkv is not None:
        check_tensor("pad_qkv", pad_qkv, ndim=3, layout="(3, heads, head_dim)", shape=qkv.shape[3:])
    check_same(("qkv", "rel_pos_table", "pad_qkv"), (qkv, table, pad_qkv), dtype=False)
    return mh, mw, sh, sw


def _logit_mult(logit_scale: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """timm V2's per-head multiplier exp(clamp(logit_scale, max=log 100)), computed in
    logit_scale's dtype as timm does, then in the kernels' accumulation dtype."""
    if logit_scale.numel() != heads:
        raise ValueError(f"logit_scale: expected {heads} elements (heads, 1, 1), got shape {tuple(logit_scale.shape)}")
    return torch.clamp(logit_scale.reshape(heads), max=LOGIT_SCALE_MAX).exp().to(_acc(dtype))


def _bias_table(rel_pos_table: Tensor) -> Tensor:
    return CPB_BIAS_SCALE * torch.sigmoid(rel_pos_table)


# ================================ public functions ===============================================

def window_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, rel_pos_table: Tensor, window_size, mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Swin V1 window attention on the Triton kernels; differentiable in q, k, v, rel_pos_table.

    q, k, v: (B*nW, heads, N, d), any strides; rel_pos_table: ((2Mh-1)(2Mw-1), heads);
    window_size: (Mh, Mw) or int, Mh*Mw == N; mask: (nW, N, N) additive, nW | B*nW, window of
    row b is b % nW (no gradient); scale: default d**-0.5. Returns (B*nW, heads, N, d), contiguous,
    ``softmax(scale q k^T + table[rel_index] + mask) v`` per window and head.
    Raises :class:`fastswin.BackendUnavailableError` when the kernels cannot run the input.
    """
    mh, mw = _check_windowed(q, k, v, rel_pos_table, window_size, mask)
    _raise_if("window_attention", _reasons(q, k, v, rel_pos_table, window_size, mask, scale))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.fastswin.window_attention_triton_fwd(q, k, v, rel_pos_table, mh, mw, mask, scale)
    return out


def window_attention_v2_triton(
    q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, rel_pos_table: Tensor, window_size,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Swin V2 scaled cosine window attention on the Triton kernels; differentiable in q, k, v,
    logit_scale, rel_pos_table.

    q, k, v: (B*nW, heads, N, d); logit_scale: (heads, 1, 1) or (heads,); rel_pos_table: the raw
    ``cpb_mlp`` output ((2Mh-1)(2Mw-1), heads); mask as in :func:`window_attention_triton`::

        softmax(cos(q, k) * exp(min(logit_scale, log 100)) + 16 sigmoid(table)[rel_index] + mask) v
    """
    mh, mw = _check_windowed(q, k, v, rel_pos_table, window_size, mask)
    _raise_if("window_attention_v2", _reasons_v2(q, k, v, logit_scale, rel_pos_table, window_size, mask))
    mult = _logit_mult(logit_scale, q.shape[1], q.dtype)
    out, _ = torch.ops.fastswin.window_attention_v2_triton_fwd(q, k, v, mult, _bias_table(rel_pos_table), mh, mw, mask)
    return out


def shifted_window_attention_triton(
    qkv: Tensor, rel_pos_table: Tensor, window_size, shift_size, scale: Optional[float] = None,
    pad_qkv: Optional[Tensor] = None,
) -> Tensor:
    """Swin V1 (S)W-MSA at block level on the Triton kernels (timm ``SwinTransformerBlock._attn``
    between the qkv linear and proj); differentiable in qkv, rel_pos_table, pad_qkv.

    qkv: (B, H, W, 3, heads, d), any strides, before any roll; rel_pos_table ((2Mh-1)(2Mw-1),
    heads); shift_size: 0 <= shift < window; pad_qkv: (3, heads, d) a padded token's qkv (the
    linear's bias), zeros if None. Returns (B, H, W, heads*d), contiguous, un-shifted: roll by
    -shift, pad bottom/right to window multiples, partition, attention with the -100 shift mask
    on the padded size, reverse, crop, roll back -- all in the kernel's addressing.
    """
    mh, mw, sh, sw = _check_block(qkv, rel_pos_table, window_size, shift_size, pad_qkv)
    _raise_if("shifted_window_attention", _reasons_block(qkv, rel_pos_table, window_size, shift_size, scale, pad_qkv))
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.fastswin.shifted_window_attention_triton_fwd(qkv, rel_pos_table, mh, mw, sh, sw, pad_qkv, scale)
    return out


def shifted_window_attention_v2_triton(
    qkv: Tensor, logit_scale: Tensor, rel_pos_table: Tensor, window_size, shift_size,
    pad_qkv: Optional[Tensor] = None,
) -> Tensor:
    """Swin V2 (S)W-MSA at block level on the Triton kernels (timm ``SwinTransformerV2Block._attn``
    between the qkv linear and proj); shapes as :func:`shifted_window_attention_triton`, scores
    as :func:`window_attention_v2_triton`."""
    mh, mw, sh, sw = _check_block(qkv, rel_pos_table, window_size, shift_size, pad_qkv)
    _raise_if("shifted_window_attention_v2",
              _reasons_block_v2(qkv, logit_scale, rel_pos_table, window_size, shift_size, pad_qkv))
    mult = _logit_mult(logit_scale, qkv.shape[4], qkv.dtype)
    out, _ = torch.ops.fastswin.shifted_window_attention_v2_triton_fwd(
        qkv, mult, _bias_table(rel_pos_table), mh, mw, sh, sw, pad_qkv)
    return out


register_backend("triton", (window_attention_triton, window_attention_v2_triton, shifted_window_attention_triton,
                            shifted_window_attention_v2_triton), _REASONS, _auto_reasons)


# FlopCounterMode (and tools built on it) count the fused ops like the unfused matmuls.
from .flop_formulas import register as _register_flop_formulas  # noqa: E402

_register_flop_formulas()
