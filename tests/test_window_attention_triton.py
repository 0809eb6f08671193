"""Triton Swin V1 / V2 window attention (windowed and block-level entries) against float64 PyTorch.

Runs on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (set before pytest starts; the
conftest skips these tests otherwise). Shapes are tiny because the interpreter costs ~3 ms per
program: the whole file is meant to stay well under 3 minutes on 2 CPU cores.

Oracle: ``fastswin.reference.swin`` (itself checked against timm and hand loops in
``test_swin_reference.py``); the V1 windowed tests fall back to an inline timm formula if the
reference module is missing. A few tests also go end to end against timm's blocks.

Tolerances: float64 1e-10; float32 1e-5 relative to the largest magnitude (no tf32 on the
interpreter; on a GPU with ``allow_tf32`` the error rule below applies instead); float16 the
DESIGN.md error rule: at most 2x (outputs) / 3x (gradients) the error of the PyTorch reference
run in float16, against float64, plus a 1e-4 floor.
"""
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.triton

F64 = torch.float64
F16 = torch.float16


# ---- helpers -----------------------------------------------------------------------------------

def _ops():
    from fastswin.ops import window_attention_triton as W

    return W


def _kern():
    return _ops()._kernels()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output buffer starts as NaN, so an element the kernels skip cannot pass silently."""
    monkeypatch.setattr(_kern(), "POISON", True)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def inline_reference(q, k, v, table, window, mask=None, scale=None):
    """timm ``WindowAttention`` (non-fused branch) on pre-split q, k, v."""
    from timm.models.swin_transformer import get_relative_position_index

    mh, mw = window
    bw, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    idx = get_relative_position_index(mh, mw, device=q.device).view(-1)
    bias = table[idx].view(n, n, h).permute(2, 0, 1)
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(-1, nw, h, n, n) + mask[None, :, None]).view(bw, h, n, n)
    return attn.softmax(-1).to(v.dtype) @ v


def _ref():
    try:
        from fastswin.reference import swin
    except ImportError:
        return None
    return swin


def ref_v1(q, k, v, table, window, mask=None, scale=None):
    swin = _ref()
    if swin is None:
        return inline_reference(q, k, v, table, window, mask, scale)
    return swin.window_attention(q, k, v, table, window, mask, scale)


def _need_ref():
    swin = _ref()
    if swin is None:
        pytest.skip("fastswin.reference.swin not written yet")
    return swin


def _randn(*shape, dtype=F64, scale=1.0):
    return (torch.randn(*shape, dtype=F64, device=_device()) * scale).to(dtype)


def make_windows(bw, heads, window, d, dtype, nw=None, aux_dtype=None):
    """q, k, v as timm makes them: slices of one (BW, N, 3, heads, d) linear output, permuted
    (non-contiguous); a random table; a 0 / -100 mask plus noise, as a transposed view (or None)."""
    mh, mw = window
    n = mh * mw
    qkv = _randn(bw, n, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    aux = aux_dtype or dtype
    table = _randn((2 * mh - 1) * (2 * mw - 1), heads, dtype=aux, scale=2.0)
    mask = None
    if nw is not None:
        m = torch.where(torch.rand(nw, n, n, device=q.device) < 0.3, -100.0, 0.0).double() + 0.1 * _randn(nw, n, n)
        mask = m.transpose(1, 2).contiguous().transpose(1, 2).to(aux)
    return q, k, v, table, mask


def make_block(B, H, W, heads, window, d, dtype, pad=True, aux_dtype=None):
    """qkv (B, H, W, 3, heads, d) as a non-contiguous view (a transposed (B, W, H, ...) buffer),
    a table and pad_qkv (the linear's bias) or None."""
    mh, mw = window
    qkv = _randn(B, W, H, 3, heads, d, dtype=dtype).transpose(1, 2)
    aux = aux_dtype or dtype
    table = _randn((2 * mh - 1) * (2 * mw - 1), heads, dtype=aux, scale=2.0)
    pad_qkv = _randn(3, heads, d, dtype=aux) if pad else None
    return qkv, table, pad_qkv


def logit_scale_for(heads, dtype):
    """timm's (heads, 1, 1) parameter; head 0 above log(100), so its clamp is exercised."""
    ls = torch.log(10 * torch.rand(heads, 1, 1, dtype=F64, device=_device()) + 1)
    ls[0] = math.log(100) + 0.5
    return ls.to(dtype)


def run(fn, inputs, grad_mask, go):
    """out and the gradients of ``inputs[i]`` for i with grad_mask[i] (None elsewhere)."""
    xs = [x.detach().clone().requires_grad_() if (m and x is not None) else x for x, m in zip(inputs, grad_mask)]
    out = fn(*xs)
    out.backward(go)
    return [out.detach()] + [x.grad if (m and x is not None) else None for x, m in zip(xs, grad_mask)]


def _to(x, dtype):
    return None if x is None or not torch.is_tensor(x) else x.detach().to(dtype)


def compare(fn, ref_fn, inputs, grad_mask, go=None, names=None):
    """fn (Triton) vs ref_fn (PyTorch) on ``inputs``: output and gradients, with the tolerances
    in the module docstring. Returns Triton's results."""
    dtype = inputs[0].dtype
    if go is None:
        probe = fn(*[x.detach() if torch.is_tensor(x) else x for x in inputs])
        go = torch.randn(probe.shape, dtype=F64, device=probe.device).to(dtype)
    got = run(fn, inputs, grad_mask, go)
    exact = run(ref_fn, [_to(x, F64) if torch.is_tensor(x) else x for x in inputs], grad_mask, go.to(F64))
    names = names or ["out"] + [f"grad[{i}]" for i in range(len(inputs))]
    low = None
    if dtype not in (F64, torch.float32) or (inputs[0].is_cuda and torch.backends.cuda.matmul.allow_tf32):
        low = run(ref_fn, inputs, grad_mask, go)
    for i, (name, a, b) in enumerate(zip(names, got, exact)):
        if a is None and b is None:
            continue
        if b is None:  # e.g. pad_qkv unused by the reference: our gradient must be 0
            assert not a.any(), name
            continue
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err = (a.double() - b).abs().max().item()
        mag = b.abs().max().item()
        if low is None:
            tol = 1e-10 * max(mag, 1.0) if dtype == F64 else 1e-5 * max(mag, 1.0)
            assert err <= tol, f"{name}: max error {err:.3g} vs magnitude {mag:.3g}"
        else:
            err_pt = (low[i].double() - b).abs().max().item()
            factor = 2 if i == 0 else 3
            assert err <= factor * err_pt + 1e-4 * max(mag, 1.0), (
                f"{name}: error {err:.3g} > {factor} x PyTorch's {err_pt:.3g} (magnitude {mag:.3g})")
    return got


V1_NAMES = ("out", "dq", "dk", "dv", "dtable")


def compare_v1(q, k, v, table, window, mask, scale, go=None):
    W = _ops()
    return compare(lambda a, b, c, t: W.window_attention_triton(a, b, c, t, window, mask, scale),
                   lambda a, b, c, t: ref_v1(a, b, c, t, window, mask, scale),
                   [q, k, v, table], [True] * 4, go, V1_NAMES)


# ---- V1 windowed: forward + backward vs the oracle --------------------------------------------------

CASES = [
    # (bw, heads, window, d, nW)
    (2, 2, (7, 7), 16, 2),
    (4, 1, (3, 5), 32, 2),   # non-square window, mask repeats every 2 windows
    (1, 2, (4, 4), 16, None),
    (2, 1, (4, 4), 24, 1),   # head_dim not a power of two (padded to 32)
]


@pytest.mark.parametrize("dtype", [F64, torch.float32, F16], ids=str)
@pytest.mark.parametrize("bw,heads,window,d,nw", CASES)
def test_v1_windowed(seed, dtype, bw, heads, window, d, nw):
    q, k, v, table, mask = make_windows(bw, heads, window, d, dtype, nw)
    compare_v1(q, k, v, table, window, mask, None)


def test_v1_custom_scale_float32_table_with_float16_qkv(seed):
    """AMP-like: fp16 activations, fp32 table and mask (the table's gradient stays fp32)."""
    q, k, v, table, mask = make_windows(2, 2, (4, 4), 16, F16, nw=2, aux_dtype=torch.float32)
    got = compare_v1(q, k, v, table, (4, 4), mask, 0.3)
    assert got[4].dtype == torch.float32


def test_v1_bool_mask(seed):
    """A bool mask adds 1.0 where True (timm's ``attn + mask`` after promotion)."""
    q, k, v, table, _ = make_windows(2, 1, (3, 5), 16, torch.float32)
    mask = torch.rand(2, 15, 15, device=q.device) < 0.5
    W = _ops()
    torch.testing.assert_close(W.window_attention_triton(q, k, v, table, (3, 5), mask),
                               inline_reference(q, k, v, table, (3, 5), mask.float()), rtol=1e-5, atol=1e-5)


def test_v1_expanded_grad_out(seed):
    """A stride-0 grad (what opcheck's aot_dispatch test and ``out.sum().backward()`` produce)."""
    q, k, v, table, mask = make_windows(2, 2, (3, 5), 16, F64, nw=2)
    go = _randn(1, 1, 1, 16).expand(q.shape)
    compare_v1(q, k, v, table, (3, 5), mask, None, go=go)


def test_v1_large_window_default_tiles(seed):
    """12 x 12 = 144 tokens: three 64-token key blocks with the default tiles."""
    q, k, v, table, mask = make_windows(1, 1, (12, 12), 32, torch.float32, nw=1)
    compare_v1(q, k, v, table, (12, 12), mask, None)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("window,nw", [((7, 7), 1), ((3, 5), None)])
def test_v1_tiled_path(seed, monkeypatch, dtype, window, nw):
    """Tiles smaller than the window: online softmax over several key blocks, the separate dq
    kernel, several programs adding into one table row."""
    monkeypatch.setattr(_kern(), "MAX_BLOCK", 16)
    q, k, v, table, mask = make_windows(1, 1, window, 16, dtype, nw)
    compare_v1(q, k, v, table, window, mask, None)


def test_v1_table_partials_shared_rows(seed, monkeypatch):
    """Scratch cap forcing one partial-table row for every window (cross-program atomics)."""
    monkeypatch.setattr(_kern(), "_SCRATCH_ELEMS", 1)
    q, k, v, table, mask = make_windows(3, 2, (4, 4), 16, F64, nw=3)
    compare_v1(q, k, v, table, (4, 4), mask, None)


def test_v1_no_table_grad(seed):
    """Table without requires_grad: the backward skips the table reduction (DTAB_MODE 0)."""
    W = _ops()
    q, k, v, table, mask = make_windows(2, 1, (4, 4), 16, F64, nw=1)
    q = q.detach().requires_grad_()
    go = _randn(*q.shape)
    W.window_attention_triton(q, k, v, table, (4, 4), mask).backward(go)
    q2 = q.detach().requires_grad_()
    inline_reference(q2, k, v, table, (4, 4), mask).backward(go)
    assert table.grad is None
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-10, atol=1e-10)


def test_inline_formula_matches_reference(seed):
    """The fallback oracle agrees with fastswin.reference (when both exist)."""
    swin = _need_ref()
    q, k, v, table, mask = make_windows(2, 2, (3, 5), 8, F64, nw=2)
    torch.testing.assert_close(inline_reference(q, k, v, table, (3, 5), mask),
                               swin.window_attention(q, k, v, table, (3, 5), mask), rtol=1e-12, atol=1e-12)


# ---- V2 windowed --------------------------------------------------------------------------------

V2_NAMES = ("out", "dq", "dk", "dv", "dlogit_scale", "dtable")


@pytest.mark.parametrize("dtype", [F64, torch.float32, F16], ids=str)
@pytest.mark.parametrize("bw,heads,window,d,nw", [(2, 2, (7, 7), 16, 2), (2, 2, (3, 5), 32, None)])
def test_v2_windowed(seed, dtype, bw, heads, window, d, nw):
    swin = _need_ref()
    W = _ops()
    aux = torch.float32 if dtype == F16 else dtype
    q, k, v, table, mask = make_windows(bw, heads, window, d, dtype, nw, aux_dtype=aux)
    ls = logit_scale_for(heads, aux)
    compare(lambda a, b, c, s, t: W.window_attention_v2_triton(a, b, c, s, t, window, mask),
            lambda a, b, c, s, t: swin.window_attention_v2(a, b, c, s, t, window, mask),
            [q, k, v, ls, table], [True] * 5, names=V2_NAMES)


def test_v2_windowed_tiled(seed, monkeypatch):
    swin = _need_ref()
    W = _ops()
    monkeypatch.setattr(_kern(), "MAX_BLOCK", 16)
    q, k, v, table, mask = make_windows(1, 1, (5, 5), 16, F64, nw=1)
    ls = logit_scale_for(1, F64) * 0 + 1.5
    compare(lambda a, b, c, s, t: W.window_attention_v2_triton(a, b, c, s, t, (5, 5), mask),
            lambda a, b, c, s, t: swin.window_attention_v2(a, b, c, s, t, (5, 5), mask),
            [q, k, v, ls, table], [True] * 5, names=V2_NAMES)


# ---- block level (shift / pad / partition in the kernel's addressing) ------------------------------

BLOCK_CASES = [
    # (B, H, W, heads, window, shift, pad)
    (1, 5, 7, 2, (3, 3), (1, 1), True),    # padding on both sides, shifted
    (2, 4, 6, 1, (4, 4), (2, 2), True),    # padding rows only
    (1, 7, 7, 2, (3, 5), (0, 2), True),    # non-square window, shift in one direction only
    (1, 6, 5, 1, (2, 3), (1, 0), False),   # padding with zeros (no pad_qkv)
    (1, 4, 4, 1, (4, 4), (0, 0), True),    # one window, no shift, no padding (pad_qkv unused)
    (1, 3, 2, 1, (4, 4), (2, 2), True),    # window larger than the map (always_partition)
]
BLOCK_NAMES = ("out", "dqkv", "dtable", "dpad_qkv")


def _block_v1(window, shift, scale=None):
    W = _ops()
    return lambda x, t, p: W.shifted_window_attention_triton(x, t, window, shift, scale, p)


def _block_v1_ref(window, shift, scale=None):
    swin = _need_ref()
    return lambda x, t, p: swin.shifted_window_attention(x, t, window, shift, scale, p)


@pytest.mark.parametrize("B,H,W,heads,window,shift,pad", BLOCK_CASES)
def test_v1_block_float64(seed, B, H, W, heads, window, shift, pad):
    qkv, table, pad_qkv = make_block(B, H, W, heads, window, 16, F64, pad)
    compare(_block_v1(window, shift), _block_v1_ref(window, shift), [qkv, table, pad_qkv], [True] * 3,
            names=BLOCK_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, F16], ids=str)
def test_v1_block_low_precision(seed, dtype):
    aux = torch.float32 if dtype == F16 else dtype
    qkv, table, pad_qkv = make_block(2, 5, 6, 2, (4, 4), 32, dtype, aux_dtype=aux)
    compare(_block_v1((4, 4), (2, 2), 0.2), _block_v1_ref((4, 4), (2, 2), 0.2), [qkv, table, pad_qkv],
            [True] * 3, names=BLOCK_NAMES)


def test_v1_block_tiled(seed, monkeypatch):
    monkeypatch.setattr(_kern(), "MAX_BLOCK", 16)
    qkv, table, pad_qkv = make_block(1, 6, 8, 1, (5, 5), 16, F64)
    compare(_block_v1((5, 5), (2, 2)), _block_v1_ref((5, 5), (2, 2)), [qkv, table, pad_qkv], [True] * 3,
            names=BLOCK_NAMES)


@pytest.mark.parametrize("B,H,W,heads,window,shift,pad", [BLOCK_CASES[0], BLOCK_CASES[2], BLOCK_CASES[3]])
def test_v2_block_float64(seed, B, H, W, heads, window, shift, pad):
    swin = _need_ref()
    Wt = _ops()
    qkv, table, pad_qkv = make_block(B, H, W, heads, window, 16, F64, pad)
    ls = logit_scale_for(heads, F64)
    compare(lambda x, s, t, p: Wt.shifted_window_attention_v2_triton(x, s, t, window, shift, p),
            lambda x, s, t, p: swin.shifted_window_attention_v2(x, s, t, window, shift, p),
            [qkv, ls, table, pad_qkv], [True] * 4, names=("out", "dqkv", "dlogit_scale", "dtable", "dpad_qkv"))


def test_v2_block_float16(seed):
    swin = _need_ref()
    Wt = _ops()
    qkv, table, pad_qkv = make_block(1, 5, 6, 2, (4, 4), 32, F16, aux_dtype=torch.float32)
    ls = logit_scale_for(2, torch.float32)
    compare(lambda x, s, t, p: Wt.shifted_window_attention_v2_triton(x, s, t, (4, 4), (2, 2), p),
            lambda x, s, t, p: swin.shifted_window_attention_v2(x, s, t, (4, 4), (2, 2), p),
            [qkv, ls, table, pad_qkv], [True] * 4, names=("out", "dqkv", "dlogit_scale", "dtable", "dpad_qkv"))


def test_v1_block_vs_timm(seed):
    """End to end against timm's SwinTransformerBlock._attn (padding + shift), float64."""
    from timm.models.swin_transformer import SwinTransformerBlock

    W = _ops()
    blk = SwinTransformerBlock(32, (7, 9), num_heads=2, window_size=4, shift_size=2, dtype=F64).eval()
    blk.attn.fused_attn = False
    with torch.no_grad():
        for p in blk.attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    a = blk.attn
    x = torch.randn(2, 7, 9, 32, dtype=F64)
    qkv = F.linear(x, a.qkv.weight, a.qkv.bias).view(2, 7, 9, 3, 2, -1)
    out = W.shifted_window_attention_triton(qkv, a.relative_position_bias_table, blk.window_size, blk.shift_size,
                                            a.scale, a.qkv.bias.view(3, 2, -1))
    torch.testing.assert_close(F.linear(out, a.proj.weight, a.proj.bias), blk._attn(x), rtol=1e-10, atol=1e-10)


def test_v2_block_vs_timm(seed):
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    W = _ops()
    blk = SwinTransformerV2Block(32, (7, 9), num_heads=2, window_size=4, shift_size=2, dtype=F64).eval()
    with torch.no_grad():
        for p in blk.attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    a = blk.attn
    x = torch.randn(2, 7, 9, 32, dtype=F64)
    bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
    qkv = F.linear(x, a.qkv.weight, bias).view(2, 7, 9, 3, 2, -1)
    table = a.cpb_mlp(a.relative_coords_table).view(-1, 2)
    out = W.shifted_window_attention_v2_triton(qkv, a.logit_scale, table, blk.window_size, blk.shift_size,
                                               bias.view(3, 2, -1))
    torch.testing.assert_close(F.linear(out, a.proj.weight, a.proj.bias), blk._attn(x), rtol=1e-10, atol=1e-10)


# ---- deterministic mode ------------------------------------------------------------------------

def _deterministic_twice(fn, inputs, grad_mask, go):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return run(fn, inputs, grad_mask, go), run(fn, inputs, grad_mask, go)
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("scratch", [None, 1], ids=["one-chunk", "window-by-window"])
def test_deterministic_bitwise_windowed(seed, monkeypatch, scratch):
    if scratch is not None:
        monkeypatch.setattr(_kern(), "_SCRATCH_ELEMS", scratch)  # one window per launch
    W = _ops()
    q, k, v, table, mask = make_windows(3, 2, (3, 5), 16, torch.float32, nw=3)
    fn = lambda a, b, c, t: W.window_attention_triton(a, b, c, t, (3, 5), mask)  # noqa: E731
    go = _randn(*q.shape, dtype=q.dtype)
    a, b = _deterministic_twice(fn, [q, k, v, table], [True] * 4, go)
    for name, x, y in zip(V1_NAMES, a, b):
        assert torch.equal(x, y), name
    # same values as the default (atomic) path, and right
    fast = run(fn, [q, k, v, table], [True] * 4, go)
    exact = run(lambda a_, b_, c_, t_: inline_reference(a_, b_, c_, t_, (3, 5), mask.double()),
                [_to(x, F64) for x in (q, k, v, table)], [True] * 4, go.double())
    for name, x, y, z in zip(V1_NAMES, a, fast, exact):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(x.double(), z, rtol=1e-5, atol=1e-5, msg=name)


def test_deterministic_bitwise_block_v2(seed):
    W = _ops()
    qkv, table, pad_qkv = make_block(1, 5, 7, 2, (3, 3), 16, torch.float32)
    ls = logit_scale_for(2, torch.float32)
    fn = lambda x, s, t, p: W.shifted_window_attention_v2_triton(x, s, t, (3, 3), (1, 1), p)  # noqa: E731
    go = _randn(1, 5, 7, 32, dtype=torch.float32)
    a, b = _deterministic_twice(fn, [qkv, ls, table, pad_qkv], [True] * 4, go)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    fast = run(fn, [qkv, ls, table, pad_qkv], [True] * 4, go)
    for x, y in zip(a, fast):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ---- torch.library: opcheck, gradcheck, compile ------------------------------------------------

def _opcheck(op, args, grad=True):
    """opcheck; for backward ops (grad=False) every tensor argument is detached (no double backward)."""
    if not grad:
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_v1_fwd(seed, with_mask):
    q, k, v, table, mask = make_windows(2, 2, (4, 4), 16, F64, nw=2 if with_mask else None)
    _opcheck(torch.ops.fastswin.window_attention_triton_fwd.default,
             (q.requires_grad_(), k, v, table.requires_grad_(), 4, 4, mask, 0.25))


@pytest.mark.parametrize("need_dtable", [False, True])
def test_opcheck_v1_bwd(seed, need_dtable):
    q, k, v, table, mask = make_windows(2, 1, (3, 5), 16, torch.float32, nw=1)
    out, lse = _kern().window_attention_fwd(q, k, v, table, (3, 5), mask, 0.25)
    _opcheck(torch.ops.fastswin.window_attention_triton_bwd.default,
             (torch.randn_like(out), q, k, v, table, out, lse, 3, 5, mask, 0.25, need_dtable), grad=False)


def test_opcheck_v2(seed):
    q, k, v, table, mask = make_windows(2, 1, (3, 5), 16, F64, nw=2)
    mult = torch.rand(1, dtype=F64) * 5 + 1
    _opcheck(torch.ops.fastswin.window_attention_v2_triton_fwd.default,
             (q.requires_grad_(), k, v, mult.requires_grad_(), table.requires_grad_(), 3, 5, mask))
    out, lse = _kern().window_attention_fwd(q, k, v, table, (3, 5), mask, None, mult)
    _opcheck(torch.ops.fastswin.window_attention_v2_triton_bwd.default,
             (torch.randn_like(out), q, k, v, mult, table, out, lse, 3, 5, mask, True), grad=False)


@pytest.mark.parametrize("pad", [False, True])
def test_opcheck_block_v1(seed, pad):
    qkv, table, pad_qkv = make_block(1, 5, 6, 2, (4, 4), 16, F64, pad)
    args = (qkv.requires_grad_(), table.requires_grad_(), 4, 4, 2, 2,
            None if pad_qkv is None else pad_qkv.requires_grad_(), 0.25)
    _opcheck(torch.ops.fastswin.shifted_window_attention_triton_fwd.default, args)
    out, lse = _kern().shifted_window_attention_fwd(qkv, table, (4, 4), (2, 2), 0.25, pad_qkv)
    _opcheck(torch.ops.fastswin.shifted_window_attention_triton_bwd.default,
             (torch.randn_like(out), qkv, table, out, lse, 4, 4, 2, 2, pad_qkv, 0.25, True, pad), grad=False)


def test_opcheck_block_v2(seed):
    qkv, table, pad_qkv = make_block(1, 5, 6, 1, (4, 4), 16, F64)
    mult = torch.rand(1, dtype=F64) * 5 + 1
    _opcheck(torch.ops.fastswin.shifted_window_attention_v2_triton_fwd.default,
             (qkv.requires_grad_(), mult.requires_grad_(), table.requires_grad_(), 4, 4, 2, 2,
              pad_qkv.requires_grad_()))
    out, lse = _kern().shifted_window_attention_fwd(qkv, table, (4, 4), (2, 2), None, pad_qkv, mult)
    _opcheck(torch.ops.fastswin.shifted_window_attention_v2_triton_bwd.default,
             (torch.randn_like(out), qkv, mult, table, out, lse, 4, 4, 2, 2, pad_qkv, True, True), grad=False)


def test_gradcheck_v1_windowed(seed):
    """Numerical vs analytical Jacobian through the interpreted kernels (tiny: 2x3 window)."""
    W = _ops()
    q, k, v, table, mask = make_windows(2, 1, (2, 3), 3, F64, nw=2)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    assert torch.autograd.gradcheck(lambda a, b, c, t: W.window_attention_triton(a, b, c, t, (2, 3), mask, 0.7), args,
                                    fast_mode=True)  # full mode: same verdict, 25 s under the interpreter


def test_gradcheck_v2_block(seed):
    """Shift, padding with pad_qkv, cosine normalisation, logit scale: all in one small Jacobian."""
    W = _ops()
    qkv, table, pad_qkv = make_block(1, 3, 3, 1, (2, 2), 2, F64)
    ls = torch.tensor([[[0.7]]], dtype=F64)
    args = [t.detach().clone().requires_grad_() for t in (qkv, ls, table, pad_qkv)]
    assert torch.autograd.gradcheck(
        lambda x, s, t, p: W.shifted_window_attention_v2_triton(x, s, t, (2, 2), (1, 1), p), args, fast_mode=True)


def test_compile_fullgraph(seed):
    W = _ops()
    q, k, v, table, mask = make_windows(2, 1, (4, 4), 16, torch.float32, nw=2)

    def f(a, b, c, t):
        return W.window_attention_triton(a, b, c, t, (4, 4), mask)

    go = _randn(*q.shape, dtype=q.dtype)
    eager = run(f, [q, k, v, table], [True] * 4, go)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"), [q, k, v, table], [True] * 4, go)
    for name, x, y in zip(V1_NAMES, eager, compiled):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_compile_fullgraph_block_v2(seed):
    W = _ops()
    qkv, table, pad_qkv = make_block(1, 5, 6, 1, (4, 4), 16, torch.float32)
    ls = logit_scale_for(1, torch.float32)

    def f(x, s, t, p):
        return W.shifted_window_attention_v2_triton(x, s, t, (4, 4), (2, 2), p)

    go = _randn(1, 5, 6, 16, dtype=torch.float32)
    eager = run(f, [qkv, ls, table, pad_qkv], [True] * 4, go)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"), [qkv, ls, table, pad_qkv], [True] * 4, go)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# ---- backend table -----------------------------------------------------------------------------

def test_backends_registered_and_reasons():
    from fastswin import backends

    W = _ops()
    q, k, v, table, mask = make_windows(2, 1, (4, 4), 16, torch.float32, nw=1)
    impl = backends.select("window_attention", "triton", q, k, v, table, (4, 4), mask)
    assert impl.fn is W.window_attention_triton
    qkv, btab, pad = make_block(1, 4, 4, 1, (4, 4), 16, torch.float32)
    ls = logit_scale_for(1, torch.float32)
    assert backends.select("window_attention_v2", "triton", q, k, v, ls, table, (4, 4), mask).fn \
        is W.window_attention_v2_triton
    assert backends.select("shifted_window_attention", "triton", qkv, btab, (4, 4), (0, 0), None, pad).fn \
        is W.shifted_window_attention_triton
    assert backends.select("shifted_window_attention_v2", "triton", qkv, ls, btab, (4, 4), (0, 0), pad).fn \
        is W.shifted_window_attention_v2_triton
    assert W._reasons(q, k, v, table, (4, 4), mask) == []
    wide = torch.randn(2, 1, 16, 160, device=q.device)
    assert any("head_dim" in r for r in W._reasons(wide, wide, wide, table, (4, 4)))
    if q.device.type == "cpu":
        assert W._auto_reasons(q, k, v, table, (4, 4)) != []
        bf = q.to(torch.bfloat16)
        assert any("bfloat16" in r for r in W._reasons(bf, bf, bf, table, (4, 4)))
        with pytest.raises(backends.BackendUnavailableError, match="bfloat16"):
            W.window_attention_triton(bf, bf, bf, table, (4, 4))
        with pytest.raises(backends.BackendUnavailableError, match="bfloat16"):
            W.shifted_window_attention_triton(qkv.to(torch.bfloat16), btab, (4, 4), (0, 0))
    else:
        d = q.double()
        assert any("float64" in r for r in W._reasons(d, d, d, table.double(), (4, 4)))


def test_bad_inputs():
    W = _ops()
    q, k, v, table, mask = make_windows(2, 1, (4, 4), 16, torch.float32, nw=2)
    with pytest.raises(ValueError, match="window_size"):
        W.window_attention_triton(q, k, v, table, (3, 5), mask)
    with pytest.raises(ValueError, match="rel_pos_table"):
        W.window_attention_triton(q, k, v, table[:-1], (4, 4), mask)
    with pytest.raises(ValueError, match="mask"):
        W.window_attention_triton(q, k, v, table, (4, 4), torch.zeros(3, 16, 16, device=q.device))
    with pytest.raises(ValueError, match="k"):
        W.window_attention_triton(q, k[:1], v, table, (4, 4), mask)
    qkv, btab, pad = make_block(1, 4, 4, 1, (4, 4), 16, torch.float32)
    with pytest.raises(ValueError, match="shift_size"):
        W.shifted_window_attention_triton(qkv, btab, (4, 4), (4, 0), None, pad)
    with pytest.raises(ValueError, match="pad_qkv"):
        W.shifted_window_attention_triton(qkv, btab, (4, 4), (2, 2), None, pad[:2])


def test_functional_dispatch(seed):
    """Through the public entries, once ``fastswin.functional.window_attention`` exists."""
    try:
        import fastswin.functional.window_attention  # noqa: F401
        import fastswin.functional as fw
    except ImportError:
        pytest.skip("fastswin.functional.window_attention not written yet")
    _ops()  # registers the Triton backend
    q, k, v, table, mask = make_windows(2, 2, (4, 4), 16, F64, nw=2)
    out = fw.window_attention(q, k, v, table, (4, 4), mask, backend="triton")
    torch.testing.assert_close(out, inline_reference(q, k, v, table, (4, 4), mask), rtol=1e-10, atol=1e-10)
    qkv, btab, pad = make_block(1, 5, 6, 2, (4, 4), 16, F64)
    out = fw.shifted_window_attention(qkv, btab, (4, 4), (2, 2), None, pad, backend="triton")
    torch.testing.assert_close(out, fw.shifted_window_attention(qkv, btab, (4, 4), (2, 2), None, pad,
                                                                backend="reference"), rtol=1e-10, atol=1e-10)
