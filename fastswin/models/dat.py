"""DAT (CVPR 2022) and DAT++ backbones, checkpoint-compatible with LeapLabTHU/DAT.

:class:`DAT` takes the original ``DAT`` constructor's arguments (``models/dat.py``: commit
42b489e for ``variant="dat"``, 2f31405 for ``variant="dat++"``), builds the same modules under
the same names in the same order, and loads the official checkpoints' state_dicts with
``strict=True``. Its attention layers are fastswin's: "D" blocks are
:class:`fastswin.DeformableAttention`, "L"/"S" blocks run the fused shifted-window op, "N" blocks
NATTEN's math in plain PyTorch (:mod:`fastswin.models.dat_layers`). ``backend`` picks the
kernels of every attention layer (``"auto"`` | ``"reference"`` | ``"triton"`` | ``"cuda"``).

Builders (configs: the official ``configs/*.yaml``, :data:`CONFIGS`): :func:`dat_tiny`,
:func:`dat_small`, :func:`dat_base` (DAT) and :func:`dat_pp_tiny`, :func:`dat_pp_small`,
:func:`dat_pp_base` (DAT++). Nothing is downloaded: load a checkpoint yourself, e.g.
``model.load_state_dict(torch.load(path)["model"])``.

``forward(x)``: x (B, 3, img, img) -> ``(logits, positions, references)``. "dat" returns, per
stage, the list of each block's sample positions and reference points ((B, groups, Hk, Wk, 2),
``None`` for non-deformable blocks), as the original; "dat++" returns ``(logits, None, None)``.

Block types: "L" (window), "S" (shifted window), "D" (deformable) in both variants, and "N"
(neighborhood) in "dat++". The other letters of the DAT++ code ("P", "Q", "X", "E", "C": ablation
blocks no released config uses) raise ``NotImplementedError``.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from .._checks import check_tensor, pair
from ..modules._common import ChannelsLayerNorm
from ..modules.deformable_attention import DeformableAttention
from .dat_layers import (DropPath, LayerScale, LocalAttention, NeighborhoodAttention2D, ShiftWindowAttention,
                         TransformerMLP, TransformerMLPWithConv)

VARIANTS = ("dat", "dat++")

# Arguments only DAT++'s constructor has, with its defaults.
_DATPP_DEFAULTS = dict(
    heads_q=[6, 12, 24, 48], lower_lr_kvs={}, ksizes=[9, 7, 5, 3], ksize_qnas=[3, 3, 3, 3], nqs=[2, 2, 2, 2],
    qna_activation="exp", nat_ksizes=[3, 3, 3, 3], layer_scale_values=[-1, -1, -1, -1],
    use_lpus=[False, False, False, False], log_cpb=[False, False, False, False],
)
_BLOCKS = {"dat": "LDS", "dat++": "LDSN"}
_UNSUPPORTED = {"P": "PyramidAttention", "Q": "FusedKQnA", "X": "depthwise-conv (ConvNeXt) block",
                "E": "SlideAttention", "C": "DAttentionDDETR"}


class TransformerStage(nn.Module):
    """One stage: ``depths`` blocks of (norm, attention, residual, norm, MLP, residual), after a
    1x1 ``proj`` when the width changes; DAT++ adds the optional local perception unit (3x3
    depthwise conv residual) and layer scales. Arguments are resolved by :class:`DAT`."""

    def __init__(self, *, variant, backend, fmap_size, window_size, dim_in, dim_embed, depths, stage_spec,
                 n_groups, use_pe, heads, stride, offset_range_factor, stage_idx, dwc_pe, no_off, fixed_pe,
                 attn_drop, proj_drop, expansion, drop, drop_path_rate, use_dwc_mlp,
                 ksize=None, nat_ksize=None, layer_scale_value=-1, use_lpu=False, log_cpb=False):
        super().__init__()
        fmap_size = pair("img_size // patch_size", fmap_size)
        self.variant = variant
        self.depths = depths
        self.stage_spec = list(stage_spec)
        hc = dim_embed // heads
        if dim_embed != heads * hc:
            raise ValueError(f"dims: stage {stage_idx} width {dim_embed} is not a multiple of heads={heads}")
        dat_pp = variant == "dat++"
        self.proj = nn.Conv2d(dim_in, dim_embed, 1, 1, 0) if dim_in != dim_embed else nn.Identity()
        if dat_pp:
            self.use_lpu = use_lpu
            self.ln_cnvnxt = nn.ModuleDict()  # the "X" blocks' norms; "X" is not supported
        self.layer_norms = nn.ModuleList([ChannelsLayerNorm(dim_embed) for _ in range(2 * depths)])
        if use_dwc_mlp:
            self.mlps = nn.ModuleList([TransformerMLPWithConv(dim_embed, expansion, drop, variant=variant)
                                       for _ in range(depths)])
        else:
            self.mlps = nn.ModuleList([TransformerMLP(dim_embed, expansion, drop) for _ in range(depths)])
        self.attns = nn.ModuleList()
        self.drop_path = nn.ModuleList()
        if dat_pp:
            self.layer_scales = nn.ModuleList([
                LayerScale(dim_embed, init_values=layer_scale_value) if layer_scale_value > 0.0 else nn.Identity()
                for _ in range(2 * depths)
            ])
            self.local_perception_units = nn.ModuleList([
                nn.Conv2d(dim_embed, dim_embed, kernel_size=3, stride=1, padding=1, groups=dim_embed)
                if use_lpu else nn.Identity()
                for _ in range(depths)
            ])
        for i in range(depths):
            kind = stage_spec[i]
            if kind == "L":
                attn = LocalAttention(dim_embed, heads, window_size, attn_drop, proj_drop, backend=backend)
            elif kind == "D":
                tail = dict(stage_idx=stage_idx) if variant == "dat" else dict(ksize=ksize, log_cpb=log_cpb)
                attn = DeformableAttention(
                    fmap_size, fmap_size, heads, hc, n_groups, attn_drop, proj_drop, stride, offset_range_factor,
                    use_pe, dwc_pe, no_off, fixed_pe, variant=variant, backend=backend, **tail,
                )
            elif kind == "S":
                attn = ShiftWindowAttention(dim_embed, heads, window_size, attn_drop, proj_drop,
                                            math.ceil(window_size / 2), fmap_size, backend=backend)
            elif kind == "N" and dat_pp:
                attn = NeighborhoodAttention2D(dim_embed, nat_ksize, heads, attn_drop, proj_drop)
            else:
                raise NotImplementedError(
                    f"stage_spec: block type {kind!r}{' (' + _UNSUPPORTED[kind] + ')' if kind in _UNSUPPORTED else ''} "
                    f"in stage {stage_idx} is not supported for variant {variant!r}; "
                    f"supported: {', '.join(_BLOCKS[variant])}"
                )
            self.attns.append(attn)
            self.drop_path.append(DropPath(drop_path_rate[i]) if drop_path_rate[i] > 0.0 else nn.Identity())

    def forward(self, x):
        x = self.proj(x)
        positions, references = [], []
        dat_pp = self.variant == "dat++"
        for d in range(self.depths):
            if dat_pp and self.use_lpu:
                x = self.local_perception_units[d](x.contiguous()) + x
            x0 = x
            x, pos, ref = self.attns[d](self.layer_norms[2 * d](x))
            if dat_pp:
                x = self.layer_scales[2 * d](x)
            x = self.drop_path[d](x) + x0
            x0 = x
            x = self.mlps[d](self.layer_norms[2 * d + 1](x))
            if dat_pp:
                x = self.layer_scales[2 * d + 1](x)
            x = self.drop_path[d](x) + x0
            positions.append(pos)
            references.append(ref)
        return x, positions, references


def _per_stage(name, v):
    v = list(v)
    if len(v) != 4:
        raise ValueError(f"{name}: expected one value per stage (4), got {len(v)}")
    return v


class DAT(nn.Module):
    """The DAT / DAT++ classification backbone (see the module docstring).

    Arguments: those of the original ``DAT.__init__`` of the chosen variant, same names and
    defaults (the "dat++"-only ones -- ``heads_q``, ``lower_lr_kvs``, ``ksizes``, ``ksize_qnas``,
    ``nqs``, ``qna_activation``, ``nat_ksizes``, ``layer_scale_values``, ``use_lpus``,
    ``log_cpb`` -- default to DAT++'s values and raise ``TypeError`` with ``variant="dat"``), plus
    keyword-only ``variant`` (``"dat"`` | ``"dat++"``; ``None`` means "dat++" when a
    "dat++"-only argument is given, else it must be named) and ``backend``.
    """

    def __init__(self, img_size=224, patch_size=4, num_classes=1000, expansion=4,
                 dim_stem=96, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                 heads_q=None, window_sizes=(7, 7, 7, 7),
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 strides=(-1, -1, -1, -1), offset_range_factor=(1, 2, 3, 4),
                 stage_spec=(("L", "D"), ("L", "D"), ("L", "D", "L", "D", "L", "D"), ("L", "D")),
                 groups=(-1, -1, 3, 6), use_pes=(False,) * 4, dwc_pes=(False,) * 4, sr_ratios=(8, 4, 2, 1),
                 lower_lr_kvs=None, fixed_pes=(False,) * 4, no_offs=(False,) * 4, ns_per_pts=(4, 4, 4, 4),
                 use_dwc_mlps=(False,) * 4, use_conv_patches=False,
                 ksizes=None, ksize_qnas=None, nqs=None, qna_activation=None, nat_ksizes=None,
                 layer_scale_values=None, use_lpus=None, log_cpb=None,
                 *, variant: Optional[str] = None, backend: str = "auto"):
        super().__init__()
        pp_args = dict(heads_q=heads_q, lower_lr_kvs=lower_lr_kvs, ksizes=ksizes, ksize_qnas=ksize_qnas, nqs=nqs,
                       qna_activation=qna_activation, nat_ksizes=nat_ksizes, layer_scale_values=layer_scale_values,
                       use_lpus=use_lpus, log_cpb=log_cpb)
        given = [n for n, v in pp_args.items() if v is not None]
        if variant is None:
            if not given:
                raise TypeError("variant: pass 'dat' (LeapLabTHU/DAT 42b489e, CVPR 2022) or 'dat++' (2f31405)")
            variant = "dat++"
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if variant == "dat" and given:
            raise TypeError(f"{given[0]}: not an argument of variant 'dat' (LeapLabTHU/DAT 42b489e); it is DAT++'s")
        pp = {n: copy.deepcopy(_DATPP_DEFAULTS[n]) if v is None else v for n, v in pp_args.items()}
        self.variant = variant
        self.backend = backends.check_backend_name(backend)
        dat_pp = variant == "dat++"

        depths = _per_stage("depths", depths)
        stage_spec = _per_stage("stage_spec", stage_spec)
        for i, (spec, depth) in enumerate(zip(stage_spec, depths)):
            if len(spec) != depth:
                raise ValueError(f"stage_spec: stage {i} lists {len(spec)} blocks, depths[{i}] = {depth}")
        per = {n: _per_stage(n, v) for n, v in dict(
            dims=dims, heads=heads, window_sizes=window_sizes, strides=strides, offset_range_factor=offset_range_factor,
            groups=groups, use_pes=use_pes, dwc_pes=dwc_pes, fixed_pes=fixed_pes, no_offs=no_offs,
            use_dwc_mlps=use_dwc_mlps).items()}
        if dat_pp:
            per.update({n: _per_stage(n, pp[n]) for n in ("ksizes", "nat_ksizes", "layer_scale_values", "use_lpus", "log_cpb")})
            self.lower_lr_kvs = pp["lower_lr_kvs"]
        dims = per["dims"]

        if use_conv_patches and dat_pp:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(3, dim_stem // 2, 3, patch_size // 2, 1), ChannelsLayerNorm(dim_stem // 2), nn.GELU(),
                nn.Conv2d(dim_stem // 2, dim_stem, 3, patch_size // 2, 1), ChannelsLayerNorm(dim_stem),
            )
        elif use_conv_patches:
            self.patch_proj = nn.Sequential(nn.Conv2d(3, dim_stem, 7, patch_size, 3), ChannelsLayerNorm(dim_stem))
        else:
            self.patch_proj = nn.Sequential(nn.Conv2d(3, dim_stem, patch_size, patch_size, 0), ChannelsLayerNorm(dim_stem))

        fmap = img_size // patch_size
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList()
        for i in range(4):
            extra = {}
            if dat_pp:
                extra = dict(ksize=per["ksizes"][i], nat_ksize=per["nat_ksizes"][i],
                             layer_scale_value=per["layer_scale_values"][i], use_lpu=per["use_lpus"][i],
                             log_cpb=per["log_cpb"][i])
            self.stages.append(TransformerStage(
                variant=variant, backend=backend, fmap_size=fmap, window_size=per["window_sizes"][i],
                dim_in=dim_stem if i == 0 else dims[i - 1] * 2, dim_embed=dims[i], depths=depths[i],
                stage_spec=stage_spec[i], n_groups=per["groups"][i], use_pe=per["use_pes"][i], heads=per["heads"][i],
                stride=per["strides"][i], offset_range_factor=per["offset_range_factor"][i], stage_idx=i,
                dwc_pe=per["dwc_pes"][i], no_off=per["no_offs"][i], fixed_pe=per["fixed_pes"][i],
                attn_drop=attn_drop_rate, proj_drop=drop_rate, expansion=expansion, drop=drop_rate,
                drop_path_rate=dpr[sum(depths[:i]):sum(depths[:i + 1])], use_dwc_mlp=per["use_dwc_mlps"][i], **extra,
            ))
            fmap = fmap // 2

        self.down_projs = nn.ModuleList()
        for i in range(3):
            if use_conv_patches:
                conv = nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1, bias=False)
            else:
                conv = nn.Conv2d(dims[i], dims[i + 1], 2, 2, 0, bias=False)
            self.down_projs.append(nn.Sequential(conv, ChannelsLayerNorm(dims[i + 1])))
        self.cls_norm = ChannelsLayerNorm(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes)
        # The original's reset_parameters() walks self.parameters() looking for Linear/Conv2d
        # modules, finds none, and so leaves PyTorch's default init: nothing to do here.

    @torch.no_grad()
    def load_pretrained(self, state_dict, lookup_22k=None):
        """The original's resizing loader: entries whose shape differs from this model's are
        adapted (relative index / grid buffers: kept; ``relative_position_bias_table`` and
        ``rpe_table``: bicubic interpolation; "dat++" ``cls_head``: rows ``lookup_22k``, required
        then; "dat" drops a head of another shape, as its original does), then
        ``load_state_dict(strict=False)``. Returns its result (missing / unexpected keys)."""
        if lookup_22k is not None and self.variant == "dat":
            raise TypeError("lookup_22k: not an argument of variant 'dat''s load_pretrained (LeapLabTHU/DAT 42b489e)")
        own = self.state_dict()
        new = {}
        for key, value in state_dict.items():
            if key not in own:
                raise KeyError(f"state_dict: {key!r} is not a parameter or buffer of this model")
            mine = own[key]
            parts = key.split(".")
            if mine.shape == value.shape:
                new[key] = value
            elif {"relative_position_index", "q_grid", "reference", "attn_mask"} & set(parts):
                new[key] = mine
            elif "relative_position_bias_table" in parts:
                n, c = value.shape
                side, big = math.isqrt(n), math.isqrt(mine.shape[0])
                if side * side != n:
                    raise ValueError(f"state_dict: {key} has {n} rows, not a square number")
                grid = value.reshape(1, side, side, c).permute(0, 3, 1, 2)
                new[key] = F.interpolate(grid, (big, big), mode="bicubic").reshape(c, big * big).permute(1, 0)
            elif "rpe_table" in parts and value.dim() == 3:
                new[key] = F.interpolate(value.unsqueeze(0), tuple(mine.shape[1:]), mode="bicubic").squeeze(0)
            elif "cls_head" in parts and self.variant == "dat++":
                if lookup_22k is None:  # the original indexes with None and fails on the shape
                    raise ValueError(
                        f"state_dict: {key} has shape {tuple(value.shape)}, this model's {tuple(mine.shape)}; pass "
                        "lookup_22k (the rows to keep) or leave the head out of the state_dict"
                    )
                new[key] = value[lookup_22k]
        return self.load_state_dict(new, strict=False)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table", "rpe_table"}

    def forward(self, x):
        check_tensor("x", x, ndim=4, layout="(B, 3, H, W)")
        x = self.patch_proj(x)
        positions, references = [], []
        for i in range(4):
            x, pos, ref = self.stages[i](x)
            if i < 3:
                x = self.down_projs[i](x)
            positions.append(pos)
            references.append(ref)
        x = self.cls_norm(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        x = self.cls_head(x)
        if self.variant == "dat++":
            return x, None, None
        return x, positions, references
