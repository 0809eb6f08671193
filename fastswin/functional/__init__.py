"""One function per op; each takes ``backend="auto"|"reference"|"triton"|"cuda"``.

* :func:`bilinear_sample` -- DAT's ``grid_sample`` (bilinear, align_corners=True, zeros), (y, x) positions
* :func:`window_attention` / :func:`window_attention_v2` -- windowed entry, q/k/v of (B*nW, heads, N, d)
* :func:`shifted_window_attention` / :func:`shifted_window_attention_v2` -- block-level entry from
  ``qkv`` of (B, H, W, 3, heads, d): shift, pad and partition folded in
* :func:`deformable_attention` -- DAT's attention core over sampled keys/values

Imported eagerly (these modules only import the reference path and the backend table): a lazy
``__getattr__`` would be shadowed by the submodule of the same name once it is imported.
"""
from .bilinear_sample import bilinear_sample
from .deformable_attention import deformable_attention
from .window_attention import (
    shifted_window_attention,
    shifted_window_attention_v2,
    window_attention,
    window_attention_v2,
)

__all__ = [
    "bilinear_sample",
    "deformable_attention",
    "shifted_window_attention",
    "shifted_window_attention_v2",
    "window_attention",
    "window_attention_v2",
]
