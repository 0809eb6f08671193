"""Reference 2-D neighborhood attention (NATTEN semantics), plain PyTorch.

DAT++ (LeapLabTHU/DAT 2f31405, ``models/nat.py``) uses NATTEN 0.14's ``NATTEN2DQKRPBFunction``
and ``NATTEN2DAVFunction`` for its "N" blocks. Those are CUDA-only; this is the same math for
any device and dtype, dilation 1 (the only one DAT++ uses):

* every query (i, j) attends to the K x K keys of the window whose top-left corner is
  ``(clamp(i - K//2, 0, H - K), clamp(j - K//2, 0, W - K))`` -- near a border the window slides
  inward instead of reaching past the map (so H, W >= K is required; ``nat.py`` pads up to K);
* the bias of key (y, x) is ``rpb[h, K - 1 + y - i, K - 1 + x - j]`` from the (heads, 2K-1, 2K-1)
  table -- NATTEN's ``get_pb_start(i) + ki`` written as a relative offset;
* the K*K logits of a query are ordered ``ki * K + kj`` (row-major in the window), which is the
  order attention dropout draws its mask in.

This module imports no kernel: it is the oracle for any fused neighborhood attention and the
path :class:`fastswin.models.dat_layers.NeighborhoodAttention2D` runs.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def neighborhood_windows(length: int, kernel_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key positions and bias rows along one axis, both (length, kernel_size) int64::

        keys[i, t] = clamp(i - K//2, 0, length - K) + t
        bias[i, t] = keys[i, t] - i + K - 1           in [0, 2K - 2]
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd positive int, got {kernel_size}")
    if length < kernel_size:
        raise ValueError(f"length: neighborhood attention needs at least kernel_size={kernel_size} positions, got {length}")
    i = torch.arange(length, device=device)
    start = (i - kernel_size // 2).clamp(min=0, max=length - kernel_size)
    keys = start[:, None] + torch.arange(kernel_size, device=device)
    return keys, keys - i[:, None] + (kernel_size - 1)


def neighborhood_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor,
                              kernel_size: int, *, dropout_p: float = 0.0) -> torch.Tensor:
    """NATTEN 2-D attention with relative position bias, dilation 1.

    q, k, v: (B, heads, H, W, d), q already scaled; rpb: (heads, 2K-1, 2K-1). Returns
    (B, heads, H, W, d)::

        a[i, j, (y, x)] = q[i, j] . k[y, x] + rpb[K-1 + y-i, K-1 + x-j]   for (y, x) in window(i, j)
        out[i, j] = sum_(y, x) softmax(a[i, j])[(y, x)] * v[y, x]

    Memory: the gathered keys and values are (B, heads, H, W, K, K, d) each -- fine for a
    reference, K*K times the input.
    """
    if q.dim() != 5:
        raise ValueError(f"q: expected a 5-D tensor (B, heads, H, W, d), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected q's shape {tuple(q.shape)}, dtype {q.dtype} and device {q.device}, "
                             f"got {tuple(t.shape)}, {t.dtype}, {t.device}")
    B, h, H, W, d = q.shape
    K = kernel_size
    if tuple(rpb.shape) != (h, 2 * K - 1, 2 * K - 1):
        raise ValueError(f"rpb: expected shape ({h}, {2 * K - 1}, {2 * K - 1}) for {h} heads and kernel_size {K}, "
                         f"got {tuple(rpb.shape)}")
    rows, brow = neighborhood_windows(H, K, q.device)
    cols, bcol = neighborhood_windows(W, K, q.device)
    ri, ci = rows[:, None, :, None], cols[None, :, None, :]  # (H, 1, K, 1), (1, W, 1, K)
    kn = k[:, :, ri, ci]  # (B, h, H, W, K, K, d)
    vn = v[:, :, ri, ci]
    attn = torch.einsum("bhijd,bhijxyd->bhijxy", q, kn)
    attn = attn + rpb[:, brow[:, None, :, None], bcol[None, :, None, :]]  # (h, H, W, K, K)
    attn = attn.reshape(B, h, H, W, K * K).softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return torch.einsum("bhijxy,bhijxyd->bhijd", attn.reshape(B, h, H, W, K, K), vn)
