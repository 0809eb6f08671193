"""Pieces shared by the modules and the model builders: timm's initializer, DAT's channel LayerNorm."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


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
