"""Providers per op: each builds, for one case, a callable ``run(i)`` over rotated inputs, or
returns the reason it cannot run here (printed, never silently dropped).

Providers now: ``naive`` (fastswin's reference path: the original Swin/timm/DAT math, eager),
``grid_sample`` (bare ``F.grid_sample`` for the sampling op), ``fastswin_triton``,
``fastswin_cuda``, ``fastswin_auto``. The peers of issue 6 (timm, timm_sdpa, flex, official)
join here.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import fastswin

from . import flops as fl
from .cases import Case

ROTATE = 3  # input sets per case, cycled so no call finds the previous one's data in cache


@dataclass
class Work:
    """One provider on one case: ``fwd(i)`` runs the forward on input set ``i % ROTATE``;
    ``fwd_bwd(i)`` forward and backward (None: no backward)."""

    fwd: Callable[[int], object]
    fwd_bwd: Optional[Callable[[int], object]]
    flops: int
    bytes: int
    shape: str


def _backend_of(provider):
    return {"naive": "reference", "fastswin_triton": "triton", "fastswin_cuda": "cuda", "fastswin_auto": "auto"}.get(
        provider
    )


def _fwd(fn, inputs):
    """Forward only, without building the autograd graph (inference timing)."""

    def run(i):
        with torch.no_grad():
            return fn(*inputs[i % ROTATE])

    return run


def _fwd_bwd(fn, inputs, grads, params=()):
    """Forward and backward to every input that requires grad (and to ``params``, a module's
    weights). ``autograd.grad`` returns the gradients instead of accumulating into ``.grad``: no
    extra read-modify-write is timed."""
    params = [p for p in params if p.requires_grad]

    def run(i):
        args = inputs[i % ROTATE]
        out = fn(*args)
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + params
        return torch.autograd.grad(out, wrt, grads[i % ROTATE])

    return run


def _refusal(fn, args, provider=None, op=None) -> Optional[str]:
    """The backend's own reasons if it refuses these inputs (one trial call, no grad); for
    ``fastswin_auto``, also a refusal when auto picked the reference (that row would be ``naive``)."""
    try:
        with torch.no_grad():
            fn(*args)
    except fastswin.BackendUnavailableError as e:
        return str(e)
    if provider == "fastswin_auto" and fastswin.backends.last_selected(op) == "reference":
        return f"auto runs the reference backend for {op} here (the same work as the naive/grid_sample row)"
    return None


def _swin(case: Case, provider, device, dtype, batch) -> "Work | str":
    p = case.params
    backend = _backend_of(provider)
    if backend is None:
        return f"provider {provider!r} is not implemented for {case.op} yet"
    res, heads, d, m, s = p["res"], p["heads"], p["head_dim"], p["window"], p["shift"]
    table_rows = (2 * m - 1) ** 2
    v2 = case.op == "swin_v2"
    sets = []
    for _ in range(ROTATE):
        qkv = torch.randn(batch, res, res, 3, heads, d, device=device, dtype=dtype, requires_grad=True)
        table = (0.02 * torch.randn(table_rows, heads, device=device, dtype=dtype)).requires_grad_()
        if v2:
            scale = torch.log(10 * torch.ones(heads, 1, 1, device=device, dtype=dtype)).requires_grad_()
            sets.append((qkv, scale, table))
        else:
            sets.append((qkv, table))
    if v2:
        def fn(qkv, scale, table):
            return fastswin.functional.shifted_window_attention_v2(qkv, scale, table, (m, m), (s, s), backend=backend)
    else:
        def fn(qkv, table):
            return fastswin.functional.shifted_window_attention(qkv, table, (m, m), (s, s), backend=backend)
    why = _refusal(fn, sets[0], provider, _swin_op(v2))
    if why:
        return why
    grads = [torch.randn(batch, res, res, heads * d, device=device, dtype=dtype) for _ in range(ROTATE)]
    elem = torch.finfo(dtype).bits // 8
    return Work(
        fwd=_fwd(fn, sets),
        fwd_bwd=_fwd_bwd(fn, sets, grads),
        flops=fl.swin_window_attention(batch, res, heads, d, m),
        bytes=fl.swin_window_attention_bytes(batch, res, heads, d, m, elem),
        shape=f"B{batch} {res}x{res} h{heads} d{d} M{m} shift{s}",
    )


def _swin_op(v2):
    return "shifted_window_attention_v2" if v2 else "shifted_window_attention"


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
        backend = _backend_of(provider)
        if backend is None:
            return f"provider {provider!r} does not apply to {case.op}"
        if provider == "naive":
            return "naive is F.grid_sample itself here: see the grid_sample row"
        def fn(feat, pos):
            return fastswin.functional.bilinear_sample(feat, pos, backend=backend)

        why = _refusal(fn, sets[0], provider, "bilinear_sample")
        if why:
            return why
    grads = [torch.randn(n, cg, hk, wk, device=device, dtype=dtype) for _ in range(ROTATE)]
    elem = torch.finfo(dtype).bits // 8
    return Work(
        fwd=_fwd(fn, sets),
        fwd_bwd=_fwd_bwd(fn, sets, grads),
        flops=fl.bilinear_sample(n, cg, hk, wk),
        bytes=fl.bilinear_sample_bytes(n, cg, res, res, hk, wk, elem),
        shape=f"N{n} C{cg} {res}x{res} -> {hk}x{wk}",
    )


def _dat(case: Case, provider, device, dtype, batch) -> "Work | str":
    p = case.params
    backend = _backend_of(provider)
    if backend is None:
        return f"provider {provider!r} is not implemented for {case.op} yet"
    res, heads, d, g, stride = p["res"], p["heads"], p["head_dim"], p["groups"], p["stride"]
    kw = dict(q_size=(res, res), kv_size=(res, res), n_heads=heads, n_head_channels=d, n_groups=g,
              attn_drop=0.0, proj_drop=0.0, stride=stride, offset_range_factor=2 if p["variant"] == "dat" else -1,
              use_pe=True, dwc_pe=False, no_off=False, fixed_pe=False)
    kw.update(dict(stage_idx=2) if p["variant"] == "dat" else dict(ksize=3, log_cpb=False))
    mod = fastswin.DeformableAttention(**kw, variant=p["variant"], backend=backend).to(device=device, dtype=dtype)
    c = heads * d
    xs = [torch.randn(batch, c, res, res, device=device, dtype=dtype, requires_grad=True) for _ in range(ROTATE)]
    def fn(x):
        return mod(x)[0]

    why = _refusal(fn, (xs[0],), provider, "deformable_attention")
    if why:
        return why

    grads = [torch.randn(batch, c, res, res, device=device, dtype=dtype) for _ in range(ROTATE)]
    ns = (res // stride) ** 2
    elem = torch.finfo(dtype).bits // 8
    return Work(
        fwd=_fwd(fn, [(x,) for x in xs]),
        fwd_bwd=_fwd_bwd(fn, [(x,) for x in xs], grads, mod.parameters()),
        flops=fl.deformable_attention(batch, res * res, ns, heads, d),
        bytes=(4 * batch * c * res * res) * elem,
        shape=f"B{batch} {res}x{res} h{heads} d{d} g{g} stride{stride} Ns{ns}",
    )


BUILDERS = {"swin_v1": _swin, "swin_v2": _swin, "bilinear_sample": _bilinear, "dat": _dat}
PROVIDERS = {
    "swin_v1": ["naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
    "swin_v2": ["naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
    "dat": ["naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
    "bilinear_sample": ["grid_sample", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
}


def build(case: Case, provider: str, device, dtype, batch) -> "Work | str":
    return BUILDERS[case.op](case, provider, device, dtype, batch)


def flop_counter_check(case: Case, device, dtype, batch) -> Optional[int]:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on the naive forward, to
    cross-check the analytic formula (None where the op has no matmul to count)."""
    if case.op not in ("swin_v1", "swin_v2"):
        return None
    from torch.utils.flop_counter import FlopCounterMode

    w = build(case, "naive", device, dtype, batch)
    if isinstance(w, str):
        return None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        w.fwd(0)
    return counter.get_total_flops()
