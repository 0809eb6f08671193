"""Pieces shared by the modules, the model builders and ``fastswin.patch``: timm's initializer,
DAT's channel LayerNorm, the windowed output dropout of the originals."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ..reference.swin import window_reverse


@torch.no_grad()
def timm_trunc_normal_(t: torch.Tensor, std: float, mean: float = 0.0, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """timm's ``trunc_normal_`` (the originals' init): one uniform draw per element mapped through
    the inverse normal CDF, bounds ``a``, ``b`` absolute. Not ``nn.init.trunc_normal_``: recent
    torch samples by rejection, which draws other numbers, and a seeded build must give the
    original's exact weights."""

    def cdf(z):
        return (1.0 + math.erf(z / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    t.uniform_(2 * lo - 1, 2 * hi - 1)
    t.erfinv_()
    t.mul_(std * math.sqrt(2.0))
    t.add_(mean)
    return t.clamp_(min=a, max=b)


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over C of a (B, C, H, W) map; named ``norm`` inside, like DAT's ``LayerNormProxy``
    (so the state_dict key is ``<name>.norm.weight``). Returns the permuted view (channels-last
    strides), as the original does: the next conv sees the same memory layout and picks the same
    kernel."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def windowed_dropout(y: torch.Tensor, p: float, draw: Callable, window, shift, hp: int, wp: int,
                     crop_first: bool) -> torch.Tensor:
    """Apply the original's output dropout to ``y`` (B, Hm, Wm, C) with the original's draws:
    ``draw`` is applied to ones of the original's windowed padded shape (B*nW, N, C), in ``y``'s
    dtype (same random numbers), and the kept-mask is mapped back like the original maps its
    output: reverse windows, then crop and roll back (timm, ``crop_first``) or roll back and crop
    (torchvision). On the CPU, torch's dropout is ``x * (bernoulli / (1-p))`` with the scaled noise
    in x's dtype, so ``y * noise`` is the original's result to the bit; CUDA's fused dropout
    multiplies by the mask, then by the scale in float: ``y * mask * scale``."""
    mh, mw = window
    B, H, W, C = y.shape
    nw = (hp // mh) * (wp // mw)
    noise = draw(torch.ones(B * nw, mh * mw, C, device=y.device, dtype=y.dtype))
    noise = window_reverse(noise.view(-1, mh, mw, C), (mh, mw), hp, wp)
    sh, sw = shift
    if crop_first:
        noise = noise[:, :H, :W]
        if sh or sw:
            noise = torch.roll(noise, shifts=(sh, sw), dims=(1, 2))
    else:
        if sh or sw:
            noise = torch.roll(noise, shifts=(sh, sw), dims=(1, 2))
        noise = noise[:, :H, :W]
    if y.device.type == "cpu" or p >= 1.0:
        return y * noise
    return y * (noise != 0) * (1.0 / (1.0 - p))
