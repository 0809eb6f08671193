"""One function per op; each takes ``backend="auto"|"reference"|"triton"|"cuda"``.

* :func:`bilinear_sample` -- DAT's ``grid_sample`` (bilinear, align_corners=True, zeros), (y, x) positions
* :func:`window_attention` / :func:`window_attention_v2` -- windowed entry, q/k/v of (B*nW, heads, N, d)
* :func:`shifted_window_attention` / :func:`shifted_window_attention_v2` -- block-level entry from
  ``qkv`` of (B, H, W, 3, heads, d): shift, pad and partition folded in
* :func:`deformable_attention` -- DAT's attention core over sampled keys/values
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "bilinear_sample": ".bilinear_sample",
    "window_attention": ".window_attention",
    "window_attention_v2": ".window_attention",
    "shifted_window_attention": ".window_attention",
    "shifted_window_attention_v2": ".window_attention",
    "deformable_attention": ".deformable_attention",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
