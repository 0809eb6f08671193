"""Triton backend of :func:`fastswin.functional.deformable_attention` (DAT / DAT++ attention core).

Ops (gradients not asked for come back as empty (0,) tensors)::

    fastswin::deformable_attention_triton_fwd(q, k, v, pos, qgrid, Tensor? rpe_table,
        Tensor? attn_bias, int n_heads, int n_groups, float scale) -> (out, lse)
    fastswin::deformable_attention_triton_bwd(dout, q, k, v, pos, qgrid, Tensor? rpe_table,
        Tensor? attn_bias, out, lse, int n_heads, int n_groups, float scale, bool need_dpos,
        bool need_dtable, bool need_dbias) -> (dq, dk, dv, dpos, dtable, dbias)

Shapes: q (B*h, c, H*W), k, v (B*h, c, Ns), pos (B*g, Hk, Wk, 2) (y, x), qgrid (H*W, 2) the
variant's query grid (:func:`fastswin.reference.dat.query_grid` in ``grid_dtype``, built by
:func:`deformable_attention_triton`; no gradient), rpe_table (h, Th, Tw) or None, attn_bias
(B*h, H*W, Ns) or None; out (B*h, c, H*W)::

    softmax_n(q^T k * scale + bilinear(rpe_table[head], (qgrid - pos) * 0.5) + attn_bias) v

with the bias interpolated in the kernel (``grid_sample(align_corners=True, zeros)`` semantics).
Formulas and the two table-gradient modes: :mod:`fastswin.kernels.deformable_attention`.
Differentiable in q, k, v, pos (through the bias: the offset network trains as with the
reference), rpe_table and attn_bias. Deterministic mode
(``torch.are_deterministic_algorithms_enabled()``, read when the backward op runs) uses no
atomics and is bitwise reproducible.

``attn_bias`` (DAT++'s ``fixed_pe`` and ``log_cpb`` biases) is supported as an additive dense
input: the kernel reads one (BLOCK_M, BLOCK_N) tile of it per logit tile, and its gradient is ds
itself (an (B*h, H*W, Ns) output the reference produces too). ``log_cpb``'s MLP still runs in
PyTorch in front of the op (it is what produces the dense bias). Why it is not fused: per logit
the MLP costs 2*32 + 32*h_g multiply-adds (192 at h_g = 4, three times the logit's own q.k and
p.v work at head_dim 32), its first layer has K = 2 inputs (below ``tl.dot``'s minimum of 16, so
it would run as scalar FMAs), and no released DAT++ configuration enables ``log_cpb`` (all use
the sampled rpe table, which *is* fused). Whether fusing it pays is a GPU measurement not made yet.

Refused (``reasons``): ``dropout_p > 0`` (attention dropout would need the reference's RNG stream
in the kernel, and the backend never silently falls back -- use backend="reference" for training
with attn_drop > 0), float64 on
CUDA (no fp64 ``tl.dot`` path), bfloat16 under the interpreter (silently wrong there),
head_dim > 128.

Registration: ``custom_op`` + ``register_fake`` + ``register_autograd``, as
:mod:`fastswin.ops.window_attention_triton` explains. No double backward.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..reference import dat as _ref

OP = "deformable_attention"
MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels():
    """``fastswin.kernels.deformable_attention``, imported on first use."""
    from . import window_attention_triton as _w

    _w._kernels()  # makes ``fastswin.kernels`` importable in an un-installed checkout
    return importlib.import_module("fastswin.kernels.deformable_attention")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _det() -> bool:
    return torch.are_deterministic_algorithms_enabled()


@torch.library.custom_op("fastswin::deformable_attention_triton_fwd", mutates_args=())
def deformable_attention_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, qgrid: Tensor, rpe_table: Optional[Tensor],
    attn_bias: Optional[Tensor], n_heads: int, n_groups: int, scale: float,
) -> Tuple[Tensor, Tensor]:
    return _kernels().deformable_attention_fwd(q, k, v, pos, qgrid, rpe_table, attn_bias, n_heads=n_heads,
                                               n_groups=n_groups, scale=scale)


@deformable_attention_triton_fwd.register_fake
def _(q, k, v, pos, qgrid, rpe_table, attn_bias, n_heads, n_groups, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2]), dtype=_acc(q.dtype))


@torch.library.custom_op("fastswin::deformable_attention_triton_bwd", mutates_args=())
def deformable_attention_triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, qgrid: Tensor, rpe_table: Optional[Tensor],
    attn_bias: Optional[Tensor], out: Tensor, lse: Tensor, n_heads: int, n_groups: int, scale: float,
    need_dpos: bool, need_dtable: bool, need_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dpos, dtab, dbias = _kernels().deformable_attention_bwd(
        dout, q, k, v, pos, qgrid, rpe_table, attn_bias, out, lse, n_heads=n_heads, n_groups=n_groups, scale=scale,
        need_dpos=need_dpos, need_dtable=need_dtable, need_dbias=need_dbias, deterministic=_det())
    # distinct empties: custom_op outputs may not alias each other
    return (dq, dk, dv, dpos if dpos is not None else pos.new_empty((0,)),
            dtab if dtab is not None else q.new_empty((0,)), dbias if dbias is not None else q.new_empty((0,)))


@deformable_attention_triton_bwd.register_fake
def _(dout, q, k, v, pos, qgrid, rpe_table, attn_bias, out, lse, n_heads, n_groups, scale, need_dpos, need_dtable,
      need_dbias):
    dpos = pos.new_empty(pos.shape if (need_dpos and rpe_table is not None) else (0,))
    dtab = rpe_table.new_empty(rpe_table.shape) if (need_dtable and rpe_table is not None) else q.new_empty((0,))
    dbias = attn_bias.new_empty(attn_bias.shape) if (need_dbias and attn_bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpos, dtab, dbias


def _setup(ctx, inputs, output):
    q, k, v, pos, qgrid, rpe_table, attn_bias, n_heads, n_groups, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos, qgrid, rpe_table, attn_bias, out, lse)
    ctx.args = (n_heads, n_groups, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, pos, qgrid, rpe_table, attn_bias, out, lse = ctx.saved_tensors
    n_heads, n_groups, scale = ctx.args
    need = ctx.needs_input_grad
    need_dpos = bool(need[3]) and rpe_table is not None
    need_dtable = bool(need[5]) and rpe_table is not None
    need_dbias = bool(need[6]) and attn_bias is not None
    dq, dk, dv, dpos, dtab, dbias = torch.ops.fastswin.deformable_attention_triton_bwd(
        dout, q, k, v, pos, qgrid, rpe_table, attn_bias, out, lse, n_heads, n_groups, scale,
        need_dpos, need_dtable, need_dbias)
    return (dq, dk, dv, dpos if need_dpos else None, None, dtab if need_dtable else None,
            dbias if need_dbias else None, None, None, None)


deformable_attention_triton_fwd.register_autograd(_backward, setup_context=_setup)


def _double_backward(ctx, *grads):
    raise RuntimeError("fastswin::deformable_attention (triton): double backward is not supported; "
                       "use backend='reference'")


def _setup_bwd(ctx, inputs, output):
    pass


deformable_attention_triton_bwd.register_autograd(_double_backward, setup_context=_setup_bwd)


def _reasons(q, k, v, pos, rpe_table=None, attn_bias=None, *, query_size=None, n_heads=None, n_groups=None,
             variant=None, scale=None, grid_dtype=None, dropout_p=0.0) -> List[str]:
    """Why the Triton backend cannot run this call (empty: it can). Shapes are the validator's
    business; this lists what the kernels do not support."""
    if not isinstance(q, Tensor):
        return ["q is not a tensor"]
    tensors = [t for t in (q, k, v, pos, rpe_table, attn_bias) if isinstance(t, Tensor)]
    why = list(backends.triton_device_reasons(*tensors))
    if len({t.device for t in tensors}) > 1:
        why.append("tensors are on different devices")
    if any(t.dtype not in _DTYPES for t in tensors):
        why.append("dtype not supported (float16, bfloat16, float32, float64)")
    if any(isinstance(t, Tensor) and t.dtype != q.dtype for t in (k, v)):
        why.append("q, k and v must share one dtype")
    if q.device.type == "cuda" and q.dtype == torch.float64:
        why.append("float64 runs only under the Triton interpreter (an fp64 tl.dot is not a supported GPU path)")
    if q.device.type == "cpu" and any(t.dtype == torch.bfloat16 for t in tensors):
        why.append("bfloat16 is silently wrong in the Triton interpreter (test it on a GPU)")
    if q.dim() == 3 and q.shape[1] > MAX_HEAD_DIM:
        why.append(f"head_dim {q.shape[1]} > {MAX_HEAD_DIM}")
    if dropout_p and dropout_p > 0.0:
        why.append("dropout_p > 0 (attention dropout) is not implemented in the kernel; use backend='reference'")
    return why


def _auto_reasons(q, *args, **kwargs) -> List[str]:
    return backends.triton_auto_reasons(q)


def deformable_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, rpe_table: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None, *, query_size, n_heads: int, n_groups: int, variant: str,
    scale: Optional[float] = None, grid_dtype: Optional[torch.dtype] = None, dropout_p: float = 0.0,
) -> Tensor:
    """Fused DAT / DAT++ attention core; the signature and result of
    :func:`fastswin.reference.dat.deformable_attention` ((B*h, c, H*W), q's dtype). Raises
    :class:`fastswin.BackendUnavailableError` with the reasons when the kernels cannot run it."""
    why = _reasons(q, k, v, pos, rpe_table, attn_bias, dropout_p=dropout_p)
    if why:
        raise backends.BackendUnavailableError("backend 'triton' cannot run deformable_attention: " + "; ".join(why))
    _ref.check_variant(variant)
    h, w = query_size
    if q.dim() != 3 or q.shape[2] != h * w or n_heads < 1 or n_groups < 1 or n_heads % n_groups \
            or q.shape[0] % n_heads or pos.dim() != 4 or pos.shape[0] != q.shape[0] // n_heads * n_groups \
            or k.shape != v.shape or k.shape[:2] != q.shape[:2] or pos.shape[1] * pos.shape[2] != k.shape[2]:
        raise ValueError("deformable_attention: inconsistent shapes (see fastswin.functional.deformable_attention)")
    if scale is None:
        scale = q.shape[1] ** -0.5
    dtype = pos.dtype if grid_dtype is None else grid_dtype
    qgrid = _ref.query_grid(h, w, variant=variant, dtype=dtype, device=q.device).reshape(h * w, 2)
    out, _ = torch.ops.fastswin.deformable_attention_triton_fwd(
        q, k, v, pos, qgrid, rpe_table, attn_bias, int(n_heads), int(n_groups), float(scale))
    return out


backends.register(OP, "triton", reasons=_reasons, auto_reasons=_auto_reasons)(deformable_attention_triton)


# FlopCounterMode counts the fused op like the unfused matmuls.
from .flop_formulas import register as _register_flop_formulas  # noqa: E402

_register_flop_formulas()
