"""Reference DAT / DAT++ deformable attention, plain PyTorch.

Follows ``DAttentionBaseline`` of LeapLabTHU/DAT ``models/dat_blocks.py`` in two variants:

``"dat"``
    commit 42b489e (CVPR 2022).
``"dat++"``
    commit 2f31405 (DAT++).

Positions are in DAT's ``(y, x)`` order, normalized so that ``-1``/``+1`` address the centres of
the first/last pixel (``grid_sample(..., align_corners=True)``).

Pieces (each one reproduces the original's operations in the original's order, so float64 and
float32 results agree to the bit with the original code):

* :func:`reference_points` -- the key grid ``reference`` (Hk, Wk, 2):

  - ``dat``:   ``(i + 0.5) / Hk * 2 - 1``        (centres of an Hk x Wk tiling of [-1, 1])
  - ``dat++``: ``(i + 0.5) / (Hk - 1) * 2 - 1``  (reaches past +1 at the last row/column)

* :func:`query_grid` -- where the queries sit when the bias is looked up (H, W, 2):

  - ``dat``:   the reference-point formula above with (H, W)
  - ``dat++``: ``i / (H - 1) * 2 - 1``           (the pixel centres, align_corners style)

* :func:`offset_to_pos` -- the conv offset (B*g, 2, Hk, Wk) to sample positions (B*g, Hk, Wk, 2).
* :func:`log_cpb_coords` -- DAT++'s log-spaced displacement, the input of its ``log_cpb`` MLP.
* :func:`deformable_attention` -- the attention core after the offset network and the k/v
  projections; the part a fused kernel replaces.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

VARIANTS = ("dat", "dat++")


def check_variant(variant) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return variant


def _normalized_grid(ys: torch.Tensor, xs: torch.Tensor, div_h, div_w) -> torch.Tensor:
    """(len(ys), len(xs), 2) grid of ``(y / div_h * 2 - 1, x / div_w * 2 - 1)``.

    In-place div/mul/sub on the stacked grid, in that order, with the same Python scalars as the
    original: a different but algebraically equal expression (e.g. one multiply by ``2 / div``)
    rounds differently in float32.
    """
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((gy, gx), -1)
    grid[..., 1].div_(div_w).mul_(2.0).sub_(1.0)
    grid[..., 0].div_(div_h).mul_(2.0).sub_(1.0)
    return grid


@torch.no_grad()
def reference_points(hk: int, wk: int, *, variant: str, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Reference point of each key/value sample, (Hk, Wk, 2) in (y, x) order.

    ``dat``: ``(i + 0.5) / Hk * 2 - 1``; ``dat++``: ``(i + 0.5) / (Hk - 1) * 2 - 1`` (same for x
    with Wk). Built from ``linspace(0.5, Hk - 0.5, Hk)`` in ``dtype``, as the original. DAT++ divides
    by zero when Hk or Wk is 1 (the original does too: inf/nan).
    """
    check_variant(variant)
    ys = torch.linspace(0.5, hk - 0.5, hk, dtype=dtype, device=device)
    xs = torch.linspace(0.5, wk - 0.5, wk, dtype=dtype, device=device)
    if variant == "dat":
        return _normalized_grid(ys, xs, hk, wk)
    return _normalized_grid(ys, xs, hk - 1.0, wk - 1.0)


@torch.no_grad()
def query_grid(h: int, w: int, *, variant: str, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Position of each query for the relative-position-bias lookup, (H, W, 2) in (y, x) order.

    ``dat`` reuses :func:`reference_points` (``(i + 0.5) / H * 2 - 1``); ``dat++`` uses the pixel
    centres ``i / (H - 1) * 2 - 1`` (``arange`` in ``dtype``; nan for H == 1, as the original).
    """
    check_variant(variant)
    if variant == "dat":
        return reference_points(h, w, variant="dat", dtype=dtype, device=device)
    ys = torch.arange(0, h, dtype=dtype, device=device)
    xs = torch.arange(0, w, dtype=dtype, device=device)
    return _normalized_grid(ys, xs, h - 1.0, w - 1.0)


def offset_to_pos(
    offset: torch.Tensor, *, variant: str, offset_range_factor: float, no_off: bool, dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample positions from the offset network's output.

    ``offset``: (B*g, 2, Hk, Wk), channel 0 = dy, 1 = dx. ``dtype``: the dtype of the reference
    points (the original uses its input's dtype; default ``offset.dtype``).
    Returns ``(pos, reference)``, both (B*g, Hk, Wk, 2) in (y, x) order (``reference`` is an
    expanded view of one (Hk, Wk, 2) grid).

    ``dat``::

        if f > 0:  offset = tanh(offset) * [1/Hk, 1/Wk] * f
        pos = offset + reference               if f >= 0
        pos = tanh(offset + reference)         if f < 0
        (no_off: the original calls ``Tensor.fill``, which does not exist -- it always fails)

    ``dat++``::

        if f >= 0 and not no_off:  offset = tanh(offset) * [1/(Hk-1), 1/(Wk-1)] * f
        if no_off:  offset = 0
        pos = offset + reference               if f >= 0
        pos = clamp(offset + reference, -1, 1) if f < 0

    The range ``[1/Hk, 1/Wk]`` is a tensor of torch's *default* dtype, as in the original: its
    values are rounded to float32 even for a float64 offset, and a float16/bfloat16 offset is
    promoted to float32 by the multiply.
    """
    check_variant(variant)
    if offset.dim() != 4 or offset.shape[1] != 2:
        raise ValueError(f"offset: expected shape (B*g, 2, Hk, Wk), got {tuple(offset.shape)}")
    if variant == "dat" and no_off:
        raise NotImplementedError(
            "no_off: variant 'dat' (LeapLabTHU/DAT 42b489e) cannot run with no_off=True: its forward "
            "calls offset.fill(0.0), and torch.Tensor has no method 'fill' (AttributeError). "
            "Use variant='dat++', whose no_off path works."
        )
    dtype = offset.dtype if dtype is None else dtype
    bg, _, hk, wk = offset.shape
    f = offset_range_factor
    scale_it = f > 0 if variant == "dat" else (f >= 0 and not no_off)
    if scale_it:
        if variant == "dat":
            rng = [1.0 / hk, 1.0 / wk]
        else:
            if hk == 1 or wk == 1:  # the original's Python float division raises here too
                raise ZeroDivisionError(
                    f"offset: variant 'dat++' scales offsets by 1 / (Hk - 1) and 1 / (Wk - 1), and the offset "
                    f"network gave a ({hk}, {wk}) key grid; use offset_range_factor < 0 or a larger map"
                )
            rng = [1.0 / (hk - 1.0), 1.0 / (wk - 1.0)]
        offset_range = torch.tensor(rng, device=offset.device).reshape(1, 2, 1, 1)
        offset = offset.tanh().mul(offset_range).mul(f)
    offset = offset.permute(0, 2, 3, 1)
    reference = reference_points(hk, wk, variant=variant, dtype=dtype, device=offset.device)
    reference = reference[None].expand(bg, -1, -1, -1)
    if no_off:  # dat++ only (dat raised above)
        # A filled copy, not the caller's tensor; the zero gradient still flows back through the
        # offset network exactly as after the original's in-place fill_.
        offset = offset.clone().fill_(0.0)
    if f >= 0:
        pos = offset + reference
    elif variant == "dat":
        pos = (offset + reference).tanh()
    else:
        pos = (offset + reference).clamp(-1.0, +1.0)
    return pos, reference


def log_cpb_coords(
    pos: torch.Tensor, *, query_size: Sequence[int], n_groups: int, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """DAT++ ``log_cpb`` input: (B*g, H*W, Ns, 2) log-spaced query-to-sample displacements.

    ``d = (query_grid_dat++ - pos) * 4``  (in [-8, 8]),  ``sign(d) * log2(|d| + 1) / log2(8)``.
    The module feeds this through its MLP (``rpe_table``: Linear(2, 32), ReLU, Linear(32, heads/g)).
    ``pos``: (B*g, Hk, Wk, 2); ``dtype`` of the query grid (default ``pos.dtype``).
    """
    h, w = query_size
    bg = pos.shape[0]
    ns = pos.shape[1] * pos.shape[2]
    dtype = pos.dtype if dtype is None else dtype
    qg = query_grid(h, w, variant="dat++", dtype=dtype, device=pos.device)
    qg = qg[None].expand(bg, -1, -1, -1)
    d = (qg.reshape(bg, h * w, 2).unsqueeze(2) - pos.reshape(bg, ns, 2).unsqueeze(1)).mul(4.0)
    # log2(8.0) == 3.0 exactly; divide (not multiply by 1/3) as the original does.
    return torch.sign(d) * torch.log2(torch.abs(d) + 1.0) / 3.0


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
) -> torch.Tensor:
    """DAT's attention over sampled keys/values, with the bilinearly sampled position bias.

    Shapes (B batch, h = ``n_heads``, g = ``n_groups``, h_g = h / g, c head channels,
    (H, W) = ``query_size``, Ns = Hk * Wk samples):

    * ``q``: (B*h, c, H*W); ``k``, ``v``: (B*h, c, Ns) -- row ``b*h + i`` is head ``i`` of batch ``b``;
      head ``i`` belongs to group ``i // h_g``.
    * ``pos``: (B*g, Hk, Wk, 2), (y, x) sample positions of group ``b*g + j``.
    * ``rpe_table``: (h, Th, Tw) or None. ``attn_bias``: (B*h, H*W, Ns) or None (added as is:
      DAT++'s ``fixed_pe`` and ``log_cpb`` biases).
    * returns (B*h, c, H*W).

    Formula (``scale`` defaults to ``c ** -0.5``)::

        logits[b, m, n] = (sum_c q[b, c, m] * k[b, c, n]) * scale
                          + bilinear(rpe_table[head(b)], (qgrid[m] - pos[group(b), n]) * 0.5)
                          + attn_bias[b, m, n]
        attn = dropout(softmax(logits, over n), dropout_p)
        out[b, c, m] = sum_n attn[b, m, n] * v[b, c, n]

    ``qgrid`` is :func:`query_grid` of ``variant`` for (H, W), built in ``grid_dtype`` (default
    ``pos.dtype``; the original builds it in its input's dtype). ``bilinear`` samples the (Th, Tw)
    table at a (y, x) point with ``grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=True)``: the displacement spans [-1, 1] over the table, so with Th = 2H - 1 one
    table cell is one query pixel (DAT), taps outside the table read zero.

    The operations (einsum strings, multiply by ``scale`` after the product, bias added after the
    scale) are those of the original, so results match it to the bit, autocast included.
    Dropout runs in place on a copy of the softmax output: the same kernel and RNG draw as the
    original's in-place ``nn.Dropout(inplace=True)`` (an out-of-place dropout takes another RNG path
    on CUDA), without the original's flaw -- dropping in place on the softmax output itself breaks
    its backward whenever ``attn_drop > 0`` in training.
    """
    check_variant(variant)
    h, w = query_size
    bh, c, hw = q.shape
    batch = bh // n_heads
    ns = k.shape[2]
    if scale is None:
        scale = c ** -0.5

    attn = torch.einsum("b c m, b c n -> b m n", q, k)
    attn = attn.mul(scale)

    if rpe_table is not None:
        hg = n_heads // n_groups
        bg = batch * n_groups
        dtype = pos.dtype if grid_dtype is None else grid_dtype
        qg = query_grid(h, w, variant=variant, dtype=dtype, device=q.device)
        qg = qg[None].expand(bg, -1, -1, -1)
        disp = (qg.reshape(bg, h * w, 2).unsqueeze(2) - pos.reshape(bg, ns, 2).unsqueeze(1)).mul(0.5)
        table = rpe_table[None].expand(batch, -1, -1, -1)
        table = table.reshape(bg, hg, rpe_table.shape[1], rpe_table.shape[2])
        bias = F.grid_sample(table, disp[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True)
        attn = attn + bias.reshape(bh, h * w, ns)

    if attn_bias is not None:
        attn = attn + attn_bias

    attn = F.softmax(attn, dim=2)
    if dropout_p > 0.0:
        attn = F.dropout(attn.clone(), dropout_p, training=True, inplace=True)
    return torch.einsum("b m n, b c n -> b c m", attn, v)
