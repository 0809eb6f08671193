"""DAT / DAT++ providers. Every one times the whole attention module, ``module(x)[0]`` from the
block's (B, C, H, W) input to the module's output: offsets, sampling, projections, position
bias and attention (DAT's attention is not separable from its sampling the way Swin's is from
its windows, and the original code is this module).

* ``official`` -- ``fastswin.DeformableAttention(backend="reference")``: the reference path is
  the official DAT / DAT++ math (bit-identical to LeapLabTHU/DAT's ``DAttentionBaseline``, see
  README), eager PyTorch with ``F.grid_sample``;
* ``naive`` -- the same module on the same backend, so it is not timed twice: it prints a
  pointer to the ``official`` row;
* ``fastswin_triton`` / ``fastswin_cuda`` / ``fastswin_auto`` -- the module on that backend.
"""
import torch

import fastswin

from . import flops as fl
from .cases import Case
from .providers_common import ROTATE, Work, backend_of, fwd_bwd, fwd_only, refusal

PROVIDERS = {"dat": ["official", "naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"]}


def build(case: Case, provider, device, dtype, batch) -> "Work | str":
    if provider == "naive":
        return "naive is the reference module, the official DAT math: see the official row"
    backend = "reference" if provider == "official" else backend_of(provider)
    if backend is None:
        return f"provider {provider!r} is not implemented for {case.op}"
    p = case.params
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

    why = refusal(fn, (xs[0],), provider, "deformable_attention")
    if why:
        return why
    grads = [torch.randn(batch, c, res, res, device=device, dtype=dtype) for _ in range(ROTATE)]
    ns = (res // stride) ** 2
    elem = torch.finfo(dtype).bits // 8
    sets = [(x,) for x in xs]
    return Work(
        fwd=fwd_only(fn, sets),
        fwd_bwd=fwd_bwd(fn, sets, grads, mod.parameters()),
        flops=fl.deformable_attention(batch, res * res, ns, heads, d),
        bytes=(4 * batch * c * res * res) * elem,
        shape=f"B{batch} {res}x{res} h{heads} d{d} g{g} stride{stride} Ns{ns}",
    )
