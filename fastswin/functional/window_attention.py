"""``fastswin.functional`` Swin V1 / V2 window attention, one entry per op for every backend.

Exact formulas and shapes: :mod:`fastswin.reference.swin`. Each function validates its inputs
(errors name the argument), then runs on the backend chosen by :func:`fastswin.backends.dispatch`.

Backends: ``reference`` (registered here) and ``triton`` (registered by
:mod:`fastswin.ops.window_attention_triton`, imported at the end of this file). ``cuda`` has no
window-attention kernel yet: asking for it raises :class:`fastswin.BackendUnavailableError`.

Attention dropout (``dropout_p > 0``) is part of the call so that the modules can train with
timm's ``attn_drop``. Only the reference implements it, and the policy lives here, not in the
backends (their functions and reasons functions take exactly the reference's arguments without
``dropout_p``): with ``dropout_p > 0``, ``auto`` runs the reference, and any other explicitly
requested backend (argument or ``FASTSWIN_BACKEND``) raises :class:`BackendUnavailableError`
instead of silently dropping the dropout.

Dtypes: q, k, v (or qkv) share one float dtype; the tables, ``logit_scale``, ``mask`` and
``pad_qkv`` have that dtype too, or float32 when the activations are float16/bfloat16 (autocast
keeps parameters in float32; the result matches timm's under the same autocast). ``mask`` may
also be bool or a float dtype that promotes to q's (float32 mask with float64 q, float16 with
float32): it is cast to q's dtype, which is what timm's ``attn + mask`` does.

``sdpa=True`` (V1 only; the modules pass their ``fused_attn``) makes the reference compute as
timm's fused branch (``F.scaled_dot_product_attention``) so results equal timm's with the same
flag; the fused backends ignore it (they are fused anyway and agree with both paths to rounding).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .. import backends
from .._checks import FLOAT_DTYPES, check_finite, check_same, check_tensor, finite_checks_enabled, pair
from ..reference import swin as _ref

OPS = ("window_attention", "window_attention_v2", "shifted_window_attention", "shifted_window_attention_v2")


_REFERENCE = dict(zip(OPS, (_ref.window_attention, _ref.window_attention_v2,
                            _ref.shifted_window_attention, _ref.shifted_window_attention_v2)))
for _op, _fn in _REFERENCE.items():
    backends.register(_op, "reference", reasons=backends.always_able)(_fn)


def _dispatch(op: str, backend, args: tuple, dropout_p: float, sdpa: bool = False):
    # ``sdpa`` (V1 only) is a reference-only keyword: the other backends are fused anyway.
    ref_kw = {"sdpa": True} if sdpa else {}
    if not dropout_p:
        impl = backends.select(op, backend, *args)
        return impl.fn(*args, **ref_kw) if impl.backend == "reference" else impl.fn(*args)
    name = backends.resolve_name(backend)  # the argument, or FASTSWIN_BACKEND
    if name not in (backends.AUTO, "reference"):
        raise backends.BackendUnavailableError(
            f"backend {name!r} cannot run {op}: attention dropout (dropout_p={dropout_p}) is only implemented by "
            "the reference backend. Pass backend='auto' or 'reference', or run the module in eval mode."
        )
    backends.note_selected(op, "reference")
    return _REFERENCE[op](*args, dropout_p=dropout_p, **ref_kw)


# ---- validation ---------------------------------------------------------------------------------


def _window(window_size):
    mh, mw = pair("window_size", window_size)
    if mh < 1 or mw < 1:
        raise ValueError(f"window_size: expected sizes >= 1, got {(mh, mw)}")
    return mh, mw


def _shift(shift_size, window):
    sh, sw = pair("shift_size", shift_size)
    if not (0 <= sh < window[0] and 0 <= sw < window[1]):
        raise ValueError(
            f"shift_size: expected 0 <= shift < window in each dimension, got shift_size {(sh, sw)} "
            f"for window_size {window}"
        )
    return sh, sw


def _table(name, table, window, heads, ref):
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    check_tensor(name, table, ndim=2, layout="((2*Mh-1)*(2*Mw-1), heads)")
    if tuple(table.shape) != (entries, heads):
        raise ValueError(
            f"{name}: expected shape ({entries}, {heads}) = ((2*Mh-1)*(2*Mw-1), heads) for window_size {window} "
            f"and {heads} heads (from {ref}), got {tuple(table.shape)}"
        )


def _mask(mask, batch_windows, n, ref):
    if mask is None:
        return
    check_tensor("mask", mask, ndim=3, layout="(nW, N, N)", dtypes=FLOAT_DTYPES + (torch.bool,))
    nw = mask.shape[0]
    if nw < 1 or tuple(mask.shape[1:]) != (n, n):
        raise ValueError(f"mask: expected shape (nW, {n}, {n}) = (nW, N, N), got {tuple(mask.shape)}")
    if batch_windows % nw != 0:
        raise ValueError(
            f"mask: {ref}'s first dimension B*nW = {batch_windows} is not divisible by mask's nW = {nw}"
        )


def _dropout(dropout_p):
    if not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p <= 1:
        raise ValueError(f"dropout_p: expected a number in [0, 1], got {dropout_p!r}")
    return float(dropout_p)


def _qkv_windows(q, k, v, window):
    layout = "(B*nW, heads, N, head_dim)"
    check_tensor("q", q, ndim=4, layout=layout)
    n = window[0] * window[1]
    if q.shape[2] != n:
        raise ValueError(
            f"q: expected N = window_size[0]*window_size[1] = {n} in dimension 2 {layout}, got shape {tuple(q.shape)}"
        )
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, layout=layout)
        if t.shape != q.shape:
            what = "head_dim" if t.shape[:3] == q.shape[:3] else "shape"
            raise ValueError(
                f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)} ({what} mismatch)"
            )
    return n


def _logit_scale(logit_scale, heads):
    check_tensor("logit_scale", logit_scale, layout="(heads, 1, 1)")
    if logit_scale.numel() != heads or logit_scale.dim() not in (1, 3):
        raise ValueError(
            f"logit_scale: expected shape ({heads}, 1, 1) or ({heads},) for {heads} heads, "
            f"got {tuple(logit_scale.shape)}"
        )


def _scale(scale):
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    return None if scale is None else float(scale)


def _block_qkv(qkv, pad_qkv):
    layout = "(B, H, W, 3, heads, head_dim)"
    check_tensor("qkv", qkv, ndim=6, layout=layout)
    if qkv.shape[3] != 3:
        raise ValueError(f"qkv: expected size 3 in dimension 3 {layout}, got shape {tuple(qkv.shape)}")
    if qkv.shape[1] < 1 or qkv.shape[2] < 1:
        raise ValueError(f"qkv: expected H >= 1 and W >= 1 {layout}, got shape {tuple(qkv.shape)}")
    if pad_qkv is not None:
        check_tensor("pad_qkv", pad_qkv, ndim=3, layout="(3, heads, head_dim)")
        if pad_qkv.shape != qkv.shape[3:]:
            raise ValueError(
                f"pad_qkv: expected shape {tuple(qkv.shape[3:])} = (3, heads, head_dim) of qkv, "
                f"got {tuple(pad_qkv.shape)}"
            )


def _mask_to(mask, q):
    """timm adds the mask to the logits, so it promotes: a bool mask adds 0/1, and a float mask
    whose dtype promotes with q's to q's (float32 mask, float64 module; float16 mask, float32
    module) adds its values exactly. Cast those to q's dtype -- the same numbers timm's add uses;
    leave the rest for :func:`_same` (float32 with float16/bfloat16 q is autocast's mix; other
    mixes raise naming ``mask``)."""
    if mask is None or mask.dtype == q.dtype:
        return mask
    if mask.dtype == torch.bool or (mask.is_floating_point() and torch.promote_types(q.dtype, mask.dtype) == q.dtype):
        return mask.to(q.dtype)
    return mask


def _same(main: dict, aux: dict) -> None:
    """One device for all; one dtype for the activations ``main``; the ``aux`` tensors (tables,
    logit_scale, mask, pad_qkv) in that dtype too, or float32 when the activations are
    float16/bfloat16 -- what autocast hands over (parameters stay float32). A mask of another
    dtype that timm's add accepts was already cast by :func:`_mask_to`."""
    names, tensors = list(main) + list(aux), list(main.values()) + list(aux.values())
    check_same(names, tensors, dtype=False)
    check_same(list(main), list(main.values()))
    first, ref = next(iter(main.items()))
    low = ref.dtype in (torch.float16, torch.bfloat16)
    for name, t in aux.items():
        if t is None or t.dtype == ref.dtype or (low and t.dtype == torch.float32):
            continue
        want = _dt(ref.dtype) + (" or float32" if low else "")
        raise TypeError(f"{name}: expected dtype {want} (the dtype of {first}), got {_dt(t.dtype)}")


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _finite(mask=None, **tensors):
    """NaN/Inf checks (opt-in, FASTSWIN_CHECK_FINITE=1), after the device checks."""
    for name, t in tensors.items():
        check_finite(name, t)
    # -inf is a legitimate additive mask value; only NaN is an error there.
    if mask is not None and finite_checks_enabled() and not torch.compiler.is_compiling():
        if bool(torch.isnan(mask).any()):
            raise ValueError("mask: contains NaN (set FASTSWIN_CHECK_FINITE=0 to skip this check)")


# ---- public entries -------------------------------------------------------------------------------


def window_attention(q, k, v, rel_pos_table, window_size, mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, *, dropout_p: float = 0.0, sdpa: bool = False,
                     backend: str = "auto"):
    """Swin V1 W-MSA on partitioned windows.

    q, k, v: (B*nW, heads, N, d), N = Mh*Mw; rel_pos_table: ((2Mh-1)(2Mw-1), heads) (timm's
    ``relative_position_bias_table``); mask: (nW, N, N) additive, B*nW divisible by nW, or None;
    scale: d**-0.5 if None. Returns (B*nW, heads, N, d)::

        softmax((q*scale) @ k^T + table[rel_index] + mask[w]) @ v

    mask may also be bool (adds 0/1) or a float dtype that promotes to q's (cast, as timm's add
    does). sdpa: for the reference backend, compute as timm's ``fused_attn`` path
    (``F.scaled_dot_product_attention``, see :func:`fastswin.reference.swin.window_attention`);
    the other backends ignore it (they are fused kernels either way).
    """
    window = _window(window_size)
    n = _qkv_windows(q, k, v, window)
    _table("rel_pos_table", rel_pos_table, window, q.shape[1], "q")
    _mask(mask, q.shape[0], n, "q")
    mask = _mask_to(mask, q)
    _same(dict(q=q, k=k, v=v), dict(rel_pos_table=rel_pos_table, mask=mask))
    scale, dropout_p = _scale(scale), _dropout(dropout_p)
    _finite(q=q, k=k, v=v, rel_pos_table=rel_pos_table, mask=mask)
    return _dispatch("window_attention", backend, (q, k, v, rel_pos_table, window, mask, scale), dropout_p,
                     bool(sdpa))


def window_attention_v2(q, k, v, logit_scale, rel_pos_table, window_size, mask: Optional[torch.Tensor] = None,
                        *, dropout_p: float = 0.0, backend: str = "auto"):
    """Swin V2 scaled cosine attention on partitioned windows.

    q, k, v: (B*nW, heads, N, d); logit_scale: (heads, 1, 1) or (heads,); rel_pos_table:
    ((2Mh-1)(2Mw-1), heads), the raw ``cpb_mlp`` output; mask: (nW, N, N) or None.
    Returns (B*nW, heads, N, d)::

        softmax(cos(q, k) * exp(min(logit_scale, log 100)) + 16*sigmoid(table[rel_index]) + mask[w]) @ v

    mask dtypes as in :func:`window_attention`. No ``sdpa``: timm's V2 has no fused path.
    """
    window = _window(window_size)
    n = _qkv_windows(q, k, v, window)
    _logit_scale(logit_scale, q.shape[1])
    _table("rel_pos_table", rel_pos_table, window, q.shape[1], "q")
    _mask(mask, q.shape[0], n, "q")
    mask = _mask_to(mask, q)
    _same(dict(q=q, k=k, v=v), dict(logit_scale=logit_scale, rel_pos_table=rel_pos_table, mask=mask))
    dropout_p = _dropout(dropout_p)
    _finite(q=q, k=k, v=v, logit_scale=logit_scale, rel_pos_table=rel_pos_table, mask=mask)
    return _dispatch("window_attention_v2", backend, (q, k, v, logit_scale, rel_pos_table, window, mask), dropout_p)


def shifted_window_attention(qkv, rel_pos_table, window_size, shift_size, scale: Optional[float] = None,
                             pad_qkv: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0, sdpa: bool = False,
                             backend: str = "auto"):
    """Swin V1 (S)W-MSA at block level: timm ``SwinTransformerBlock._attn`` between qkv and proj.

    qkv: (B, H, W, 3, heads, d) from the qkv linear, before any roll; rel_pos_table:
    ((2Mh-1)(2Mw-1), heads); shift_size: 0 <= shift < window; pad_qkv: (3, heads, d), a padded
    token's qkv (the linear's bias), zeros if None. Returns (B, H, W, heads*d), un-shifted.
    Roll, pad (after the roll), partition, -100 mask on the padded size, reverse, crop, roll back:
    see :func:`fastswin.reference.swin.shifted_window_attention`. The caller applies timm's rule
    "window = resolution, shift = 0 where resolution <= window" (unless always_partition).
    sdpa: as in :func:`window_attention` (reference only).
    """
    window = _window(window_size)
    shift = _shift(shift_size, window)
    _block_qkv(qkv, pad_qkv)
    _table("rel_pos_table", rel_pos_table, window, qkv.shape[4], "qkv")
    _same(dict(qkv=qkv), dict(rel_pos_table=rel_pos_table, pad_qkv=pad_qkv))
    scale, dropout_p = _scale(scale), _dropout(dropout_p)
    _finite(qkv=qkv, rel_pos_table=rel_pos_table, pad_qkv=pad_qkv)
    args = (qkv, rel_pos_table, window, shift, scale, pad_qkv)
    return _dispatch("shifted_window_attention", backend, args, dropout_p, bool(sdpa))


def shifted_window_attention_v2(qkv, logit_scale, rel_pos_table, window_size, shift_size,
                                pad_qkv: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
                                backend: str = "auto"):
    """Swin V2 (S)W-MSA at block level: timm ``SwinTransformerV2Block._attn`` between qkv and proj.

    qkv: (B, H, W, 3, heads, d); logit_scale: (heads, 1, 1) or (heads,); rel_pos_table: raw
    ``cpb_mlp`` output ((2Mh-1)(2Mw-1), heads); pad_qkv: (3, heads, d) (``cat(q_bias, 0, v_bias)``)
    or None for zeros. Returns (B, H, W, heads*d). Same block order and caller contract as
    :func:`shifted_window_attention`.
    """
    window = _window(window_size)
    shift = _shift(shift_size, window)
    _block_qkv(qkv, pad_qkv)
    _logit_scale(logit_scale, qkv.shape[4])
    _table("rel_pos_table", rel_pos_table, window, qkv.shape[4], "qkv")
    _same(dict(qkv=qkv), dict(logit_scale=logit_scale, rel_pos_table=rel_pos_table, pad_qkv=pad_qkv))
    dropout_p = _dropout(dropout_p)
    _finite(qkv=qkv, logit_scale=logit_scale, rel_pos_table=rel_pos_table, pad_qkv=pad_qkv)
    args = (qkv, logit_scale, rel_pos_table, window, shift, pad_qkv)
    return _dispatch("shifted_window_attention_v2", backend, args, dropout_p)


# The Triton backend registers itself for the four ops above (it imports triton only on first
# use, so this import is cheap and safe without triton).
from ..ops import window_attention_triton as _triton_ops  # noqa: E402,F401
from ..ops import window_attention_cuda as _cuda_ops  # noqa: E402,F401
