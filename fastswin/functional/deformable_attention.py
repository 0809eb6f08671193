"""``fastswin.functional.deformable_attention``: DAT's attention core, one entry for every backend.

The exact formula and shapes are in :func:`fastswin.reference.dat.deformable_attention`.
Backends: ``reference`` (plain PyTorch). Fused kernels register here later.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import backends
from .._checks import autocast_on, check_finite, check_same, check_tensor, pair
from ..reference import dat as _ref

OP = "deformable_attention"


backends.register(OP, "reference", reasons=backends.always_able)(_ref.deformable_attention)


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def validate(
    q, k, v, pos, rpe_table=None, attn_bias=None, *, query_size, n_heads, n_groups, variant, scale=None,
    grid_dtype=None, dropout_p=0.0,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad argument."""
    _ref.check_variant(variant)
    h, w = pair("query_size", query_size)
    if h < 1 or w < 1:
        raise ValueError(f"query_size: expected positive sizes, got {(h, w)}")
    _positive_int("n_heads", n_heads)
    _positive_int("n_groups", n_groups)
    if n_heads % n_groups:
        raise ValueError(f"n_heads: expected a multiple of n_groups={n_groups}, got {n_heads}")
    check_tensor("q", q, ndim=3, layout="(B*heads, head_channels, H*W)")
    bh, c, hw = q.shape
    if bh % n_heads:
        raise ValueError(f"q: expected dimension 0 (B*heads) to be a multiple of n_heads={n_heads}, got shape {tuple(q.shape)}")
    if hw != h * w:
        raise ValueError(f"q: expected size H*W={h * w} in dimension 2 (query_size={(h, w)}), got shape {tuple(q.shape)}")
    check_tensor("k", k, ndim=3, layout="(B*heads, head_channels, Ns)", shape=(bh, c, None))
    ns = k.shape[2]
    check_tensor("v", v, ndim=3, layout="(B*heads, head_channels, Ns)", shape=(bh, c, ns))
    bg = bh // n_heads * n_groups
    check_tensor("pos", pos, ndim=4, layout="(B*groups, Hk, Wk, 2)", shape=(bg, None, None, 2))
    if pos.shape[1] * pos.shape[2] != ns:
        raise ValueError(f"pos: expected Hk*Wk == Ns={ns} (the size of k's dimension 2), got shape {tuple(pos.shape)}")
    if rpe_table is not None:
        check_tensor("rpe_table", rpe_table, ndim=3, layout="(heads, Th, Tw)", shape=(n_heads, None, None))
        if rpe_table.shape[1] < 1 or rpe_table.shape[2] < 1:
            raise ValueError(f"rpe_table: expected a non-empty table, got shape {tuple(rpe_table.shape)}")
    if attn_bias is not None:
        check_tensor("attn_bias", attn_bias, ndim=3, layout="(B*heads, H*W, Ns)", shape=(bh, hw, ns))
    if grid_dtype is not None and grid_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"grid_dtype: expected a float dtype or None, got {grid_dtype!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")

    names = ("q", "k", "v", "pos", "rpe_table", "attn_bias")
    tensors = (q, k, v, pos, rpe_table, attn_bias)
    # Under autocast the original mixes dtypes on purpose (fp16 products, fp32 bias and positions)
    # and every op casts its inputs; outside autocast any mismatch makes one of its ops fail.
    check_same(names[:3], tensors[:3])
    check_same(names, tensors, dtype=not autocast_on(q.device.type))
    for n, t in zip(names, tensors):
        check_finite(n, t)


def deformable_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    rpe_table: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    *,
    query_size: Sequence[int],
    n_heads: int,
    n_groups: int,
    variant: str,
    scale: Optional[float] = None,
    grid_dtype: Optional[torch.dtype] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """DAT / DAT++ attention over bilinearly sampled keys and values.

    ``q`` (B*heads, c, H*W), ``k``/``v`` (B*heads, c, Ns), ``pos`` (B*groups, Hk, Wk, 2) in (y, x)
    order, ``rpe_table`` (heads, Th, Tw) or None, ``attn_bias`` (B*heads, H*W, Ns) or None;
    ``query_size`` = (H, W); ``variant`` "dat" or "dat++" (chooses the query grid of the bias
    lookup). Returns (B*heads, c, H*W)::

        softmax(q^T k * scale + bilinear(rpe_table, (qgrid - pos) * 0.5) + attn_bias) v

    See :func:`fastswin.reference.dat.deformable_attention` for every detail. Differentiable in
    ``q``, ``k``, ``v``, ``pos``, ``rpe_table`` and ``attn_bias``.
    """
    validate(
        q, k, v, pos, rpe_table, attn_bias, query_size=query_size, n_heads=n_heads, n_groups=n_groups,
        variant=variant, scale=scale, grid_dtype=grid_dtype, dropout_p=dropout_p,
    )
    return backends.dispatch(
        OP, backend, q, k, v, pos, rpe_table, attn_bias, query_size=tuple(query_size), n_heads=n_heads,
        n_groups=n_groups, variant=variant, scale=scale, grid_dtype=grid_dtype, dropout_p=float(dropout_p),
    )


# The Triton backend registers itself (it imports triton only on first use).
from ..ops import deformable_attention_triton as _triton_ops  # noqa: E402,F401  (registers the "triton" backend)
