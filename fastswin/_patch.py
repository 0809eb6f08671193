"""Patch a built timm / torchvision Swin model, in place, to run its attention through fastswin.

Public as ``fastswin.patch``, ``fastswin.unpatch`` and ``fastswin.is_patched``. The file is
``_patch.py``, not ``patch.py``: importing a submodule ``fastswin.patch`` would set the package
attribute ``fastswin.patch`` to the module, shadowing the function.

:func:`patch` makes every Swin block of a model run its (shifted) window attention through
fastswin's *block-level* op -- :func:`fastswin.functional.shifted_window_attention` (V1) or
:func:`~fastswin.functional.shifted_window_attention_v2` (V2) -- with the cyclic shift, the
padding and the window partition folded into the op: ``qkv linear -> op -> proj``. No parameter,
buffer or sub-module is added, renamed or replaced (``state_dict()`` is unchanged, checkpoints
load either way); :func:`unpatch` restores the original behaviour exactly.

Supported (exact classes, or subclasses that do not override the patched method):

* timm 1.0.x ``swin_transformer.SwinTransformerBlock`` and ``swin_transformer_v2.SwinTransformerV2Block``
  (their ``attn`` a timm ``WindowAttention`` or a :class:`fastswin.WindowAttention` /
  :class:`fastswin.WindowAttentionV2`). The block's ``_attn`` is replaced by an instance attribute
  that reads, at every call, what timm's ``_attn`` reads: ``window_size`` and ``shift_size`` (timm's
  "window = resolution, shift = 0 where resolution <= window unless ``always_partition``" is
  already applied to them by the block, at construction and in ``set_input_size``),
  ``dynamic_mask``, the static ``attn_mask`` buffer, the attention's parameters, ``fused_attn``
  and ``training``. ``set_input_size`` (model, stage or block) after patching just works.
* torchvision ``swin_transformer.ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2`` (the
  ``attn`` of torchvision's ``SwinTransformerBlock`` / ``SwinTransformerBlockV2``): its ``forward``
  is replaced. torchvision pads *before* the roll (timm rolls, then pads) and drops the shift where
  the window covers the padded map; the patched forward pads the input with zeros first (a copy,
  only when the map is not a multiple of the window), then calls the block-level op on the padded
  map (which then pads nothing), then crops -- the same order as torchvision.

Where the patched path cannot prove it computes what the original computes it calls the original
instead, with a ``RuntimeWarning`` saying why, so the result is never different -- e.g. a
timm block with a static mask built for another size than the input's (timm then errors or uses
that mask), a shift outside ``[0, window)``, or an attention window that disagrees with the block's.

* Hugging Face transformers ``SwinAttention`` (Swin) and ``Swinv2SelfAttention`` (Swinv2): their
  ``forward`` is replaced by fastswin's *windowed* op, the host keeping its own pad/roll/partition
  and -100 mask; see :mod:`fastswin._patch_hf` (transformers is never imported by fastswin).

Dropout, in training mode: attention dropout goes to the op's ``dropout_p`` (only the reference
backend implements it: ``backend="auto"`` runs the reference for such calls, an explicit fused
backend raises :class:`fastswin.BackendUnavailableError`); the reference draws the same random
numbers as timm/torchvision. The output-projection dropout (``proj_drop`` / torchvision
``dropout``) is drawn on a tensor of the original's windowed, padded shape and mapped back to
the map, so patched training draws exactly the original's masks too.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends
from ._checks import pair
from .functional.window_attention import shifted_window_attention, shifted_window_attention_v2
from .modules._common import windowed_dropout
from . import _patch_hf as _hf

__all__ = ["patch", "unpatch", "is_patched"]



# ---- the patched callables -----------------------------------------------------------------------


class _Patched:
    """What replaces the original method: an instance attribute of the patched module (``_attn``
    for a timm block, ``forward`` for a torchvision attention). A plain picklable object holding
    the module, the backend and the original function (so ``copy.deepcopy`` and ``pickle`` of a
    patched model work, and unpatch/fallback need no lookup)."""

    def __init__(self, owner: nn.Module, kind: str, backend: str, original: Callable):
        self.owner = owner
        self.kind = kind
        self.backend = backend
        self.original = original

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        # timm / torchvision: one argument; Hugging Face: the attention forward's arguments
        return _IMPL[self.kind](self, x, *args, **kwargs)

    def fallback(self, x: torch.Tensor, why: str, *args, **kwargs):
        # Not silent: the result is the original's, but the user asked for the fused path.
        # Python's default filter shows each distinct message once.
        warnings.warn(f"fastswin.patch: {type(self.owner).__name__} runs its original (unfused) attention: {why}",
                      RuntimeWarning, stacklevel=3)
        return self.original(self.owner, x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<fastswin patched {self.kind} attention, backend={self.backend!r}>"


def _padded(size: int, window: int) -> int:
    return -(-size // window) * window


def _dropout_p(drop: nn.Module, training: bool) -> Optional[float]:
    """``dropout_p`` of the op for timm's ``attn_drop`` module; None if it is not an nn.Dropout."""
    if isinstance(drop, nn.Identity):
        return 0.0
    if type(drop) is not nn.Dropout:
        return None
    return float(drop.p) if training else 0.0


# ---- timm ----------------------------------------------------------------------------------------


def _timm_geometry(self: _Patched, block, x):
    """(window, shift, hp, wp) as timm's ``_attn`` uses them, or a reason to fall back."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return "input is not a 4-D (B, H, W, C) tensor"
    window, shift = pair("window_size", block.window_size), pair("shift_size", block.shift_size)
    if pair("attn.window_size", block.attn.window_size) != window:
        return f"attn.window_size {tuple(block.attn.window_size)} != block window_size {window}"
    if not all(0 <= s < m for s, m in zip(shift, window)):
        return f"shift_size {shift} is not within [0, window_size {window})"
    H, W = x.shape[1], x.shape[2]
    hp, wp = _padded(H, window[0]), _padded(W, window[1])
    if not getattr(block, "dynamic_mask", False):
        # timm uses the static buffer; the op derives the mask from the padded size. They agree
        # when the buffer is timm's get_attn_mask() for this padded size (None without a shift).
        mask = block.attn_mask
        if not any(shift):
            if mask is not None:
                return "static attn_mask is set but the block has no shift"
        else:
            ir = pair("input_resolution", block.input_resolution)
            n = window[0] * window[1]
            nw = (hp // window[0]) * (wp // window[1])
            if mask is None:
                return "shifted block without an attn_mask"
            if (_padded(ir[0], window[0]), _padded(ir[1], window[1])) != (hp, wp):
                return (f"static attn_mask was built for input_resolution {ir}, the input is {(H, W)} "
                        "(use set_input_size, or dynamic_mask / strict_img_size=False)")
            if tuple(mask.shape) != (nw, n, n):
                return f"static attn_mask has shape {tuple(mask.shape)}, expected {(nw, n, n)}"
    return window, shift, hp, wp


def _timm_proj(self: _Patched, attn, out, window, shift, hp, wp):
    y = attn.proj(out)
    drop = attn.proj_drop
    if isinstance(drop, nn.Identity) or not drop.training or drop.p == 0:
        return y
    return windowed_dropout(y, float(drop.p), drop, window, shift, hp, wp, crop_first=True)


def _timm_v1(self: _Patched, x: torch.Tensor) -> torch.Tensor:
    block = self.owner
    attn = block.attn
    geo = _timm_geometry(self, block, x)
    fused = bool(getattr(attn, "fused_attn", False))
    # timm: fused path drops with attn.training, the explicit path with the attn_drop module's flag
    p = _dropout_p(attn.attn_drop, attn.training if fused else attn.attn_drop.training)
    if isinstance(geo, str) or p is None or type(attn.proj_drop) not in (nn.Dropout, nn.Identity):
        return self.fallback(x, geo if isinstance(geo, str) else "unexpected dropout modules")
    window, shift, hp, wp = geo
    B, H, W, _ = x.shape
    qkv = attn.qkv(x).view(B, H, W, 3, attn.num_heads, -1)
    pad_qkv = None if attn.qkv.bias is None else attn.qkv.bias.view(3, attn.num_heads, -1)
    scale = None if fused else attn.scale  # timm's fused branch leaves SDPA its own scale
    out = shifted_window_attention(qkv, attn.relative_position_bias_table, window, shift, scale, pad_qkv,
                                   dropout_p=p, sdpa=fused, backend=self.backend)
    return _timm_proj(self, attn, out, window, shift, hp, wp)


def _timm_v2(self: _Patched, x: torch.Tensor) -> torch.Tensor:
    block = self.owner
    attn = block.attn
    geo = _timm_geometry(self, block, x)
    p = _dropout_p(attn.attn_drop, attn.attn_drop.training)
    if isinstance(geo, str) or p is None or type(attn.proj_drop) not in (nn.Dropout, nn.Identity):
        return self.fallback(x, geo if isinstance(geo, str) else "unexpected dropout modules")
    window, shift, hp, wp = geo
    B, H, W, _ = x.shape
    heads = attn.num_heads
    # timm V2's two bias paths (fused addmm or add after) round differently: keep both.
    pad_qkv = None
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        pad_qkv = qkv_bias.view(3, heads, -1)
    qkv = qkv.view(B, H, W, 3, heads, -1)
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
    out = shifted_window_attention_v2(qkv, attn.logit_scale, table, window, shift, pad_qkv,
                                      dropout_p=p, backend=self.backend)
    return _timm_proj(self, attn, out, window, shift, hp, wp)


# ---- torchvision ---------------------------------------------------------------------------------


def _tv(self: _Patched, x: torch.Tensor, v2: bool) -> torch.Tensor:
    attn = self.owner
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return self.fallback(x, "input is not a 4-D (B, H, W, C) tensor")
    window = pair("window_size", attn.window_size)
    shift = list(pair("shift_size", attn.shift_size))
    B, H, W, C = x.shape
    heads = attn.num_heads
    # torchvision: pad first (zeros), then drop the shift where the window covers the padded map
    hp, wp = _padded(H, window[0]), _padded(W, window[1])
    if window[0] >= hp:
        shift[0] = 0
    if window[1] >= wp:
        shift[1] = 0
    shift = tuple(shift)
    if not all(0 <= s < m for s, m in zip(shift, window)):
        return self.fallback(x, f"shift_size {shift} is not within [0, window_size {window})")
    if C % heads:
        return self.fallback(x, f"C={C} is not a multiple of num_heads={heads}")
    xp = x if (hp, wp) == (H, W) else F.pad(x, (0, 0, 0, wp - W, 0, hp - H))
    qkv_bias = attn.qkv.bias
    if v2 and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length:2 * length].zero_()
    qkv = F.linear(xp, attn.qkv.weight, qkv_bias).view(B, hp, wp, 3, heads, C // heads)
    p = float(attn.attention_dropout) if attn.training else 0.0
    if v2:
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
        out = shifted_window_attention_v2(qkv, attn.logit_scale, table, window, shift, None,
                                          dropout_p=p, backend=self.backend)
    else:
        out = shifted_window_attention(qkv, attn.relative_position_bias_table, window, shift,
                                       (C // heads) ** -0.5, None, dropout_p=p, backend=self.backend)
    y = F.linear(out, attn.proj.weight, attn.proj.bias)
    pd = float(attn.dropout)
    if attn.training and pd > 0:
        y = windowed_dropout(y, pd, lambda t: F.dropout(t, p=pd, training=True), window, shift, hp, wp,
                              crop_first=False)
    return y[:, :H, :W, :].contiguous()


def _tv_v1(self, x):
    return _tv(self, x, v2=False)


def _tv_v2(self, x):
    return _tv(self, x, v2=True)


_IMPL = {"timm_v1": _timm_v1, "timm_v2": _timm_v2, "tv_v1": _tv_v1, "tv_v2": _tv_v2, **_hf.IMPL}


# ---- what can be patched -------------------------------------------------------------------------


def _targets():
    """[(kind, module class, attribute to replace, original function, check)]; check: None, a tuple
    of allowed ``attn.forward`` functions (timm), or a callable ``check(module) -> reason | None``
    (Hugging Face)."""
    out = []
    try:
        from timm.models import swin_transformer as t1, swin_transformer_v2 as t2
    except ImportError:  # timm is optional
        pass
    else:
        from .modules.window_attention import WindowAttention, WindowAttentionV2

        out.append(("timm_v1", t1.SwinTransformerBlock, "_attn", t1.SwinTransformerBlock._attn,
                    (t1.WindowAttention.forward, WindowAttention.forward)))
        out.append(("timm_v2", t2.SwinTransformerV2Block, "_attn", t2.SwinTransformerV2Block._attn,
                    (t2.WindowAttention.forward, WindowAttentionV2.forward)))
    try:
        from torchvision.models import swin_transformer as tv
    except ImportError:  # torchvision is optional
        pass
    else:
        # V2 before V1: ShiftedWindowAttentionV2 subclasses ShiftedWindowAttention
        out.append(("tv_v2", tv.ShiftedWindowAttentionV2, "forward", tv.ShiftedWindowAttentionV2.forward, None))
        out.append(("tv_v1", tv.ShiftedWindowAttention, "forward", tv.ShiftedWindowAttention.forward, None))
    out.extend(_hf.targets())  # transformers: only if already imported (never imports it)
    return out


_SUPPORTED = ("timm SwinTransformerBlock / SwinTransformerV2Block (timm.models.swin_transformer[_v2]), "
              "torchvision ShiftedWindowAttention / ShiftedWindowAttentionV2 (torchvision.models.swin_transformer) "
              "and " + _hf.SUPPORTED)


def _find(model: nn.Module, fn: str):
    """[(module, kind, attr, original)] for every Swin block/attention; TypeError if none or if one
    cannot be patched exactly (before anything is changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    targets = _targets()
    found, problems = [], []
    for name, m in model.named_modules():
        for kind, cls, attr, original, attn_forwards in targets:
            if not isinstance(m, cls):
                continue
            where = f"{name or '<model>'} ({type(m).__qualname__})"
            if getattr(type(m), attr) is not original:
                problems.append(f"{where} overrides {attr}()")
            elif callable(attn_forwards) and attn_forwards(m) is not None:
                problems.append(f"{where}: {attn_forwards(m)}")
            elif isinstance(attn_forwards, tuple) and getattr(type(m.attn), "forward", None) not in attn_forwards:
                problems.append(f"{where}.attn is a {type(m.attn).__qualname__}, not timm's or fastswin's "
                                "WindowAttention")
            else:
                current = m.__dict__.get(attr)
                if current is not None and not isinstance(current, _Patched):
                    problems.append(f"{where} already has an instance-level {attr} set by something else")
                else:
                    found.append((m, kind, attr, original))
            break
    if problems and fn == "patch":
        raise TypeError("fastswin.patch: cannot patch these blocks exactly (nothing was changed): "
                        + "; ".join(problems))
    if not found and not problems:
        raise TypeError(f"fastswin.{fn}: {type(model).__qualname__} contains no Swin block; supported: {_SUPPORTED}"
                        " (timm's swin_transformer_v2_cr is not)")
    return found


def patch(model: nn.Module, backend: str = "auto") -> int:
    """Make every Swin block of ``model`` run its window attention through fastswin's block-level
    op (shift, pad and partition folded into the op), in place. Returns the number of blocks
    patched (timm blocks, or torchvision attentions).

    ``backend``: "auto" | "reference" | "triton" | "cuda", passed to the op at every call
    (``FASTSWIN_BACKEND`` still overrides it). Patching a patched model again only sets the
    backend (nothing is wrapped twice). ``state_dict()``, parameters, buffers and sub-modules are
    untouched; :func:`unpatch` undoes it. See the module docstring for what is supported and the
    exactness rules (the result equals the original's up to rounding; in float64 on the reference
    backend to ~1e-15).

    Raises ``TypeError`` if ``model`` is not a module, holds no supported Swin block, or holds one
    that cannot be patched exactly (a subclass overriding the patched method, an unknown attention
    module); ``ValueError`` for an unknown backend.
    """
    backend = backends.check_backend_name(backend)
    found = _find(model, "patch")
    for m, kind, attr, original in found:
        current = m.__dict__.get(attr)
        if isinstance(current, _Patched):
            current.backend = backend
        else:
            setattr(m, attr, _Patched(m, kind, backend, original))
    return len(found)


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch`: every patched block of ``model`` runs its original attention again.
    Returns the number of blocks unpatched (0 if none was patched). ``TypeError`` if ``model``
    holds no Swin block."""
    count = 0
    for m, _kind, attr, _original in _find(model, "unpatch"):
        if isinstance(m.__dict__.get(attr), _Patched):
            delattr(m, attr)
            count += 1
    return count


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a block, or a model: any of its blocks) is patched by :func:`patch`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    return any(isinstance(m.__dict__.get(a), _Patched) for m in module.modules() for a in ("_attn", "forward"))
