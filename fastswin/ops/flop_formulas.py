"""FLOP formulas for fastswin's fused ops, so ``torch.utils.flop_counter.FlopCounterMode``
counts a model running on a fused backend exactly as it counts the same model on the unfused
(reference) path.

FlopCounterMode counts matmuls (2 FLOPs per multiply-add) and ignores softmax, bias adds,
normalization and sampling; it sees a custom op as one opaque call, which it counts as 0 unless
a formula is registered. Per window and head, with N = Mh*Mw tokens of d channels:

* forward: ``q @ k^T`` and ``P @ v``, ``2 * 2 N^2 d`` -- the two bmm of the reference path;
* backward: ``4 * 2 N^2 d`` -- what autograd's backward of those two bmm counts (two matmuls
  each). The fused backward also recomputes ``q @ k^T`` from the saved log-sum-exp (a fifth
  matmul); like FlashAttention's convention, that recomputation is not counted, so the fused and
  unfused paths report the same model FLOPs.

Block-level ops count every window of the padded map, ``ceil(H/Mh) * ceil(W/Mw)`` per image,
as the reference path (which attends over the padding) does. V2's cosine normalization and
logit multiplier are elementwise, not counted (neither are they on the reference path).
Bilinear sampling has no formula: ``F.grid_sample`` counts 0 too.

Call :func:`register` once, after the ops exist (``import fastswin`` defines them); it skips the
ops this build does not have and is idempotent.
"""
from __future__ import annotations

import importlib
from typing import List

import torch

_REGISTERED: List[str] = []


def _windowed(q_shape) -> int:
    bnw, heads, n, d = q_shape
    return 4 * bnw * heads * n * n * d


def _block(qkv_shape, window_h: int, window_w: int) -> int:
    b, h, w, _, heads, d = qkv_shape
    nwin = (-(-h // window_h)) * (-(-w // window_w))
    n = window_h * window_w
    return 4 * b * nwin * heads * n * n * d


def window_attention_fwd_flop(q_shape, *args, **kwargs) -> int:
    return _windowed(q_shape)


def window_attention_bwd_flop(dout_shape, *args, **kwargs) -> int:
    return 2 * _windowed(dout_shape)


def shifted_window_attention_fwd_flop(qkv_shape, table_shape, window_h, window_w, *args, **kwargs) -> int:
    return _block(qkv_shape, window_h, window_w)


def shifted_window_attention_v2_fwd_flop(qkv_shape, mult_shape, table_shape, window_h, window_w, *args,
                                         **kwargs) -> int:
    return _block(qkv_shape, window_h, window_w)


def shifted_window_attention_bwd_flop(dout_shape, qkv_shape, table_shape, out_shape_, lse_shape, window_h,
                                      window_w, *args, **kwargs) -> int:
    return 2 * _block(qkv_shape, window_h, window_w)


def shifted_window_attention_v2_bwd_flop(dout_shape, qkv_shape, mult_shape, table_shape, out_shape_, lse_shape,
                                         window_h, window_w, *args, **kwargs) -> int:
    return 2 * _block(qkv_shape, window_h, window_w)


def deformable_attention_fwd_flop(q_shape, k_shape, *args, **kwargs) -> int:
    """q (B*heads, c, HW), k (B*heads, c, Ns): q^T k and P v^T, 2 * BH * HW * Ns * c each."""
    bh, c, hw = q_shape
    return 4 * bh * hw * k_shape[2] * c


def deformable_attention_bwd_flop(dout_shape, q_shape, k_shape, *args, **kwargs) -> int:
    return 2 * deformable_attention_fwd_flop(q_shape, k_shape)


# op name in torch.ops.fastswin -> formula (positional arguments as in the op's schema, tensors
# replaced by their shapes; FlopCounterMode passes ``out_shape=`` too, swallowed by **kwargs).
FORMULAS = {
    "window_attention_triton_fwd": window_attention_fwd_flop,
    "window_attention_triton_bwd": window_attention_bwd_flop,
    "window_attention_v2_triton_fwd": window_attention_fwd_flop,
    "window_attention_v2_triton_bwd": window_attention_bwd_flop,
    "shifted_window_attention_triton_fwd": shifted_window_attention_fwd_flop,
    "shifted_window_attention_triton_bwd": shifted_window_attention_bwd_flop,
    "shifted_window_attention_v2_triton_fwd": shifted_window_attention_v2_fwd_flop,
    "shifted_window_attention_v2_triton_bwd": shifted_window_attention_v2_bwd_flop,
    "deformable_attention_triton_fwd": deformable_attention_fwd_flop,
    "deformable_attention_triton_bwd": deformable_attention_bwd_flop,
    # CUDA extension: V1 and V2 share one op each (``cosine`` picks V2), same argument order.
    "window_attention_cuda_fwd": window_attention_fwd_flop,
    "window_attention_cuda_bwd": window_attention_bwd_flop,
    "shifted_window_attention_cuda_fwd": shifted_window_attention_fwd_flop,
    "shifted_window_attention_cuda_bwd": shifted_window_attention_bwd_flop,
}


def register() -> List[str]:
    """Register the formulas of every op in :data:`FORMULAS` that exists; returns the names
    registered so far. Safe to call again (later calls register only ops that appeared since).
    Must run before a ``FlopCounterMode`` is constructed (it copies the registry then)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for mod in ("fastswin.ops.window_attention_triton", "fastswin.ops.deformable_attention_triton"):
        try:  # defines the Triton ops; a no-op if already imported (or being imported)
            importlib.import_module(mod)
        except ImportError:
            pass
    for name, formula in FORMULAS.items():
        if name in _REGISTERED or not hasattr(torch.ops.fastswin, name):
            continue
        packet = getattr(torch.ops.fastswin, name)
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)
        _REGISTERED.append(name)
    return list(_REGISTERED)
