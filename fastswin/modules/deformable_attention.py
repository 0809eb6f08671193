"""``DeformableAttention``: drop-in for ``DAttentionBaseline`` of LeapLabTHU/DAT, both variants.

* ``variant="dat"``: ``models/dat_blocks.py`` at commit 42b489e (CVPR 2022).
* ``variant="dat++"``: the same file at commit 2f31405 (DAT++).

Same constructor arguments (names, order, no defaults), same parameter names and shapes (official
checkpoints load with ``strict=True``), same initialization (same RNG draws in the same order),
same forward math and outputs ``(y, pos, reference)``. The attention core runs through
:func:`fastswin.functional.deformable_attention` and the feature sampling through
:func:`fastswin.functional.bilinear_sample`, both with the module's ``backend``.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from .._checks import autocast_on, check_finite, check_tensor
from ..functional.bilinear_sample import bilinear_sample
from ..functional.deformable_attention import deformable_attention
from ..reference import dat as _ref
from ._common import ChannelsLayerNorm, timm_trunc_normal_

# The tail of the constructor, after ``fixed_pe``, differs between the variants.
_TAIL = {"dat": ("stage_idx",), "dat++": ("ksize", "log_cpb")}
_COMMIT = {"dat": "42b489e", "dat++": "2f31405"}
_N_COMMON = 13  # q_size ... fixed_pe
_DAT_KSIZES = (9, 7, 5, 3)  # the "dat" variant picks its offset kernel by stage index


def _two(name, v):
    """``q_h, q_w = q_size`` as the original unpacks it, with a clear error."""
    try:
        a, b = v
        return operator.index(a), operator.index(b)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a pair of ints (H, W), got {v!r}") from None


def _positive_int(name, v):
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if i < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return i


def _resolve_variant(args, kw, variant):
    """Map the variant-specific tail (positional ``args`` and keyword ``kw``) to its names."""
    if variant is None:
        named = {v for v in _TAIL for n in kw if n in _TAIL[v]}
        if len(named) > 1:
            raise TypeError("stage_idx belongs to variant 'dat', ksize and log_cpb to 'dat++': pass one set")
        if named:
            variant = named.pop()
        elif len(args) in (1, 2):
            variant = "dat" if len(args) == 1 else "dat++"
        else:
            raise TypeError(
                "variant: cannot tell the variant; pass variant='dat' with stage_idx, "
                "or variant='dat++' with ksize and log_cpb"
            )
    else:
        _ref.check_variant(variant)
    names = _TAIL[variant]
    for n in kw:
        if n not in names:
            raise TypeError(
                f"{n}: not an argument of variant {variant!r} (LeapLabTHU/DAT {_COMMIT[variant]}), "
                f"which takes {', '.join(names)} after fixed_pe"
            )
    if len(args) > len(names):
        raise TypeError(
            f"variant {variant!r} takes {_N_COMMON + len(names)} positional arguments "
            f"(... fixed_pe, {', '.join(names)}), got {_N_COMMON + len(args)}"
        )
    values = dict(zip(names, args))
    for n, val in kw.items():
        if n in values:
            raise TypeError(f"{n}: given both by position and by keyword")
        values[n] = val
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"{missing[0]}: missing; variant {variant!r} requires {', '.join(names)}")
    return variant, values


class DeformableAttention(nn.Module):
    """Deformable multi-head attention of DAT / DAT++, ``DAttentionBaseline``'s drop-in.

    Arguments, in the original's order (none has a default, as in the original)::

        q_size, kv_size, n_heads, n_head_channels, n_groups, attn_drop, proj_drop, stride,
        offset_range_factor, use_pe, dwc_pe, no_off, fixed_pe,
        stage_idx                 # variant "dat"   (42b489e): offset kernel 9/7/5/3 for stage 0..3
        ksize, log_cpb            # variant "dat++" (2f31405): offset kernel size, log-CPB bias MLP

    plus keyword-only ``variant`` (``"dat"`` | ``"dat++"``; ``None``: told by the tail given --
    ``stage_idx`` or one positional tail argument means "dat", ``ksize``/``log_cpb`` or two mean
    "dat++") and ``backend`` (``"auto"`` | ``"reference"`` | ``"triton"`` | ``"cuda"``, for both the
    sampling and the attention core). An argument of the other variant raises ``TypeError``.
    ``kv_size`` sizes the bias table of "dat"; "dat++" ignores it (its table follows ``q_size``).

    ``forward(x)``: ``x`` (B, C, H, W) with C = ``n_heads * n_head_channels``. Returns
    ``(y, pos, reference)``: ``y`` (B, C, H, W); ``pos`` and ``reference`` (B, n_groups, Hk, Wk, 2),
    the (y, x) sample positions and reference points in [-1, 1] coordinates. Math::

        q = proj_q(x);  offset = conv_offset(q per group)          # (B*g, 2, Hk, Wk)
        pos, reference = offset_to_pos(offset)                     # variant-specific range/clamp
        xs = bilinear_sample(x per group, pos);  k, v = proj_k(xs), proj_v(xs)
        out = softmax(q^T k * n_head_channels^-0.5 + bias) v  (+ dwc_pe's conv(q))
        y = proj_drop(proj_out(out))

    with ``bias`` per the ``use_pe`` options (rpe table sampled at (query - sample) * 0.5;
    ``fixed_pe`` table; DAT++ ``log_cpb`` MLP). See :mod:`fastswin.reference.dat`.

    Configurations where the original's forward always fails fail here too, with a clear
    ``NotImplementedError``: "dat" with ``no_off=True`` (calls a nonexistent ``Tensor.fill``),
    "dat" with ``use_pe`` and ``fixed_pe`` but not ``dwc_pe`` (reads an unset ``self.n_sample``),
    "dat++" with ``use_pe``, ``dwc_pe`` and ``no_off`` (adds an unset ``residual_lepe``).
    """

    def __init__(
        self, q_size, kv_size, n_heads, n_head_channels, n_groups,
        attn_drop, proj_drop, stride,
        offset_range_factor, use_pe, dwc_pe,
        no_off, fixed_pe, *tail,
        stage_idx=None, ksize=None, log_cpb=None,
        variant: Optional[str] = None, backend: str = "auto",
    ):
        super().__init__()
        kw = {n: val for n, val in (("stage_idx", stage_idx), ("ksize", ksize), ("log_cpb", log_cpb)) if val is not None}
        variant, tail_values = _resolve_variant(tail, kw, variant)
        self.variant = variant
        self.backend = backends.check_backend_name(backend)

        n_heads = _positive_int("n_heads", n_heads)
        n_head_channels = _positive_int("n_head_channels", n_head_channels)
        n_groups = _positive_int("n_groups", n_groups)
        stride = _positive_int("stride", stride)
        if n_heads % n_groups:
            raise ValueError(f"n_heads: expected a multiple of n_groups={n_groups}, got {n_heads}")

        self.dwc_pe = dwc_pe
        self.n_head_channels = n_head_channels
        self.scale = self.n_head_channels ** -0.5
        self.n_heads = n_heads
        self.q_h, self.q_w = _two("q_size", q_size)
        if variant == "dat":
            self.kv_h, self.kv_w = _two("kv_size", kv_size)
        else:
            self.kv_h, self.kv_w = self.q_h // stride, self.q_w // stride
        self.nc = n_head_channels * n_heads
        self.n_groups = n_groups
        self.n_group_channels = self.nc // self.n_groups
        self.n_group_heads = self.n_heads // self.n_groups
        self.use_pe = use_pe
        self.fixed_pe = fixed_pe
        self.no_off = no_off
        self.offset_range_factor = offset_range_factor
        self.stride = stride
        if variant == "dat":
            self.stage_idx = tail_values["stage_idx"]
            try:
                kk = _DAT_KSIZES[operator.index(self.stage_idx)]
            except (TypeError, IndexError):
                raise ValueError(f"stage_idx: expected a stage index 0..3, got {self.stage_idx!r}") from None
            pad = kk // 2
        else:
            self.ksize = _positive_int("ksize", tail_values["ksize"])
            self.log_cpb = tail_values["log_cpb"]
            kk = self.ksize
            pad = kk // 2 if kk != stride else 0

        # Modules in the original's order: the same seed draws the same weights.
        cg = self.n_group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(cg, cg, kk, stride, pad, groups=cg),
            ChannelsLayerNorm(cg),
            nn.GELU(),
            nn.Conv2d(cg, 2, 1, 1, 0, bias=False),
        )
        if variant == "dat++" and no_off:
            for p in self.conv_offset.parameters():
                p.requires_grad_(False)
        self.proj_q = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
        self.proj_k = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
        self.proj_v = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True)
        self.attn_drop = nn.Dropout(attn_drop, inplace=True)

        if self._pe_active():
            if dwc_pe:
                self.rpe_table = nn.Conv2d(self.nc, self.nc, kernel_size=3, stride=1, padding=1, groups=self.nc)
            elif fixed_pe:
                self.rpe_table = nn.Parameter(torch.zeros(n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w))
                timm_trunc_normal_(self.rpe_table, std=0.01)
            elif variant == "dat++" and self.log_cpb:
                # Swin-V2-style continuous bias: displacement (2) -> 32 -> one bias per head of the group.
                self.rpe_table = nn.Sequential(
                    nn.Linear(2, 32, bias=True),
                    nn.ReLU(inplace=True),
                    nn.Linear(32, self.n_group_heads, bias=False),
                )
            else:
                th, tw = (self.kv_h, self.kv_w) if variant == "dat" else (self.q_h, self.q_w)
                self.rpe_table = nn.Parameter(torch.zeros(n_heads, th * 2 - 1, tw * 2 - 1))
                timm_trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.rpe_table = None

    # ---- helpers ---------------------------------------------------------------------------

    def _pe_active(self) -> bool:
        """Whether a position encoding is built and applied ("dat++" drops it under no_off)."""
        return bool(self.use_pe) and (self.variant == "dat" or not self.no_off)

    def _get_ref_points(self, H_key, W_key, B, dtype, device):
        """The original's reference points, (B*g, H_key, W_key, 2)."""
        ref = _ref.reference_points(H_key, W_key, variant=self.variant, dtype=dtype, device=device)
        return ref[None].expand(B * self.n_groups, -1, -1, -1)

    def _get_q_grid(self, H, W, B, dtype, device):
        """The query grid of the bias lookup, (B*g, H, W, 2) ("dat" uses its reference points)."""
        grid = _ref.query_grid(H, W, variant=self.variant, dtype=dtype, device=device)
        return grid[None].expand(B * self.n_groups, -1, -1, -1)

    def _check_runnable(self):
        v = self.variant
        if v == "dat" and self.no_off:
            raise NotImplementedError(
                "no_off: variant 'dat' (LeapLabTHU/DAT 42b489e) cannot run with no_off=True: the original "
                "calls offset.fill(0.0), and torch.Tensor has no method 'fill'. Use variant='dat++'."
            )
        if v == "dat" and self.use_pe and not self.dwc_pe and self.fixed_pe:
            raise NotImplementedError(
                "fixed_pe: variant 'dat' (LeapLabTHU/DAT 42b489e) cannot run with use_pe=True, fixed_pe=True: "
                "the original reads self.n_sample, which it never sets. Use variant='dat++'."
            )
        if v == "dat++" and self.use_pe and self.dwc_pe and self.no_off:
            raise NotImplementedError(
                "dwc_pe: variant 'dat++' (LeapLabTHU/DAT 2f31405) cannot run with use_pe=True, dwc_pe=True, "
                "no_off=True: the original adds residual_lepe, which it computes only without no_off."
            )

    def _check_input(self, x):
        check_tensor("x", x, ndim=4, layout="(B, C, H, W)")
        if x.shape[1] != self.nc:
            raise ValueError(
                f"x: expected C = n_heads * n_head_channels = {self.nc} channels in dimension 1, "
                f"got shape {tuple(x.shape)}"
            )
        w = self.proj_q.weight
        if x.device != w.device:
            raise ValueError(f"x: expected device {w.device} (the device of the module's parameters), got {x.device}")
        if x.dtype != w.dtype and not autocast_on(x.device.type):
            raise TypeError(
                f"x: expected dtype {str(w.dtype).replace('torch.', '')} (the dtype of the module's parameters), "
                f"got {str(x.dtype).replace('torch.', '')}"
            )
        check_finite("x", x)

    def _sample(self, feat, pos):
        if feat.dtype != pos.dtype:
            if not autocast_on(feat.device.type):
                raise TypeError(
                    f"x: {str(feat.dtype).replace('torch.', '')} input gives {str(pos.dtype).replace('torch.', '')} "
                    "sample positions (the original's offset range is a default-dtype tensor) and the original's "
                    "grid_sample then fails on the mixed dtypes; run under torch.autocast or in float32/float64"
                )
            # What autocast does for grid_sample: both inputs to the wider dtype.
            wide = torch.promote_types(feat.dtype, pos.dtype)
            feat, pos = feat.to(wide), pos.to(wide)
        return bilinear_sample(feat, pos, backend=self.backend)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor):
        self._check_runnable()
        self._check_input(x)
        B, C, H, W = x.shape
        dtype, device = x.dtype, x.device
        g, cg, nh, hc = self.n_groups, self.n_group_channels, self.n_heads, self.n_head_channels
        dat_pp = self.variant == "dat++"

        q = self.proj_q(x)
        offset = self.conv_offset(q.reshape(B * g, cg, H, W))  # (B*g, 2, Hk, Wk)
        if dat_pp:
            offset = offset.contiguous()
        Hk, Wk = offset.shape[2], offset.shape[3]
        n_sample = Hk * Wk
        pos, reference = _ref.offset_to_pos(
            offset, variant=self.variant, offset_range_factor=self.offset_range_factor, no_off=self.no_off, dtype=dtype
        )

        if dat_pp and self.no_off:
            x_sampled = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
            if x_sampled.shape[2:] != (Hk, Wk):
                raise ValueError(
                    f"x: with no_off, avg_pool2d by stride={self.stride} gives {tuple(x_sampled.shape[2:])}, "
                    f"but the offset network gives ({Hk}, {Wk}) samples (the original asserts they match)"
                )
        else:
            x_sampled = self._sample(x.reshape(B * g, cg, H, W), pos)
        x_sampled = x_sampled.reshape(B, C, 1, n_sample)

        q = q.reshape(B * nh, hc, H * W)
        k = self.proj_k(x_sampled).reshape(B * nh, hc, n_sample)
        v = self.proj_v(x_sampled).reshape(B * nh, hc, n_sample)

        rpe = attn_bias = lepe = None
        if self._pe_active():
            if self.dwc_pe:
                # From the (B*h, c, HW) q, as the original: same memory layout into the conv.
                lepe = self.rpe_table(q.reshape(B, C, H, W)).reshape(B * nh, hc, H * W)
            elif self.fixed_pe:  # "dat++" only (see _check_runnable)
                if self.rpe_table.shape[1] * self.rpe_table.shape[2] != H * W * n_sample:
                    raise ValueError(
                        f"x: spatial size ({H}, {W}) with {n_sample} samples does not fit the fixed_pe table of "
                        f"shape {tuple(self.rpe_table.shape)} (q_size={(self.q_h, self.q_w)}, stride={self.stride})"
                    )
                attn_bias = self.rpe_table[None].expand(B, -1, -1, -1).reshape(B * nh, H * W, n_sample)
            elif dat_pp and (H == 1 or W == 1):
                # q_grid is i / (H - 1) * 2 - 1: 0 / 0 on a map one pixel high or wide, and the
                # original's bias (rpe_table or log_cpb) turns every output into NaN.
                raise ValueError(
                    f"x: variant 'dat++' places the bias lookup's queries at i / (H - 1): a ({H}, {W}) map "
                    "divides by zero there (the original returns NaN); use a map of at least 2 x 2"
                )
            elif dat_pp and self.log_cpb:
                coords = _ref.log_cpb_coords(pos, query_size=(H, W), n_groups=g, dtype=dtype)
                b = self.rpe_table(coords)  # (B*g, HW, Ns, h_g)
                attn_bias = b.permute(0, 3, 1, 2).reshape(B * nh, H * W, n_sample)
            elif dat_pp:
                rpe = self.rpe_table
            else:
                # "dat" reads its (heads, 2kv_h-1, 2kv_w-1) table as (heads, 2H-1, 2W-1).
                if self.rpe_table[0].numel() != (2 * H - 1) * (2 * W - 1):
                    raise ValueError(
                        f"x: spatial size ({H}, {W}) does not fit rpe_table of shape {tuple(self.rpe_table.shape)}: "
                        f"variant 'dat' reads it as ({nh}, {2 * H - 1}, {2 * W - 1}) (kv_size={(self.kv_h, self.kv_w)})"
                    )
                rpe = self.rpe_table.reshape(nh, 2 * H - 1, 2 * W - 1)

        drop_p = self.attn_drop.p if self.attn_drop.training else 0.0
        out = deformable_attention(
            q, k, v, pos, rpe, attn_bias, query_size=(H, W), n_heads=nh, n_groups=g, variant=self.variant,
            scale=self.scale, grid_dtype=dtype, dropout_p=drop_p, backend=self.backend,
        )
        if lepe is not None:
            out = out + lepe
        out = out.reshape(B, C, H, W)
        y = self.proj_drop(self.proj_out(out))
        return y, pos.reshape(B, g, Hk, Wk, 2), reference.reshape(B, g, Hk, Wk, 2)

    def extra_repr(self) -> str:
        common = (
            f"variant={self.variant!r}, q_size=({self.q_h}, {self.q_w}), n_heads={self.n_heads}, "
            f"n_head_channels={self.n_head_channels}, n_groups={self.n_groups}, stride={self.stride}, "
            f"offset_range_factor={self.offset_range_factor}, use_pe={self.use_pe}, dwc_pe={self.dwc_pe}, "
            f"no_off={self.no_off}, fixed_pe={self.fixed_pe}, "
        )
        if self.variant == "dat":
            tail = f"kv_size=({self.kv_h}, {self.kv_w}), stage_idx={self.stage_idx}"
        else:
            tail = f"ksize={self.ksize}, log_cpb={self.log_cpb}"
        return common + tail + f", backend={self.backend!r}"
