"""Whole-model providers: Swin-T (timm ``swin_tiny_patch4_window7_224``), SwinV2-T (timm
``swinv2_tiny_window8_256``) and DAT-T (:func:`fastswin.models.dat_tiny`), built offline
(``pretrained=False``; weights do not change the timing). Two modes, the runner's ``fwd`` and
``fwd+bwd`` spans, written to the CSV as (:data:`MODE_LABELS`):

* ``infer``: eval mode, ``no_grad``, the logits of one batch;
* ``train_step``: train mode, forward, ``cross_entropy(logits.float(),
  random labels)``, backward, ``AdamW.step()``, ``zero_grad(set_to_none=True)``.

Both under ``torch.autocast`` to the suite's dtype when it is bf16 / fp16 (the GPU default is
bf16: AMP with fp32 master weights; fp16 adds a ``GradScaler``); in fp32 / fp64 (the CPU
default is fp32) the model runs in that dtype without autocast.

Providers:

* ``naive`` -- the timm model unpatched, every ``WindowAttention.fused_attn`` forced off (timm's
  eager math whatever ``TIMM_FUSED_ATTN`` says); DAT-T with ``backend="reference"``;
* ``timm_sdpa`` (Swin V1 only) -- the timm model with ``fused_attn = True`` on every
  ``WindowAttention`` (what ``TIMM_FUSED_ATTN=2`` selects; timm's V2 attention has no fused path);
* ``fastswin_triton`` / ``fastswin_cuda`` / ``fastswin_auto`` -- the timm model patched in place
  with ``fastswin.patch(model, backend=...)``; DAT-T built with that backend. A backend that
  refuses the device says why on the first (probe) call and the row is skipped with that reason.
  On a CPU only ``naive``, ``timm_sdpa`` and ``fastswin_auto`` run (auto runs the reference
  path there, which the ``shape`` column states); ``fastswin_triton`` is not run on a CPU even
  under ``TRITON_INTERPRET=1`` (the interpreter on a whole model takes minutes).

FLOPs: ``FlopCounterMode`` on the naive model (fastswin's flop formulas registered), one eval
forward at batch 1 times the batch (every op here is per-sample); the same figure for every
provider (the same work). Each provider's own model is counted too, and a different count is
printed as a ``note:`` (the cross-check: an op without a flop formula on that device shows there,
e.g. timm_sdpa on a CPU, whose SDPA kernel FlopCounterMode does not count). FlopCounterMode
counts FLOPs = 2 x MACs (matmuls, convolutions, SDPA; not softmax / norms / GELU, as the papers). The runner reports ``train_step`` as 3 x the
forward FLOPs (backward ~ 2 x forward; the optimizer step is not counted), the usual convention.

Bytes: no meaningful floor for a whole network, so ``bytes`` is NaN (the runner then prints
``-`` for GB/s and writes ``nan`` to the CSV, as it does for peak memory on a CPU).
"""
import torch
import torch.nn.functional as F

import fastswin

from .cases import Case
from .model_macs import forward_flops
from .providers_common import ROTATE, Work, backend_of, first_line

PROVIDERS = {
    "model_swin_t": ["naive", "timm_sdpa", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
    "model_swinv2_t": ["naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
    "model_dat_t": ["naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"],
}
OPS = tuple(PROVIDERS)
# The runner times a work's ``fwd`` and ``fwd+bwd`` spans; for a whole model they are these.
MODE_LABELS = {"fwd": "infer", "fwd+bwd": "train_step"}
# fastswin ops each model dispatches (to say what ``auto`` picked)
_DISPATCHED = {
    "model_swin_t": ("shifted_window_attention",),
    "model_swinv2_t": ("shifted_window_attention_v2",),
    "model_dat_t": ("shifted_window_attention", "deformable_attention"),
}
_NAIVE_FLOPS = {}  # (op, params, device type, dtype) -> forward FLOPs at batch 1 of the naive model


def _side(case: Case) -> int:
    return case.params["side"]


def _timm_attentions(model):
    from timm.models.swin_transformer import WindowAttention

    return [m for m in model.modules() if isinstance(m, WindowAttention)]


def make_model(case: Case, provider, device) -> "torch.nn.Module | str":
    """The model for ``provider`` (fp32 weights on ``device``), or why there is none."""
    p = case.params
    kw = p.get("kwargs", {})  # constructor overrides: the tests' shrunken models, never a real case
    backend = backend_of(provider)
    if provider == "timm_sdpa":
        if p["source"] != "timm" or case.op != "model_swin_t":
            return f"{provider} is a Swin V1 peer (timm's V2 WindowAttention has no fused path)"
    elif backend is None:
        return f"provider {provider!r} is not implemented for {case.op}"
    if provider == "fastswin_triton" and device.type == "cpu":
        why = fastswin.backends.triton_device_reasons(torch.empty(0))
        return "; ".join(why) if why else (
            "not run on a CPU: the Triton interpreter (TRITON_INTERPRET=1) on a whole model takes minutes")
    if p["source"] == "dat":
        return fastswin.models.dat_tiny(backend=backend, **kw).to(device)
    try:
        import timm
    except Exception as e:
        return f"timm is not importable: {first_line(e)}"
    model = timm.create_model(p["model"], pretrained=False, **kw)
    if p["model"].startswith("swin_"):  # V1: fix the attention path whatever TIMM_FUSED_ATTN says
        for m in _timm_attentions(model):
            m.fused_attn = provider == "timm_sdpa"
    if backend != "reference" and provider != "timm_sdpa":
        fastswin.patch(model, backend=backend)
    return model.to(device)


def _autocast(device, dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out  # DAT: (logits, positions, references)


def counted_flops(case: Case, provider, device, dtype, batch, model=None):
    """Forward FLOPs at ``batch`` counted by FlopCounterMode on the provider's model (None if
    that provider cannot run here). The naive model's count is cached per (case, device, dtype)."""
    key = (case.op, repr(case.params), device.type, dtype)
    if provider == "naive" and key in _NAIVE_FLOPS:
        return _NAIVE_FLOPS[key] * batch
    own = model is None
    if own:
        torch.manual_seed(0)
        model = make_model(case, provider, device)
        if isinstance(model, str):
            return None
        if dtype == torch.float64:
            model = model.double()
    try:
        n = forward_flops(model, _side(case), device, dtype, autocast=_autocast(device, dtype))
    except fastswin.BackendUnavailableError:
        return None
    finally:
        if own:
            del model
    if provider == "naive":
        _NAIVE_FLOPS[key] = n
    return n * batch


def build(case: Case, provider, device, dtype, batch) -> "Work | str":
    model = make_model(case, provider, device)
    if isinstance(model, str):
        return model
    if dtype == torch.float64:
        model = model.double()
    side = _side(case)
    xdtype = torch.float64 if dtype == torch.float64 else torch.float32
    xs = [torch.randn(batch, 3, side, side, device=device, dtype=xdtype) for _ in range(ROTATE)]
    labels = [torch.randint(0, 1000, (batch,), device=device) for _ in range(ROTATE)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def infer(i):
        if model.training:
            model.eval()
        with torch.no_grad(), _autocast(device, dtype):
            return _logits(model(xs[i % ROTATE]))

    def train_step(i):
        if not model.training:
            model.train()
        with _autocast(device, dtype):
            logits = _logits(model(xs[i % ROTATE]))
        loss = F.cross_entropy(logits.float(), labels[i % ROTATE])
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    # Probes: one call of each mode, outside the timing (a refusing backend says why here; on a
    # GPU this also compiles the kernels and allocates AdamW's state).
    try:
        infer(0)
    except fastswin.BackendUnavailableError as e:
        return str(e)
    picked = ""
    if provider == "fastswin_auto":
        sel = sorted({fastswin.backends.last_selected(op) or "?" for op in _DISPATCHED[case.op]})
        picked = f"; auto->{'/'.join(sel)}"
    try:
        train_step(0)
        bwd = train_step
    except fastswin.BackendUnavailableError as e:
        bwd = f"train_step: {e}"
    # The row's FLOPs are the model's (the naive model's count: the same work for every
    # provider, as the other ops' analytic formulas); this provider's own count cross-checks it.
    flops = counted_flops(case, "naive", device, dtype, batch)
    own = flops if provider == "naive" else counted_flops(case, provider, device, dtype, batch, model=model)
    if flops is not None and own is not None and own != flops:
        print(f"  note: FlopCounterMode counts {own} for {case.op}/{provider} but {flops} for naive "
              "(an op without a flop formula on this device, e.g. SDPA's CPU kernel)")
    return Work(
        fwd=infer,
        fwd_bwd=bwd,
        flops=flops if flops is not None else (own or 0),
        bytes=float("nan"),  # no meaningful byte floor for a whole network
        shape=f"B{batch} 3x{side}x{side}{picked}",
    )
