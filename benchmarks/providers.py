"""Providers per op: each builds, for one case, a :class:`~benchmarks.providers_common.Work`
(callables over rotated inputs) or returns the reason it cannot run here (printed by the
runner, never silently dropped). What each provider is, and the span it times:

* Swin V1 / V2 (:mod:`benchmarks.providers_swin`): from qkv (B, H, W, 3, heads, d) to the
  pre-projection output (B, H, W, heads*d), every copy included -- ``naive``, ``timm``,
  ``timm_sdpa`` (V1), ``fastswin_triton``, ``fastswin_cuda``, ``fastswin_auto``, ``flex``;
* DAT / DAT++ (:mod:`benchmarks.providers_dat`): the whole attention module -- ``official``
  (the reference path, which is the official math), ``naive`` (points to ``official``),
  ``fastswin_*``;
* bilinear sampling (here): ``grid_sample`` (bare ``F.grid_sample``), ``fastswin_*``;
* whole models (:mod:`benchmarks.providers_models`): Swin-T, SwinV2-T, DAT-T, ``infer`` (the
  ``fwd`` row) and an AMP ``train_step`` with AdamW (the ``fwd+bwd`` row) -- ``naive``,
  ``timm_sdpa`` (Swin V1), ``fastswin_*``.
"""
from typing import Optional

import torch
import torch.nn.functional as F

import fastswin

from . import flops as fl
from . import providers_dat, providers_models, providers_swin
from .cases import Case
from .providers_common import ROTATE, Work, backend_of, fwd_bwd, fwd_only, refusal  # noqa: F401 (re-exported)


def _bilinear(case: Case, provider, device, dtype, batch) -> "Work | str":
    p = case.params
    res, c, g, stride = p["res"], p["channels"], p["groups"], p["stride"]
    hk = wk = res // stride
    n = batch * g
    cg = c // g
    sets = []
    for _ in range(ROTATE):
        feat = torch.randn(n, cg, res, res, device=device, dtype=dtype, requires_grad=True)
        # DAT's sample points: a grid plus learnt offsets, a few off the map.
        pos = (torch.rand(n, hk, wk, 2, device=device, dtype=dtype) * 2.2 - 1.1).requires_grad_()
        sets.append((feat, pos))
    if provider == "grid_sample":
        def fn(feat, pos):
            return F.grid_sample(feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True)
    else:
        backend = backend_of(provider)
        if backend is None:
            return f"provider {provider!r} does not apply to {case.op}"
        if provider == "naive":
            return "naive is F.grid_sample itself here: see the grid_sample row"

        def fn(feat, pos):
            return fastswin.functional.bilinear_sample(feat, pos, backend=backend)

        why = refusal(fn, sets[0], provider, "bilinear_sample")
        if why:
            return why
    grads = [torch.randn(n, cg, hk, wk, device=device, dtype=dtype) for _ in range(ROTATE)]
    elem = torch.finfo(dtype).bits // 8
    return Work(
        fwd=fwd_only(fn, sets),
        fwd_bwd=fwd_bwd(fn, sets, grads),
        flops=fl.bilinear_sample(n, cg, hk, wk),
        bytes=fl.bilinear_sample_bytes(n, cg, res, res, hk, wk, elem),
        shape=f"N{n} C{cg} {res}x{res} -> {hk}x{wk}",
    )


BUILDERS = {"swin_v1": providers_swin.build, "swin_v2": providers_swin.build, "bilinear_sample": _bilinear,
            "dat": providers_dat.build, **dict.fromkeys(providers_models.OPS, providers_models.build)}
PROVIDERS = {
    **providers_swin.PROVIDERS,
    **providers_dat.PROVIDERS,
    **providers_models.PROVIDERS,
    "bilinear_sample": ["grid_sample", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
}


def mode_label(op: str, timed: str) -> str:
    """The CSV ``mode`` of a timed span (``fwd`` / ``fwd+bwd``): whole models call them ``infer`` and
    ``train_step`` (what those rows time, see :mod:`benchmarks.providers_models`)."""
    return providers_models.MODE_LABELS[timed] if op in providers_models.OPS else timed


def build(case: Case, provider: str, device, dtype, batch) -> "Work | str":
    return BUILDERS[case.op](case, provider, device, dtype, batch)


def flop_counter_check(case: Case, device, dtype, batch) -> Optional[int]:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on the naive forward, to
    cross-check the analytic formula (None where the op has no matmul to count). Whole models:
    the naive model's count, against which each provider's own count is checked."""
    if case.op in providers_models.OPS:
        try:
            return providers_models.counted_flops(case, "naive", device, dtype, batch)
        except Exception:  # the naive build's own failure is reported by its row
            return None
    if case.op not in ("swin_v1", "swin_v2"):
        return None
    from torch.utils.flop_counter import FlopCounterMode

    from fastswin.ops import flop_formulas

    flop_formulas.register()  # so a fused backend would count the same (not used by naive itself)
    w = build(case, "naive", device, dtype, batch)
    if isinstance(w, str):
        return None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        w.fwd(0)
    return counter.get_total_flops()
