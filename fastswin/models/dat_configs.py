"""The released DAT and DAT++ configurations, and one builder per configuration.

Each entry of :data:`CONFIGS` is the ``MODEL.DAT`` section of the official ``configs/*.yaml``
of LeapLabTHU/DAT (DAT: the CVPR 2022 configs, ``NAME: dat_tiny`` etc.; DAT++: the configs of
commit 2f31405, ``NAME: dat_plus_plus``), plus its ``variant``. The builders take keyword
overrides of any :class:`~fastswin.models.DAT` argument (``img_size``, ``num_classes``,
``drop_path_rate``, ``backend``, ...). Parameter counts (ImageNet-1k head): see the README.
"""
from __future__ import annotations

import copy

from .dat import DAT

_L4 = [7, 7, 7, 7]
_F4 = [False, False, False, False]

_DAT_COMMON = dict(
    variant="dat", img_size=224, patch_size=4, num_classes=1000, expansion=4,
    window_sizes=_L4, strides=[-1, -1, 1, 1], sr_ratios=[-1, -1, -1, -1], offset_range_factor=[-1, -1, 2, 2],
    use_pes=[False, False, True, True], dwc_pes=_F4, no_offs=_F4, fixed_pes=_F4, use_dwc_mlps=_F4,
    use_conv_patches=False, drop_rate=0.0, attn_drop_rate=0.0,
)
_DATPP_COMMON = dict(
    variant="dat++", img_size=224, patch_size=4, num_classes=1000, expansion=4, depths=[2, 4, 18, 2],
    stage_spec=[["N", "D"], ["N", "D"] * 2, ["N", "D"] * 9, ["D", "D"]],
    window_sizes=_L4, use_pes=[True, True, True, True], dwc_pes=_F4, strides=[8, 4, 2, 1],
    offset_range_factor=[-1, -1, -1, -1], no_offs=_F4, fixed_pes=_F4, use_dwc_mlps=[True, True, True, True],
    use_lpus=[True, True, True, True], use_conv_patches=True, ksizes=[9, 7, 5, 3], nat_ksizes=_L4,
    drop_rate=0.0, attn_drop_rate=0.0,
)


def _dat(depth3, width, heads, groups34, drop_path):
    return dict(
        _DAT_COMMON, dim_stem=width, dims=[width, 2 * width, 4 * width, 8 * width], depths=[2, 2, depth3, 2],
        stage_spec=[["L", "S"], ["L", "S"], ["L", "D"] * (depth3 // 2), ["L", "D"]],
        heads=heads, groups=[-1, -1] + groups34, drop_path_rate=drop_path,
    )


def _datpp(width, heads, groups, drop_path):
    return dict(_DATPP_COMMON, dim_stem=width, dims=[width, 2 * width, 4 * width, 8 * width], heads=heads,
                groups=groups, drop_path_rate=drop_path)


CONFIGS = {
    # configs/dat_tiny.yaml, dat_small.yaml, dat_base.yaml (DAT, CVPR 2022)
    "dat_tiny": _dat(6, 96, [3, 6, 12, 24], [3, 6], 0.2),
    "dat_small": _dat(18, 96, [3, 6, 12, 24], [3, 6], 0.3),
    "dat_base": _dat(18, 128, [4, 8, 16, 32], [4, 8], 0.5),
    # configs/dat_tiny.yaml, dat_small.yaml, dat_base.yaml (DAT++, 2f31405). DAT-B++ takes
    # use_dwc_mlps=True, as dat_base_384.yaml says and tiny/small have, although the repository's
    # dat_base.yaml says False: dat_base_384.yaml fine-tunes from the released dat_b_in1k.pth
    # through load_pretrained, which getattr()s every checkpoint key and so only runs if the
    # checkpoint has the conv-MLP keys; and 93.7 M parameters (False: 93.2 M) is the paper's 94 M.
    # dat_pp_base(use_dwc_mlps=[False] * 4) builds the other one.
    "dat_pp_tiny": _datpp(64, [2, 4, 8, 16], [1, 2, 4, 8], 0.2),
    "dat_pp_small": _datpp(96, [3, 6, 12, 24], [1, 2, 3, 6], 0.4),
    "dat_pp_base": _datpp(128, [4, 8, 16, 32], [2, 4, 8, 16], 0.7),
}


def build(name: str, **overrides) -> DAT:
    """``DAT(**CONFIGS[name], **overrides)``; an unknown ``name`` raises ``KeyError`` listing the
    configurations."""
    if name not in CONFIGS:
        raise KeyError(f"name: unknown DAT configuration {name!r}; expected one of {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name])
    cfg.update(overrides)
    return DAT(**cfg)


def dat_tiny(**overrides) -> DAT:
    """DAT-T (CVPR 2022): dims 96-768, depths 2-2-6-2, "L"/"S" blocks in stages 1-2, "L"/"D" in 3-4."""
    return build("dat_tiny", **overrides)


def dat_small(**overrides) -> DAT:
    """DAT-S (CVPR 2022): dims 96-768, depths 2-2-18-2."""
    return build("dat_small", **overrides)


def dat_base(**overrides) -> DAT:
    """DAT-B (CVPR 2022): dims 128-1024, depths 2-2-18-2."""
    return build("dat_base", **overrides)


def dat_pp_tiny(**overrides) -> DAT:
    """DAT-T++: dims 64-512, depths 2-4-18-2, "N"/"D" blocks, stage 4 "D"/"D", conv stem, LPU, conv MLP."""
    return build("dat_pp_tiny", **overrides)


def dat_pp_small(**overrides) -> DAT:
    """DAT-S++: dims 96-768, depths 2-4-18-2."""
    return build("dat_pp_small", **overrides)


def dat_pp_base(**overrides) -> DAT:
    """DAT-B++: dims 128-1024, depths 2-4-18-2."""
    return build("dat_pp_base", **overrides)
