"""fvcore op handles for fastswin's fused ops, so ``fvcore.nn.FlopCountAnalysis`` counts a model
on a fused backend exactly as it counts the same model on the unfused (reference) path.

fvcore traces the model with ``torch.jit`` and sees each fused op as one node whose kind is the
op's qualified name, e.g. ``"fastswin::window_attention_triton_fwd"``; without a handle it skips
the node (counts 0) and lists it in ``unsupported_ops()``. fvcore counts **MACs** (one per
multiply-add; ``FlopCounterMode`` counts 2), so every handle returns half the forward formula of
:mod:`fastswin.ops.flop_formulas` (the same formulas, imported, not rewritten). Per window and
head, with N = Mh*Mw tokens of d channels:

* windowed ops (V1/V2, Triton/CUDA), q (B*nW, heads, N, d): ``2 * B*nW * heads * N^2 * d`` MACs
  -- the ``q @ k^T`` and ``P @ v`` matmuls fvcore counts on the reference path;
* block-level ops, qkv (B, H, W, 3, heads, d): the same with ``B*nW = B * ceil(H/Mh) *
  ceil(W/Mw)``, every window of the padded map (the reference path attends over the padding);
* deformable attention, q (B*heads, c, HW), k (B*heads, c, Ns): ``2 * B*heads * HW * Ns * c``;
* bilinear sampling, output (N, C, Hk, Wk): ``4 * N*C*Hk*Wk``, fvcore's count for the reference
  path's ``F.grid_sample`` (``aten::grid_sampler``: 4 per output element, "assume bilinear");
  DAT's relative-position bias, sampled so on the reference path, adds ``4 * B*heads * HW * Ns``
  to the deformable op. (FlopCounterMode counts ``grid_sample`` 0: only these sampling terms
  break the rule "fvcore total = FlopCounterMode total / 2".)

Only forward ops are listed: fvcore traces the forward pass only. Softmax, biases, masks and V2's
cosine normalization are elementwise and not counted (fvcore does not count them on the
reference path either).

Usage::

    from fvcore.nn import FlopCountAnalysis
    from fastswin.ops.fvcore_handles import fvcore_handles, count_flops_fvcore

    fa = FlopCountAnalysis(model, (x,)).set_op_handle(**fvcore_handles())
    fa = count_flops_fvcore(model, (x,))          # the same, in one call

fvcore itself is optional: this module imports without it; :func:`fvcore_handles` uses only the
``torch._C.Value`` API (``type().sizes()`` and ``toIValue()``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

from . import flop_formulas as _ff

__all__ = ["fvcore_handles", "count_flops_fvcore", "OP_NAMES"]

_NS = "fastswin::"


def _shape(value) -> List[int]:
    """The static sizes of a traced tensor value (fvcore traces with concrete shapes)."""
    if not value.isCompleteTensor():
        raise ValueError(f"fastswin fvcore handle: value {value.debugName()!r} has no static shape "
                         f"(type {value.type()})")
    return list(value.type().sizes())


def _int(value) -> int:
    """A constant int argument of the traced op (window_h, window_w)."""
    ivalue = value.toIValue()
    if ivalue is None:
        raise ValueError(f"fastswin fvcore handle: value {value.debugName()!r} is not a constant int")
    return int(ivalue)


def _macs(flops: int) -> int:
    # flop_formulas count 2 FLOPs per multiply-add (FlopCounterMode); fvcore counts MACs.
    return flops // 2


def _windowed_handle(inputs, outputs) -> int:
    """op(q, k, v, ...): ``2 * B*nW * heads * N^2 * d`` MACs, q (B*nW, heads, N, d)."""
    return _macs(_ff.window_attention_fwd_flop(_shape(inputs[0])))


def _block_handle(formula, window_h_at: int) -> Callable[[list, list], int]:
    """op(qkv, ..., window_h, window_w, ...) with window_h at position ``window_h_at``:
    ``2 * B * ceil(H/Mh) * ceil(W/Mw) * heads * N^2 * d`` MACs, qkv (B, H, W, 3, heads, d).
    ``formula``: the op's forward formula in flop_formulas (the unused tensor shapes between qkv
    and window_h are passed as None)."""

    def handle(inputs, outputs) -> int:
        unused = (None,) * (window_h_at - 1)
        return _macs(formula(_shape(inputs[0]), *unused, _int(inputs[window_h_at]), _int(inputs[window_h_at + 1])))

    return handle


# fvcore counts ``aten::grid_sampler`` (F.grid_sample) as 4 per output element ("assume
# bilinear", fvcore.nn.flop_count); FlopCounterMode counts it 0, so this term is fvcore's only.
_GRID_SAMPLE_PER_OUTPUT = 4


def _is_none(value) -> bool:
    return value.type().kind() == "NoneType"


def _deformable_handle(inputs, outputs) -> int:
    """op(q, k, v, pos, qgrid, rpe_table, ...), q (B*heads, c, HW), k (B*heads, c, Ns):
    ``2 * B*heads * HW * Ns * c`` MACs (``q^T k`` and ``P v^T``), plus, with an ``rpe_table``,
    ``4 * B*heads * HW * Ns`` for the bias the reference path samples with ``F.grid_sample``
    (fvcore's grid_sampler count, see ``_GRID_SAMPLE_PER_OUTPUT``)."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    macs = _macs(_ff.deformable_attention_fwd_flop(q, k))
    if not _is_none(inputs[5]):
        macs += _GRID_SAMPLE_PER_OUTPUT * q[0] * q[2] * k[2]
    return macs


def _bilinear_handle(inputs, outputs) -> int:
    """op(feat (N, C, H, W), pos (N, Hk, Wk, 2)) -> (N, C, Hk, Wk): ``4 * N*C*Hk*Wk``, what fvcore
    counts for the reference path's ``F.grid_sample`` (FlopCounterMode counts it 0)."""
    feat, pos = _shape(inputs[0]), _shape(inputs[1])
    return _GRID_SAMPLE_PER_OUTPUT * math.prod((feat[0], feat[1], pos[1], pos[2]))


# op name (without the namespace) -> handle. Forward ops only: fvcore traces the forward pass.
_HANDLES: Dict[str, Callable[[list, list], int]] = {
    # Triton
    "window_attention_triton_fwd": _windowed_handle,
    "window_attention_v2_triton_fwd": _windowed_handle,
    # (qkv, rel_pos_table, window_h, window_w, ...)
    "shifted_window_attention_triton_fwd": _block_handle(_ff.shifted_window_attention_fwd_flop, 2),
    # (qkv, logit_mult, bias_table, window_h, window_w, ...)
    "shifted_window_attention_v2_triton_fwd": _block_handle(_ff.shifted_window_attention_v2_fwd_flop, 3),
    "deformable_attention_triton_fwd": _deformable_handle,
    "bilinear_sample_triton_fwd": _bilinear_handle,
    # CUDA extension (V1 and V2 share one op each, ``cosine`` selects V2)
    "window_attention_cuda_fwd": _windowed_handle,
    # (qkv, rel_pos_table, window_h, window_w, ...)
    "shifted_window_attention_cuda_fwd": _block_handle(_ff.shifted_window_attention_fwd_flop, 2),
    "bilinear_sample": _bilinear_handle,
}

#: Every fused forward op name as fvcore sees it in the traced graph (the node kind).
OP_NAMES = tuple(_NS + name for name in _HANDLES)


def fvcore_handles() -> Dict[str, Callable[[list, list], int]]:
    """``{op name as fvcore sees it: handle}`` for every fastswin fused forward op, e.g.
    ``"fastswin::window_attention_triton_fwd"``. Each handle takes fvcore's
    ``(inputs: list[torch._C.Value], outputs: list[torch._C.Value])`` and returns the op's forward
    count in **MACs** (fvcore's unit: 1 per multiply-add), equal to what fvcore counts for the
    same call on the reference backend. Use as
    ``FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())``. Names of ops this
    build lacks are harmless (fvcore never meets them)."""
    return {_NS + name: handle for name, handle in _HANDLES.items()}


def count_flops_fvcore(model, inputs) -> Any:
    """``fvcore.nn.FlopCountAnalysis(model, inputs)`` with :func:`fvcore_handles` set; returns the
    analysis (``.total()`` in MACs, ``.by_operator()``, ``.by_module()``, ...).

    Raises ImportError if fvcore is not installed."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as e:
        raise ImportError("count_flops_fvcore needs fvcore: pip install fvcore "
                          "(or use torch.utils.flop_counter.FlopCounterMode, which fastswin supports "
                          "without extra dependencies)") from e
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    return FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())
