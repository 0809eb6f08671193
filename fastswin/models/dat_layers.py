"""Layers of the DAT / DAT++ backbones, checkpoint-compatible with LeapLabTHU/DAT.

Each class has the original's name, constructor arguments, submodule and parameter names (so an
official state_dict loads with ``strict=True``), creation order (so a seeded build draws the
same initial weights) and forward math:

* ``models/dat_blocks.py`` at 42b489e ("dat") and 2f31405 ("dat++"): :class:`TransformerMLP`,
  :class:`TransformerMLPWithConv` (the two variants differ: see its docstring),
  :class:`LocalAttention`, :class:`ShiftWindowAttention`; ``LayerNormProxy`` is
  :class:`fastswin.modules._common.ChannelsLayerNorm`; ``DAttentionBaseline`` is
  :class:`fastswin.DeformableAttention`.
* ``models/nat.py`` at 2f31405: :class:`NeighborhoodAttention2D` (plain PyTorch, see
  :mod:`fastswin.reference.neighborhood`; the original needs NATTEN's CUDA kernels).
* ``models/dat.py`` at 2f31405: :class:`LayerScale`; timm's ``DropPath``: :class:`DropPath`.

What runs fused: the window attention of the "L" and "S" blocks goes through
:func:`fastswin.functional.shifted_window_attention` at block level (qkv read in place, the
roll and partition folded into the kernel's addressing, the -100 shift mask derived in the
kernel), and the "D" blocks through :class:`fastswin.DeformableAttention`, both with the layer's
``backend``. The original computes the same per-token linears on window-partitioned copies;
linears act per token, so rolling and partitioning commute with them and the result is the same
math (equal to rounding: float64 outputs agree to ~1e-15).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from .._checks import check_tensor, pair
from ..functional.window_attention import shifted_window_attention, window_attention
from ..modules._common import timm_trunc_normal_, windowed_dropout
from ..reference import swin as _swin
from ..reference.neighborhood import neighborhood_attention_2d


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's ``DropPath`` (>= 0.6): in training, each sample's
    residual branch is kept with probability ``1 - drop_prob`` (one Bernoulli draw per sample,
    ``x.new_empty((B, 1, ...)).bernoulli_``) and scaled by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class LayerScale(nn.Module):
    """DAT++'s per-channel residual scale of a (B, C, H, W) map: ``x * weight[c]``, weight
    initialised to ``init_values``."""

    def __init__(self, dim: int, inplace: bool = False, init_values: float = 1e-5):
        super().__init__()
        self.inplace = inplace
        self.weight = nn.Parameter(torch.ones(dim) * init_values)

    def forward(self, x):
        w = self.weight.view(-1, 1, 1)
        return x.mul_(w) if self.inplace else x * w


def _tokens(x):
    """(B, C, H, W) -> (B, H*W, C), the original's ``rearrange(x, 'b c h w -> b (h w) c')``."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def _map(x, H, W):
    """(B, H*W, C) -> (B, C, H, W), the original's ``rearrange(x, 'b (h w) c -> b c h w')``."""
    return x.reshape(x.shape[0], H, W, x.shape[2]).permute(0, 3, 1, 2)


class TransformerMLP(nn.Module):
    """Per-token MLP on a (B, C, H, W) map: ``chunk`` = linear1 (C -> C*expansion), GELU, dropout,
    linear2, dropout (same in both variants)."""

    def __init__(self, channels, expansion, drop):
        super().__init__()
        self.dim1 = channels
        self.dim2 = channels * expansion
        self.chunk = nn.Sequential()
        self.chunk.add_module("linear1", nn.Linear(self.dim1, self.dim2))
        self.chunk.add_module("act", nn.GELU())
        self.chunk.add_module("drop1", nn.Dropout(drop, inplace=True))
        self.chunk.add_module("linear2", nn.Linear(self.dim2, self.dim1))
        self.chunk.add_module("drop2", nn.Dropout(drop, inplace=True))

    def forward(self, x):
        H, W = x.shape[2:]
        return _map(self.chunk(_tokens(x)), H, W)


class TransformerMLPWithConv(nn.Module):
    """MLP with a 3x3 depthwise conv on the hidden map (``use_dwc_mlp``), (B, C, H, W) in and out.
    The variants differ in names and math::

        "dat"   (42b489e): linear1 = Conv2d;              y = linear2(GELU(dwc(linear1(x))))
        "dat++" (2f31405): linear1 = Sequential(Conv2d);  h = linear1(x); y = linear2(GELU(h + dwc(h)))

    (dropouts after linear1 and linear2 in both).
    """

    def __init__(self, channels, expansion, drop, *, variant: str = "dat++"):
        super().__init__()
        if variant not in ("dat", "dat++"):
            raise ValueError(f"variant: expected 'dat' or 'dat++', got {variant!r}")
        self.variant = variant
        self.dim1 = channels
        self.dim2 = channels * expansion

        def conv(a, b):
            c = nn.Conv2d(a, b, 1, 1, 0)
            return c if variant == "dat" else nn.Sequential(c)

        self.linear1 = conv(self.dim1, self.dim2)
        self.drop1 = nn.Dropout(drop, inplace=True)
        self.act = nn.GELU()
        self.linear2 = conv(self.dim2, self.dim1)
        self.drop2 = nn.Dropout(drop, inplace=True)
        self.dwc = nn.Conv2d(self.dim2, self.dim2, 3, 1, 1, groups=self.dim2)

    def forward(self, x):
        if self.variant == "dat":
            return self.drop2(self.linear2(self.drop1(self.act(self.dwc(self.linear1(x))))))
        x = self.drop1(self.linear1(x))
        x = self.act(x + self.dwc(x))
        return self.drop2(self.linear2(x))


class LocalAttention(nn.Module):
    """DAT's window attention ("L" blocks): Swin V1 W-MSA on a (B, C, H, W) map, H and W
    multiples of the window. Parameters as the original: ``proj_qkv`` (C -> 3C), ``proj_out``,
    ``relative_position_bias_table`` ((2Mh-1)(2Mw-1), heads), buffer ``relative_position_index``.

    ``forward(x, mask=None)`` returns ``(y, None, None)``, y (B, C, H, W)::

        qkv = proj_qkv(x per token); o = softmax(q k^T / sqrt(d) + table[index] (+ mask)) v per window
        y = proj_drop(proj_out(o))

    Without ``mask`` it runs the block-level fused op (no partition copy); an explicit ``mask``
    (nW, N, N), as the original accepts, goes through the windowed entry.
    """

    shift_size = 0

    def __init__(self, dim, heads, window_size, attn_drop, proj_drop, *, backend: str = "auto"):
        super().__init__()
        window_size = pair("window_size", window_size)
        self.backend = backends.check_backend_name(backend)
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads
        if dim % heads:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        head_dim = dim // heads
        self.scale = head_dim ** -0.5
        self.proj_out = nn.Linear(dim, dim)
        self.window_size = window_size
        self.proj_drop = nn.Dropout(proj_drop, inplace=True)
        self.attn_drop = nn.Dropout(attn_drop, inplace=True)
        Wh, Ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * Wh - 1) * (2 * Ww - 1), heads))
        timm_trunc_normal_(self.relative_position_bias_table, std=0.01)
        self.register_buffer("relative_position_index", _swin.relative_position_index(window_size))

    def _check(self, x):
        check_tensor("x", x, ndim=4, layout="(B, C, H, W)")
        C, H, W = x.shape[1:]
        if C != self.proj_qkv.in_features:
            raise ValueError(f"x: expected {self.proj_qkv.in_features} channels in dimension 1, got shape {tuple(x.shape)}")
        Wh, Ww = self.window_size
        if H % Wh or W % Ww:
            raise ValueError(
                f"x: spatial size ({H}, {W}) must be a multiple of window_size {self.window_size} "
                "(the original partitions the map into whole windows)"
            )

    def _attend(self, x, mask):
        B, C, H, W = x.shape
        heads = self.heads
        dropout_p = self.attn_drop.p if self.training else 0.0
        qkv = self.proj_qkv(x.permute(0, 2, 3, 1))  # (B, H, W, 3C): q | k | v, each (heads, d)
        if mask is None:
            o = shifted_window_attention(
                qkv.view(B, H, W, 3, heads, C // heads), self.relative_position_bias_table, self.window_size,
                self.shift_size, self.scale, dropout_p=dropout_p, backend=self.backend,
            )  # (B, H, W, C), un-shifted
        else:
            Wh, Ww = self.window_size
            win = _swin.window_partition(qkv, self.window_size).reshape(-1, Wh * Ww, 3, heads, C // heads)
            q, k, v = win.permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, d) each
            o = window_attention(q, k, v, self.relative_position_bias_table, self.window_size, mask, self.scale,
                                 dropout_p=dropout_p, backend=self.backend)
            o = _swin.window_reverse(o.transpose(1, 2).reshape(-1, Wh, Ww, C), self.window_size, H, W)
        y = self.proj_out(o)
        drop = self.proj_drop
        if self.training and drop.p > 0:
            # The original drops on its partitioned windows of the rolled map: the same draws,
            # mapped back to the map (reverse the windows, roll back).
            s = self.shift_size
            y = windowed_dropout(y, float(drop.p), drop, self.window_size, (s, s), H, W, crop_first=True)
        return y.permute(0, 3, 1, 2)

    def forward(self, x, mask: Optional[torch.Tensor] = None):
        self._check(x)
        return self._attend(x, mask), None, None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, window_size={self.window_size}, shift_size={self.shift_size}, backend={self.backend!r}"


class ShiftWindowAttention(LocalAttention):
    """DAT's shifted-window attention ("S" blocks): :class:`LocalAttention` on the map rolled by
    ``-shift_size`` with the -100 region mask, rolled back. DAT uses ``shift_size =
    ceil(window / 2)`` (4 for window 7; Swin uses 3). The ``attn_mask`` buffer (nW, N, N) is kept
    for the state_dict; the fused op derives the same mask from the shift inside the kernel, so
    the input must have the ``fmap_size`` the mask was built for, as in the original."""

    def __init__(self, dim, heads, window_size, attn_drop, proj_drop, shift_size, fmap_size, *, backend: str = "auto"):
        super().__init__(dim, heads, window_size, attn_drop, proj_drop, backend=backend)
        self.fmap_size = pair("fmap_size", fmap_size)
        self.shift_size = shift_size
        if not 0 < self.shift_size < min(self.window_size):
            raise ValueError(f"shift_size: expected 0 < shift_size < {min(self.window_size)}, got {shift_size}")
        H, W = self.fmap_size
        if H % self.window_size[0] or W % self.window_size[1]:
            raise ValueError(f"fmap_size: {self.fmap_size} must be a multiple of window_size {self.window_size}")
        self.register_buffer("attn_mask", _swin.shift_attn_mask(H, W, self.window_size, shift_size))

    def forward(self, x):
        self._check(x)
        if tuple(x.shape[2:]) != self.fmap_size:
            raise ValueError(
                f"x: spatial size {tuple(x.shape[2:])} differs from fmap_size {self.fmap_size}, "
                "the size the shift mask (attn_mask) was built for"
            )
        return self._attend(x, None), None, None


class NeighborhoodAttention2D(nn.Module):
    """DAT++'s neighborhood attention ("N" blocks), ``models/nat.py`` of LeapLabTHU/DAT 2f31405
    (NATTEN 0.14 semantics, dilation 1), on a (B, C, H, W) map. Parameters ``qkv``, ``rpb``
    (heads, 2K-1, 2K-1), ``proj``. A map smaller than the kernel is zero-padded at the bottom and
    right before ``qkv`` and cropped after, as the original does. Runs the plain PyTorch
    :func:`fastswin.reference.neighborhood.neighborhood_attention_2d` (no fused kernel: NATTEN's
    job, outside this library's scope). Returns ``(y, None, None)``."""

    def __init__(self, dim, kernel_size, num_heads, attn_drop=0.0, proj_drop=0.0, dilation=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        if not (kernel_size > 1 and kernel_size % 2 == 1):
            raise ValueError(f"kernel_size: expected an odd number greater than 1, got {kernel_size}")
        if kernel_size not in (3, 5, 7, 9, 11, 13):
            raise ValueError(f"kernel_size: NATTEN 0.14 (the original's) supports 3, 5, 7, 9, 11, 13; got {kernel_size}")
        if dilation not in (None, 1):
            raise NotImplementedError(f"dilation: only 1 (DAT++'s) is implemented, got {dilation!r}")
        self.kernel_size = kernel_size
        self.dilation = 1
        self.window_size = self.kernel_size * self.dilation
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)  # the original's: torch's, not timm's
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        check_tensor("x", x, ndim=4, layout="(B, C, H, W)")
        if x.shape[1] != self.qkv.in_features:
            raise ValueError(f"x: expected {self.qkv.in_features} channels in dimension 1, got shape {tuple(x.shape)}")
        x = x.permute(0, 2, 3, 1)
        B, Hp, Wp, C = x.shape
        pad_r, pad_b = max(0, self.window_size - Wp), max(0, self.window_size - Hp)
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        H, W = x.shape[1:3]
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        dropout_p = self.attn_drop.p if self.training else 0.0
        o = neighborhood_attention_2d(q * self.scale, k, v, self.rpb, self.kernel_size, dropout_p=dropout_p)
        o = o.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        if pad_r or pad_b:
            o = o[:, :Hp, :Wp, :]
        return self.proj_drop(self.proj(o)).permute(0, 3, 1, 2), None, None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"
