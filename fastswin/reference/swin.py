"""Reference Swin V1 / V2 window attention, timm 1.0.31 semantics to the bit.

Plain PyTorch, any float dtype (float64 included), any device, differentiable everywhere.
Sources: timm ``models/swin_transformer.py`` (``WindowAttention`` -- ``sdpa=False`` is its
non-fused path, ``sdpa=True`` its ``fused_attn`` one --, ``SwinTransformerBlock._attn``,
``get_attn_mask``) and ``models/swin_transformer_v2.py`` (``WindowAttention``, which has no fused
path in timm 1.0.31, ``SwinTransformerV2Block._attn``).

Notation: window ``(Mh, Mw)``, ``N = Mh*Mw`` tokens per window, ``nW`` windows per image,
``heads`` heads of ``d`` channels. Windows are ordered batch-major (index ``b*nW + w``) and
row-major inside an image; tokens row-major inside a window.

Two entries per version:

* windowed -- q, k, v already partitioned, (B*nW, heads, N, d) -> (B*nW, heads, N, d);
* block-level -- ``qkv`` of (B, H, W, 3, heads, d) straight from the qkv linear layer ->
  (B, H, W, heads*d), doing timm's roll / pad / partition / mask / reverse / crop / roll-back.

Attention dropout (``dropout_p``, keyword-only) is applied to the probabilities exactly where
timm's ``attn_drop`` is, drawing the same random numbers for the same RNG state.

Dtypes: everything in one dtype, or float16/bfloat16 activations with float32 tables, logit
scale and mask (what autocast passes): the logits are then promoted to float32 by the bias add,
as in timm, and the probabilities cast back to v's dtype before ``@ v`` (autocast's matmul does
the same cast), so the result has v's dtype either way.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from .._checks import pair

# timm's constants, written as timm writes them (the float value matters to the last bit).
MASK_VALUE = -100.0
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # = log(100); clamp(logit_scale, max=this).exp()
CPB_BIAS_SCALE = 16.0  # 16 * sigmoid(cpb_mlp(...))


# ---- helpers --------------------------------------------------------------------------------


def relative_position_index(window_size, device=None) -> torch.Tensor:
    """(N, N) long: ``index[i, j] = (hi - hj + Mh - 1) * (2*Mw - 1) + (wi - wj + Mw - 1)``
    for tokens ``i = hi*Mw + wi`` and ``j = hj*Mw + wj``; the row of the
    ((2Mh-1)(2Mw-1), heads) bias table that pair (query i, key j) reads. timm's
    ``get_relative_position_index``, non-square windows included."""
    mh, mw = pair("window_size", window_size)
    coords = torch.stack(torch.meshgrid(
        torch.arange(mh, device=device), torch.arange(mw, device=device), indexing="ij"
    )).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N: query minus key
    return (rel[0] + mh - 1) * (2 * mw - 1) + (rel[1] + mw - 1)


def padded_size(H: int, W: int, window_size) -> Tuple[int, int]:
    """(H, W) rounded up to a multiple of the window, the size timm partitions."""
    mh, mw = pair("window_size", window_size)
    return -(-H // mh) * mh, -(-W // mw) * mw


def _region_ids(size: int, window: int, shift: int, device) -> torch.Tensor:
    # timm labels the padded axis with the slices [0, -M), [-M, -s), [-s, None). With s == 0
    # the last slice is [0, None) (-0 == 0): the whole axis is one region.
    i = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(i)
    return (i >= size - window).long() + (i >= size - shift).long()


def shift_attn_mask(H: int, W: int, window_size, shift_size, device=None, dtype=torch.float32) -> torch.Tensor:
    """(nW, N, N) additive mask of the shifted windows: 0 between tokens of one region,
    -100 between tokens of different regions -- timm's ``get_attn_mask``.

    ``H, W`` is the feature-map size; like timm, the mask is built on the size rounded up to a
    multiple of the window (the padded size), and the regions are cut from the *padded* map's
    end: rows ``[0, Hp-Mh)``, ``[Hp-Mh, Hp-sh)``, ``[Hp-sh, Hp)`` (same for columns), region
    id ``3*row_region + col_region``. timm returns ``None`` when both shifts are 0; this returns
    an all-zero mask then (adding it changes nothing).
    """
    mh, mw = pair("window_size", window_size)
    sh, sw = pair("shift_size", shift_size)
    hp, wp = padded_size(H, W, (mh, mw))
    ids = 3 * _region_ids(hp, mh, sh, device)[:, None] + _region_ids(wp, mw, sw, device)[None, :]
    ids = window_partition(ids[None, :, :, None], (mh, mw)).reshape(-1, mh * mw)  # nW, N
    diff = ids[:, None, :] != ids[:, :, None]
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(diff, torch.full((), MASK_VALUE, device=device, dtype=dtype), zero)


def window_partition(x: torch.Tensor, window_size) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, Mh, Mw, C), H and W multiples of the window."""
    mh, mw = pair("window_size", window_size)
    B, H, W, C = x.shape
    x = x.view(B, H // mh, mh, W // mw, mw, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, mh, mw, C)


def window_reverse(windows: torch.Tensor, window_size, H: int, W: int) -> torch.Tensor:
    """(B*nW, Mh, Mw, C) -> (B, H, W, C), the inverse of :func:`window_partition`."""
    mh, mw = pair("window_size", window_size)
    C = windows.shape[-1]
    x = windows.view(-1, H // mh, W // mw, mh, mw, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def _gather_bias(rel_pos_table: torch.Tensor, window_size) -> torch.Tensor:
    """((2Mh-1)(2Mw-1), heads) table -> (heads, N, N) bias, timm's gather/permute."""
    mh, mw = pair("window_size", window_size)
    n = mh * mw
    idx = relative_position_index((mh, mw), device=rel_pos_table.device)
    return rel_pos_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def _add_mask_softmax_dropout_matmul(attn, mask, v, dropout_p):
    # timm: view as (B, nW, heads, N, N) so that window b*nW + w gets mask[w]
    if mask is not None:
        heads, n = attn.shape[1], attn.shape[-1]
        attn = attn.view(-1, mask.shape[0], heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    # float32 table/mask with float16/bfloat16 q, k, v (autocast keeps parameters in float32)
    # promote the logits to float32; cast the probabilities back as autocast's matmul would.
    return attn.to(v.dtype) @ v


# ---- Swin V1 ----------------------------------------------------------------------------------


def window_attention(q, k, v, rel_pos_table, window_size, mask=None, scale=None, *, dropout_p: float = 0.0,
                     sdpa: bool = False):
    """Swin V1 W-MSA on partitioned windows (timm ``WindowAttention``).

    q, k, v: (B*nW, heads, N, d); rel_pos_table: ((2Mh-1)(2Mw-1), heads), timm's
    ``relative_position_bias_table``; mask: (nW, N, N) additive or None; scale: d**-0.5 if None.
    Returns (B*nW, heads, N, d)::

        out = softmax((q*scale) @ k^T + table[rel_index].permute(2, 0, 1) + mask[w]) @ v

    ``sdpa=False`` (default): timm's non-fused path, in that order of operations (scale applied
    to q, not to the logits). ``sdpa=True``: timm's fused path (``fused_attn``), to the bit:
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask broadcast to (B*nW, heads,
    N, N), dropout_p=dropout_p)`` (``scale=None`` leaves SDPA its own default, as timm does).
    """
    if sdpa:
        return _window_attention_sdpa(q, k, v, rel_pos_table, window_size, mask, scale, dropout_p)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + _gather_bias(rel_pos_table, window_size).unsqueeze(0)
    return _add_mask_softmax_dropout_matmul(attn, mask, v, dropout_p)


def _window_attention_sdpa(q, k, v, rel_pos_table, window_size, mask, scale, dropout_p):
    # timm WindowAttention.forward, ``if self.fused_attn:`` branch
    attn_mask = _gather_bias(rel_pos_table, window_size).unsqueeze(0)  # 1, heads, N, N
    if mask is not None:
        batch_windows, heads, n = q.shape[0], q.shape[1], q.shape[2]
        num_win = mask.shape[0]
        mask = mask.view(1, num_win, 1, n, n).expand(batch_windows // num_win, -1, heads, -1, -1)
        attn_mask = attn_mask + mask.reshape(-1, heads, n, n)
    # float32 table/mask with float16/bfloat16 q outside autocast: SDPA wants one dtype (under
    # autocast SDPA casts them itself, as in timm, so leave them alone there).
    if attn_mask.dtype != q.dtype and not torch.is_autocast_enabled(q.device.type):
        attn_mask = attn_mask.to(q.dtype)
    extra = {} if scale is None else {"scale": scale}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **extra)


def _block(qkv, window_size, shift_size, pad_qkv, attend: Callable) -> torch.Tensor:
    """timm's ``_attn`` between the qkv linear and proj, shared by V1 and V2:
    roll by -shift, pad (bottom/right) to a multiple of the window, partition, attend
    (with the -100 mask on the padded size when shifted), reverse, crop, roll back."""
    mh, mw = pair("window_size", window_size)
    sh, sw = pair("shift_size", shift_size)
    B, H, W, three, heads, d = qkv.shape
    x = qkv.reshape(B, H, W, three * heads * d)
    has_shift = sh != 0 or sw != 0
    if has_shift:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    # timm pads *after* rolling, so the padding sits at the bottom/right of the rolled map and
    # takes part in attention (it is not masked out). It pads the linear's input with zeros,
    # so a padded token's qkv is the linear's bias: pad_qkv.
    hp, wp = padded_size(H, W, (mh, mw))
    if hp != H or wp != W:
        if pad_qkv is None:
            x = F.pad(x, (0, 0, 0, wp - W, 0, hp - H))
        else:
            fill = pad_qkv.reshape(1, 1, 1, -1).to(x.dtype)
            x = torch.cat([x, fill.expand(B, H, wp - W, -1)], dim=2)
            x = torch.cat([x, fill.expand(B, hp - H, wp, -1)], dim=1)
    n = mh * mw
    win = window_partition(x, (mh, mw)).view(-1, n, three, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = win.unbind(0)
    mask = shift_attn_mask(hp, wp, (mh, mw), (sh, sw), device=qkv.device, dtype=qkv.dtype) if has_shift else None
    out = attend(q, k, v, mask)  # B*nW, heads, N, d
    out = out.transpose(1, 2).reshape(-1, mh, mw, heads * d)
    out = window_reverse(out, (mh, mw), hp, wp)[:, :H, :W, :].contiguous()
    if has_shift:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out


def shifted_window_attention(qkv, rel_pos_table, window_size, shift_size, scale=None, pad_qkv=None, *,
                             dropout_p: float = 0.0, sdpa: bool = False):
    """Swin V1 (S)W-MSA at block level: timm ``SwinTransformerBlock._attn`` between ``qkv`` and ``proj``.

    qkv: (B, H, W, 3, heads, d), the qkv linear applied to the block's (B, H, W, C) input,
    *before* any roll; rel_pos_table: ((2Mh-1)(2Mw-1), heads); pad_qkv: (3, heads, d), the qkv
    of a padded token (the linear's bias; zeros if None). Returns (B, H, W, heads*d), un-shifted.

    Order, as timm: roll by (-sh, -sw); pad bottom/right to (Hp, Wp) = multiples of the window
    (pad *after* roll: padded tokens are never rolled); partition; :func:`window_attention` with
    ``shift_attn_mask(Hp, Wp)`` if any shift is non-zero; reverse; crop to (H, W); roll by (sh, sw).

    ``window_size``/``shift_size`` are used as given: timm's block replaces them by
    (window = resolution, shift = 0) in each dimension where the resolution is <= the window,
    unless ``always_partition=True``. That is the caller's decision (pass the block's
    ``window_size`` and ``shift_size``); a window larger than the map is padded, as timm does with
    ``always_partition=True``. Requires 0 <= shift < window. ``sdpa``: as in :func:`window_attention`
    (timm's fused path per window; ``scale=None`` then means SDPA's default).
    """
    if scale is None and not sdpa:
        scale = qkv.shape[-1] ** -0.5

    def attend(q, k, v, mask):
        return window_attention(q, k, v, rel_pos_table, window_size, mask, scale, dropout_p=dropout_p, sdpa=sdpa)

    return _block(qkv, window_size, shift_size, pad_qkv, attend)


# ---- Swin V2 ----------------------------------------------------------------------------------


def cpb_coords_table(window_size, pretrained_window_size=0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2Mh-1, 2Mw-1, 2): the input of V2's ``cpb_mlp``, timm's ``relative_coords_table``.

    For offsets ``(dh, dw)`` in ``[-(M-1), M-1]``, each coordinate is divided by
    ``max(P-1, 1)`` with ``P`` the pretrained window if ``pretrained_window_size[0] > 0``, else the
    window; multiplied by 8; then ``sign(x) * log2(|x| + 1) / log2(8)``. Computed in float32
    as timm does, then cast to ``dtype`` (so a float64 module holds float32-rounded values, like timm's).
    """
    mh, mw = pair("window_size", window_size)
    ph, pw = pair("pretrained_window_size", pretrained_window_size)
    h = torch.arange(-(mh - 1), mh, device=device, dtype=torch.float32)
    w = torch.arange(-(mw - 1), mw, device=device, dtype=torch.float32)
    t = torch.stack(torch.meshgrid(h, w, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    # timm checks only the first pretrained size to choose the normalisation; max(.., 1): a
    # window of 1 has the single offset 0 (avoid 0 / 0).
    dh, dw = (max(ph - 1, 1), max(pw - 1, 1)) if ph > 0 else (max(mh - 1, 1), max(mw - 1, 1))
    t[:, :, :, 0] /= dh
    t[:, :, :, 1] /= dw
    t *= 8
    t = torch.sign(t) * torch.log2(torch.abs(t) + 1.0) / math.log2(8)
    return t.to(dtype=dtype)


def window_attention_v2(q, k, v, logit_scale, rel_pos_table, window_size, mask=None, *, dropout_p: float = 0.0):
    """Swin V2 scaled cosine attention on partitioned windows (timm V2 ``WindowAttention``).

    q, k, v: (B*nW, heads, N, d); logit_scale: (heads, 1, 1) as timm stores it (or (heads,));
    rel_pos_table: ((2Mh-1)(2Mw-1), heads), the *raw* ``cpb_mlp`` output (before 16*sigmoid);
    mask: (nW, N, N) or None. Returns (B*nW, heads, N, d)::

        attn = normalize(q) @ normalize(k)^T          # F.normalize: x / max(||x||, 1e-12)
        attn = attn * exp(clamp(logit_scale, max=log(1/0.01)))   # in the tensors' dtype
        attn = attn + 16 * sigmoid(table[rel_index].permute(2, 0, 1))
        out  = softmax(attn + mask[w]) @ v
    """
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    scale = torch.clamp(logit_scale.reshape(-1, 1, 1), max=LOGIT_SCALE_MAX).exp()
    attn = attn * scale
    # timm gathers first and applies 16*sigmoid to the gathered (heads, N, N) bias; elementwise,
    # so the order does not change a bit, but we keep it.
    bias = CPB_BIAS_SCALE * torch.sigmoid(_gather_bias(rel_pos_table, window_size))
    attn = attn + bias.unsqueeze(0)
    return _add_mask_softmax_dropout_matmul(attn, mask, v, dropout_p)


def shifted_window_attention_v2(qkv, logit_scale, rel_pos_table, window_size, shift_size, pad_qkv=None, *,
                                dropout_p: float = 0.0):
    """Swin V2 (S)W-MSA at block level: timm ``SwinTransformerV2Block._attn`` between ``qkv`` and ``proj``.

    qkv: (B, H, W, 3, heads, d) from the qkv linear (bias ``cat(q_bias, 0, v_bias)``) applied
    to the tensor the block passes to ``_attn`` (V2 is post-norm: the block's raw input);
    pad_qkv: (3, heads, d), a padded token's qkv (that bias; zeros if None). Returns
    (B, H, W, heads*d). Same roll -> pad -> partition -> mask -> reverse -> crop -> roll order as
    V1 (timm's V2 block does it identically), with :func:`window_attention_v2` per window; same
    caller contract for window/shift when the resolution is <= the window.
    """
    def attend(q, k, v, mask):
        return window_attention_v2(q, k, v, logit_scale, rel_pos_table, window_size, mask, dropout_p=dropout_p)

    return _block(qkv, window_size, shift_size, pad_qkv, attend)
