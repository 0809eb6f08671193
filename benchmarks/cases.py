"""Named benchmark cases. Names are stable so results stay comparable across runs.

Swin-T at 224 px: stages of 56, 28, 14, 7 tokens a side, 3/6/12/24 heads, head_dim 32, window 7.
Swin-B: 4/8/16/32 heads. SwinV2-T at 256 px with windows 8/16 (and 24 at 384 px).
DAT-T stage 3: 14x14, C 384, 12 heads, 3 groups, stride 1 (Ns = 196); DAT++-S stage 3: stride 2 (Ns = 49).

Whole models (``model_*`` ops, :mod:`benchmarks.providers_models`): Swin-T at 224 px, SwinV2-T
at 256 px, DAT-T at 224 px, case ``b128``: batch 128 on a GPU, 1 on a CPU (a few seconds per
provider there).

``batch`` is the GPU batch; on a CPU the runner scales it down (``cpu_batch``) and records
the batch it used in the row's ``shape`` column.
"""
from dataclasses import dataclass, field
from typing import Dict, Tuple


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    params: Dict = field(default_factory=dict)
    batch: int = 128
    cpu_batch: int = 1


def _swin(name, res, heads, window=7, shift=3, batch=128, op="swin_v1", **kw):
    return Case(op, name, dict(res=res, heads=heads, head_dim=32, window=window, shift=shift, **kw), batch)


CASES: Tuple[Case, ...] = (
    _swin("swin_t_s1", 56, 3),
    _swin("swin_t_s2", 28, 6),
    _swin("swin_t_s3", 14, 12),
    _swin("swin_t_s4", 7, 24, shift=0),  # resolution == window: timm disables the shift
    _swin("swin_b_s1", 56, 4),
    _swin("swin_b_s2", 28, 8),
    _swin("swin_b_s3", 14, 16),
    _swin("swin_b_s4", 7, 32, shift=0),
    _swin("swinv2_w8", 64, 3, window=8, shift=4, op="swin_v2"),
    _swin("swinv2_w16", 64, 3, window=16, shift=8, op="swin_v2"),
    _swin("swinv2_w24", 96, 3, window=24, shift=12, op="swin_v2", batch=32),
    Case("dat", "dat_t_s3", dict(variant="dat", res=14, heads=12, head_dim=32, groups=3, stride=1), 64),
    Case("dat", "datpp_s_s3", dict(variant="dat++", res=14, heads=12, head_dim=32, groups=3, stride=2), 64),
    Case("bilinear_sample", "dat_t_s3", dict(res=14, channels=384, groups=3, stride=1), 64, 4),
    Case("bilinear_sample", "datpp_s_s3", dict(res=14, channels=384, groups=3, stride=2), 64, 4),
    Case("model_swin_t", "b128", dict(source="timm", model="swin_tiny_patch4_window7_224", side=224), 128, 1),
    Case("model_swinv2_t", "b128", dict(source="timm", model="swinv2_tiny_window8_256", side=256), 128, 1),
    Case("model_dat_t", "b128", dict(source="dat", model="dat_tiny", side=224), 128, 1),
)
