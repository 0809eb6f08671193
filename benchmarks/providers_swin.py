"""Swin V1 / V2 providers. Every one times the same span:

    qkv (B, H, W, 3, heads, d), the qkv linear's output before any roll
      -> roll by -shift -> pad to a multiple of the window -> partition -> attention with the
         relative position bias (+ the -100 shift mask) -> reverse -> crop -> roll back
      -> (B, H, W, heads*d), the input of the output projection.

So the attention core from qkv to the pre-projection output, including every copy the provider's
path needs (a fused fastswin kernel needs none; the others pay roll/pad/partition/reverse). The
qkv and proj linears are outside it. Gathering the bias from the table (and for V2 its
``16*sigmoid``) is inside it: the table is a parameter and gets its gradient. What a model keeps
as a constant buffer is built once, outside the timing: timm's shift mask and relative index,
flex's block mask. (``naive``, fastswin's reference function, builds its mask on every call,
as that function does: nW*N*N elements, small next to the attention.)

Providers:

* ``naive`` -- ``fastswin.functional.shifted_window_attention[_v2](backend="reference")``, the
  timm math in eager PyTorch;
* ``fastswin_triton`` / ``fastswin_cuda`` / ``fastswin_auto`` -- the same function on that backend;
* ``timm`` (V1) -- timm's own ``WindowAttention`` (non-fused path) inside a transcription of
  ``SwinTransformerBlock._attn`` using timm's ``window_partition`` / ``window_reverse``; its
  ``qkv`` and ``proj`` linears are replaced by ``nn.Identity`` so it starts from qkv and stops
  before proj (the partitioned tensor carries the 3*C qkv channels instead of C);
* ``timm_sdpa`` (V1) -- the same with ``fused_attn = True`` (what ``TIMM_FUSED_ATTN=2`` selects):
  ``F.scaled_dot_product_attention`` with the bias + mask expanded to (B*nW, heads, N, N);
* ``flex`` (V1, V2) -- ``torch.compile(flex_attention)`` over each image's windows packed into
  one sequence of nW*N tokens: a block mask keeps attention inside a window, a ``score_mod``
  adds the relative bias and the shift mask (V2: scales cosine logits by the per-head
  multiplier; q and k are normalized before the call). The roll/pad/partition copies are eager.
  No backward on a CPU (flex has none there): that row is skipped with the reason.
"""
import math

import torch
import torch.nn.functional as F

import fastswin
from fastswin.reference import swin as ref

from . import flops as fl
from .cases import Case
from .providers_common import ROTATE, Work, backend_of, first_line, fwd_bwd, fwd_only, refusal

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)


def _geometry(case: Case):
    p = case.params
    return p["res"], p["heads"], p["head_dim"], p["window"], p["shift"], case.op == "swin_v2"


def _inputs(case: Case, device, dtype, batch, with_table=True):
    """ROTATE input sets: (qkv, table) for V1, (qkv, logit_scale, table) for V2; (qkv,) if not
    ``with_table`` (the table is then a module parameter)."""
    res, heads, d, m, _, v2 = _geometry(case)
    sets = []
    for _ in range(ROTATE):
        qkv = torch.randn(batch, res, res, 3, heads, d, device=device, dtype=dtype, requires_grad=True)
        if not with_table:
            sets.append((qkv,))
            continue
        table = (0.02 * torch.randn((2 * m - 1) ** 2, heads, device=device, dtype=dtype)).requires_grad_()
        if v2:
            scale = torch.log(10 * torch.ones(heads, 1, 1, device=device, dtype=dtype)).requires_grad_()
            sets.append((qkv, scale, table))
        else:
            sets.append((qkv, table))
    return sets


def _grads(case: Case, device, dtype, batch):
    res, heads, d = case.params["res"], case.params["heads"], case.params["head_dim"]
    return [torch.randn(batch, res, res, heads * d, device=device, dtype=dtype) for _ in range(ROTATE)]


def _work(case: Case, dtype, batch, fwd, bwd) -> Work:
    res, heads, d, m, s, _ = _geometry(case)
    elem = torch.finfo(dtype).bits // 8
    return Work(
        fwd=fwd,
        fwd_bwd=bwd,
        flops=fl.swin_window_attention(batch, res, heads, d, m),
        bytes=fl.swin_window_attention_bytes(batch, res, heads, d, m, elem),
        shape=f"B{batch} {res}x{res} h{heads} d{d} M{m} shift{s}",
    )


def _op_name(v2):
    return "shifted_window_attention_v2" if v2 else "shifted_window_attention"


# ---- naive and fastswin backends ------------------------------------------------------------


def fastswin_provider(case: Case, provider, device, dtype, batch) -> "Work | str":
    backend = backend_of(provider)
    _, _, _, m, s, v2 = _geometry(case)
    sets = _inputs(case, device, dtype, batch)
    if v2:
        def fn(qkv, scale, table):
            return fastswin.functional.shifted_window_attention_v2(qkv, scale, table, (m, m), (s, s), backend=backend)
    else:
        def fn(qkv, table):
            return fastswin.functional.shifted_window_attention(qkv, table, (m, m), (s, s), backend=backend)
    why = refusal(fn, sets[0], provider, _op_name(v2))
    if why:
        return why
    return _work(case, dtype, batch, fwd_only(fn, sets), fwd_bwd(fn, sets, _grads(case, device, dtype, batch)))


# ---- timm ------------------------------------------------------------------------------------


def timm_provider(case: Case, provider, device, dtype, batch) -> "Work | str":
    if case.op != "swin_v1":
        return f"{provider} is a Swin V1 peer (timm's V2 WindowAttention has no fused path and is the naive math)"
    try:
        import torch.nn as nn
        from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse
    except Exception as e:  # timm absent or changed
        return f"timm is not importable: {first_line(e)}"
    res, heads, d, m, s, _ = _geometry(case)
    c = heads * d
    n = m * m
    torch.manual_seed(0)
    mod = WindowAttention(c, heads, head_dim=d, window_size=m, qkv_bias=False)
    mod.qkv, mod.proj = nn.Identity(), nn.Identity()  # start at qkv, stop before proj
    mod.fused_attn = provider == "timm_sdpa"  # TIMM_FUSED_ATTN=2 semantics for this module
    mod = mod.to(device=device, dtype=dtype).eval()
    hp = -(-res // m) * m
    pad = hp - res
    # timm's block keeps this as a buffer (SwinTransformerBlock.get_attn_mask, same values).
    mask = ref.shift_attn_mask(hp, hp, (m, m), (s, s), device=device, dtype=dtype) if s else None

    def fn(qkv):  # SwinTransformerBlock._attn with the qkv linear moved before it
        b = qkv.shape[0]
        x = qkv.reshape(b, res, res, 3 * c)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, pad, 0, pad))  # timm pads unconditionally
        win = window_partition(x, (m, m)).view(-1, n, 3 * c)
        out = mod(win, mask=mask).view(-1, m, m, c)
        out = window_reverse(out, (m, m), hp, hp)[:, :res, :res, :].contiguous()
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out

    sets = _inputs(case, device, dtype, batch, with_table=False)
    try:
        with torch.no_grad():
            fn(*sets[0])
    except Exception as e:
        return f"timm's path failed here: {first_line(e)}"
    return _work(case, dtype, batch, fwd_only(fn, sets),
                 fwd_bwd(fn, sets, _grads(case, device, dtype, batch), mod.parameters()))


# ---- flex attention ----------------------------------------------------------------------------


def flex_provider(case: Case, provider, device, dtype, batch) -> "Work | str":
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:
        return f"torch.nn.attention.flex_attention is not available: {first_line(e)}"
    res, heads, d, m, s, v2 = _geometry(case)
    n = m * m
    hp = -(-res // m) * m
    pad = hp - res
    nw = (hp // m) ** 2
    seq = nw * n
    idx = ref.relative_position_index((m, m), device=device).view(-1)
    mask = ref.shift_attn_mask(hp, hp, (m, m), (s, s), device=device, dtype=dtype) if s else None
    try:
        block_mask = create_block_mask(lambda b, h, q, k: q // n == k // n, None, None, seq, seq, device=str(device))
    except Exception as e:
        return f"create_block_mask failed: {first_line(e)}"
    # A fresh dynamo cache per case: every case is a new shape, and the default recompile limit
    # (8) would otherwise drop later cases to flex's unfused eager path.
    torch._dynamo.reset()
    attend = torch.compile(flex_attention, dynamic=False)

    def core(qkv, table, logit_scale=None):
        b = qkv.shape[0]
        x = qkv.reshape(b, res, res, -1)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        win = ref.window_partition(x, (m, m)).view(b, seq, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = win.unbind(0)  # (B, heads, nW*N, d) each, windows packed along the sequence
        bias = table[idx].view(n, n, heads).permute(2, 0, 1)
        if v2:
            bias = ref.CPB_BIAS_SCALE * torch.sigmoid(bias)
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            mult = torch.clamp(logit_scale.reshape(-1), max=LOGIT_SCALE_MAX).exp()

        def score_mod(score, bi, h, qi, ki):
            qn, kn = qi % n, ki % n
            if v2:
                score = score * mult[h]
            score = score + bias[h, qn, kn]
            if mask is not None:
                score = score + mask[qi // n, qn, kn]
            return score

        out = attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0 if v2 else None)
        out = out.transpose(1, 2).reshape(b * nw, m, m, heads * d)
        out = ref.window_reverse(out, (m, m), hp, hp)[:, :res, :res, :].contiguous()
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out

    if v2:
        def fn(qkv, scale, table):
            return core(qkv, table, scale)
    else:
        def fn(qkv, table):
            return core(qkv, table)

    sets = _inputs(case, device, dtype, batch)
    if device.type == "cpu":  # flex refuses inputs that require grad on a CPU, even under no_grad
        sets = [tuple(t.detach() for t in st) for st in sets]
    grads = _grads(case, device, dtype, batch)
    try:  # compiles here, outside the timing
        with torch.no_grad():
            fn(*sets[0])
    except Exception as e:
        return f"flex_attention (compiled) failed on {device.type}: {first_line(e)}"
    bwd = fwd_bwd(fn, sets, grads)
    if device.type == "cpu":
        bwd = "flex_attention has no backward on a CPU"
    else:
        try:
            bwd(0)
        except Exception as e:
            bwd = f"flex_attention backward failed: {first_line(e)}"
    return _work(case, dtype, batch, fwd_only(fn, sets), bwd)


PROVIDERS = {
    "swin_v1": ["naive", "timm", "timm_sdpa", "fastswin_triton", "fastswin_cuda", "fastswin_auto", "flex"],
    "swin_v2": ["naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto", "flex"],
}


def build(case: Case, provider, device, dtype, batch) -> "Work | str":
    if provider in ("timm", "timm_sdpa"):
        return timm_provider(case, provider, device, dtype, batch)
    if provider == "flex":
        return flex_provider(case, provider, device, dtype, batch)
    if backend_of(provider) is None:
        return f"provider {provider!r} is not implemented for {case.op}"
    return fastswin_provider(case, provider, device, dtype, batch)
