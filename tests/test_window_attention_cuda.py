"""CUDA C++ Swin V1 / V2 window attention (``backend="cuda"``), both entries, against the reference.

CPU tier (always): the op schemas exist when the extension is built; ``backend="cuda"`` on CPU
tensors raises :class:`BackendUnavailableError` naming the reason; ``auto`` never picks the
CUDA kernels (they are unverified); the fake kernels give the right shapes (FakeTensorMode).
``torch.library.opcheck`` needs the real kernel, hence a GPU: GPU tier only.

GPU tier (``@pytest.mark.gpu``): forward and every gradient vs the float64 reference by the
DESIGN.md error rule (``compare`` from ``test_window_attention_triton``: 2x / 3x PyTorch's own
low-precision error; float32 within 1e-5 relative -- the fp32 path is plain FMA, no tf32), both
entries, V1 / V2, windows 7 / 8 / 12 / 16 / 24 (the last three tiled over keys), d 32 / 64 (and
a few odd / 128 head dims), fp16 / bf16 / fp32, padded sizes, deterministic mode bitwise, opcheck.
"""
import math

import pytest
import torch

from test_window_attention_triton import compare, logit_scale_for, make_block, make_windows, run

F64 = torch.float64
LOW = (torch.float16, torch.bfloat16, torch.float32)


def _mod():
    from fastswin.ops import window_attention_cuda as C

    return C


def _ext():
    from fastswin import _extension

    return _extension


def _need_ops():
    if not _mod().AVAILABLE:
        pytest.skip("fastswin._C with the CUDA window-attention ops is not built")


def _need_cuda_build():
    _need_ops()
    if not _ext().has_cuda_kernels():
        pytest.skip("fastswin._C was built without CUDA kernels")


def _ref():
    from fastswin.reference import swin

    return swin


# ---- CPU tier ------------------------------------------------------------------------------------

OP_NAMES = ("window_attention_cuda_fwd", "window_attention_cuda_bwd",
            "shifted_window_attention_cuda_fwd", "shifted_window_attention_cuda_bwd")


def test_schemas_exist_when_built():
    if not _ext().available():
        pytest.skip("fastswin._C is not built")
    for name in OP_NAMES:
        assert hasattr(torch.ops.fastswin, name), name
    assert _mod().AVAILABLE


def test_registered_for_all_four_ops():
    from fastswin import backends
    import fastswin.functional.window_attention  # noqa: F401  (registers every backend)

    C = _mod()
    fns = (C.window_attention_cuda, C.window_attention_v2_cuda, C.shifted_window_attention_cuda,
           C.shifted_window_attention_v2_cuda)
    for op, fn in zip(("window_attention", "window_attention_v2", "shifted_window_attention",
                       "shifted_window_attention_v2"), fns):
        assert backends._REGISTRY[op]["cuda"].fn is fn


def test_signatures_match_triton():
    import inspect

    from fastswin.ops import window_attention_triton as T

    C = _mod()
    for a, b in ((C.window_attention_cuda, T.window_attention_triton),
                 (C.window_attention_v2_cuda, T.window_attention_v2_triton),
                 (C.shifted_window_attention_cuda, T.shifted_window_attention_triton),
                 (C.shifted_window_attention_v2_cuda, T.shifted_window_attention_v2_triton)):
        assert str(inspect.signature(a)) == str(inspect.signature(b)), a.__name__


def _cpu_windows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 16, generator=g) for _ in range(3))
    table = torch.randn(49, 2, generator=g)
    return q, k, v, table


def test_cpu_tensors_refused_by_name():
    import fastswin.functional as fw
    from fastswin import backends

    q, k, v, table = _cpu_windows()
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors only"):
        fw.window_attention(q, k, v, table, (4, 4), backend="cuda")
    ls = torch.zeros(2, 1, 1)
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors only"):
        fw.window_attention_v2(q, k, v, ls, table, (4, 4), backend="cuda")
    qkv = torch.randn(1, 5, 6, 3, 2, 16)
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors only"):
        fw.shifted_window_attention(qkv, table, (4, 4), (2, 2), backend="cuda")
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors only"):
        fw.shifted_window_attention_v2(qkv, ls, table, (4, 4), (2, 2), backend="cuda")
    # the public function itself refuses too (direct call)
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors only"):
        _mod().window_attention_cuda(q, k, v, table, (4, 4))


def test_reasons_list_dtype_and_head_dim():
    C = _mod()
    q, k, v, table = _cpu_windows()
    d = q.double()
    assert any("float64" in r for r in C._reasons(d, d, d, table.double(), (4, 4)))
    wide = torch.randn(2, 2, 16, 160)
    assert any("head_dim" in r for r in C._reasons(wide, wide, wide, table, (4, 4)))


def test_auto_never_picks_cuda():
    from fastswin import backends

    C = _mod()
    q, k, v, table = _cpu_windows()
    assert C._auto_reasons(q, k, v, table, (4, 4)) == [C.UNVERIFIED]
    impl = backends.select("window_attention", "auto", q, k, v, table, (4, 4), None, None)
    assert impl.backend != "cuda"
    if torch.cuda.is_available():
        qc, kc, vc, tc = (t.cuda() for t in (q, k, v, table))
        impl = backends.select("window_attention", "auto", qc, kc, vc, tc, (4, 4), None, None)
        assert impl.backend != "cuda"


def test_fake_kernels_shapes():
    """The fake kernels, on CPU fake tensors (no GPU needed: the real kernel never runs)."""
    _need_ops()
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.fastswin
    with FakeTensorMode():
        q = torch.empty(6, 2, 49, 32, dtype=torch.float16)
        table = torch.empty(169, 2)
        scale = torch.empty(2)
        mask = torch.empty(3, 49, 49)
        out, lse = ops.window_attention_cuda_fwd(q, q, q, table, 7, 7, mask, scale, True)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (6, 2, 49) and lse.dtype == torch.float32
        dq, dk, dv, dtab, dscale = ops.window_attention_cuda_bwd(
            out, q, q, q, table, out, lse, 7, 7, mask, scale, True, True, False)
        assert dq.shape == q.shape and dtab.shape == table.shape and dscale.shape == (2,)
        _, _, _, dtab, dscale = ops.window_attention_cuda_bwd(
            out, q, q, q, table, out, lse, 7, 7, None, scale, False, False, True)
        assert dtab.shape == (0,) and dscale.shape == (0,)
        qkv = torch.empty(2, 9, 10, 3, 2, 32, dtype=torch.bfloat16)
        pad = torch.empty(3, 2, 32)
        out, lse = ops.shifted_window_attention_cuda_fwd(qkv, table, 7, 7, 3, 3, pad, scale, False)
        assert out.shape == (2, 9, 10, 64) and lse.shape == (2 * 4, 2, 49)
        dqkv, dtab, dpad, dscale = ops.shifted_window_attention_cuda_bwd(
            out, qkv, table, out, lse, 7, 7, 3, 3, pad, scale, False, True, True, False)
        assert dqkv.shape == qkv.shape and dtab.shape == table.shape and dpad.shape == pad.shape
        assert dscale.shape == (0,)


def test_cpu_call_has_no_kernel():
    """The schema exists on every build, but there is no CPU kernel: the dispatcher refuses."""
    _need_ops()
    q, k, v, table = _cpu_windows()
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.fastswin.window_attention_cuda_fwd(q, k, v, table, 4, 4, None, torch.ones(2), False)


# ---- GPU tier ------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _aux(dtype):
    # autocast's mix: float32 parameters with float16 / bfloat16 activations
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _v1(window, mask, scale=None):
    C = _mod()
    return lambda a, b, c, t: C.window_attention_cuda(a, b, c, t, window, mask, scale)


def _v1_ref(window, mask, scale=None):
    swin = _ref()
    return lambda a, b, c, t: swin.window_attention(a, b, c, t, window, None if mask is None else mask.double(), scale)


WINDOWED = [
    # (bw, heads, window, d, nW)
    (4, 2, (7, 7), 32, 2),
    (2, 3, (8, 8), 64, None),
    (2, 2, (12, 12), 32, 1),   # 144 tokens: tiled keys, separate dq kernel
    (1, 2, (16, 16), 64, None),
    (1, 1, (24, 24), 32, 1),   # 576 tokens
    (2, 2, (7, 7), 24, 2),     # head_dim padded to 32
    (1, 2, (7, 7), 128, None),  # DP = 128
    (2, 1, (3, 5), 48, 2),     # non-square window, head_dim padded to 64
]


@gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("bw,heads,window,d,nw", WINDOWED)
def test_gpu_v1_windowed(seed, dtype, bw, heads, window, d, nw):
    _need_cuda_build()
    q, k, v, table, mask = make_windows(bw, heads, window, d, dtype, nw, aux_dtype=_aux(dtype))
    compare(_v1(window, mask), _v1_ref(window, mask), [q, k, v, table], [True] * 4,
            names=("out", "dq", "dk", "dv", "dtable"))


@gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("bw,heads,window,d,nw", [WINDOWED[0], WINDOWED[2], WINDOWED[3], WINDOWED[7]])
def test_gpu_v2_windowed(seed, dtype, bw, heads, window, d, nw):
    _need_cuda_build()
    C, swin = _mod(), _ref()
    q, k, v, table, mask = make_windows(bw, heads, window, d, dtype, nw, aux_dtype=_aux(dtype))
    ls = logit_scale_for(heads, _aux(dtype))
    m64 = None if mask is None else mask.double()
    compare(lambda a, b, c, s, t: C.window_attention_v2_cuda(a, b, c, s, t, window, mask),
            lambda a, b, c, s, t: swin.window_attention_v2(a, b, c, s, t, window, m64),
            [q, k, v, ls, table], [True] * 5, names=("out", "dq", "dk", "dv", "dlogit_scale", "dtable"))


BLOCK = [
    # (B, H, W, heads, window, shift, d, pad)
    (2, 14, 14, 2, (7, 7), (3, 3), 32, True),    # no padding, shifted
    (1, 10, 13, 2, (7, 7), (3, 3), 32, True),    # padding on both sides
    (2, 16, 16, 2, (8, 8), (4, 4), 64, True),
    (1, 20, 18, 1, (12, 12), (6, 6), 32, True),  # tiled, padded
    (1, 16, 16, 2, (16, 16), (0, 0), 32, True),  # one window
    (1, 24, 24, 1, (24, 24), (0, 0), 32, False),
    (1, 9, 11, 2, (7, 7), (0, 3), 64, False),    # shift in one direction only, zero padding
]


@gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,H,W,heads,window,shift,d,pad", BLOCK)
def test_gpu_v1_block(seed, dtype, B, H, W, heads, window, shift, d, pad):
    _need_cuda_build()
    C, swin = _mod(), _ref()
    qkv, table, pad_qkv = make_block(B, H, W, heads, window, d, dtype, pad, aux_dtype=_aux(dtype))
    compare(lambda x, t, p: C.shifted_window_attention_cuda(x, t, window, shift, None, p),
            lambda x, t, p: swin.shifted_window_attention(x, t, window, shift, None, p),
            [qkv, table, pad_qkv], [True] * 3, names=("out", "dqkv", "dtable", "dpad_qkv"))


@gpu
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,H,W,heads,window,shift,d,pad", [BLOCK[1], BLOCK[3], BLOCK[6]])
def test_gpu_v2_block(seed, dtype, B, H, W, heads, window, shift, d, pad):
    _need_cuda_build()
    C, swin = _mod(), _ref()
    qkv, table, pad_qkv = make_block(B, H, W, heads, window, d, dtype, pad, aux_dtype=_aux(dtype))
    ls = logit_scale_for(heads, _aux(dtype))
    compare(lambda x, s, t, p: C.shifted_window_attention_v2_cuda(x, s, t, window, shift, p),
            lambda x, s, t, p: swin.shifted_window_attention_v2(x, s, t, window, shift, p),
            [qkv, ls, table, pad_qkv], [True] * 4, names=("out", "dqkv", "dlogit_scale", "dtable", "dpad_qkv"))


@gpu
def test_gpu_matches_triton(seed):
    """Same numbers as the Triton backend (fp32, IEEE dots on both sides)."""
    _need_cuda_build()
    from fastswin.ops import window_attention_triton as T

    C = _mod()
    qkv, table, pad_qkv = make_block(2, 10, 13, 2, (7, 7), 32, torch.float32)
    go = torch.randn(2, 10, 13, 64, device="cuda")
    inputs, gm = [qkv, table, pad_qkv], [True] * 3
    a = run(lambda x, t, p: C.shifted_window_attention_cuda(x, t, (7, 7), (3, 3), None, p), inputs, gm, go)
    b = run(lambda x, t, p: T.shifted_window_attention_triton(x, t, (7, 7), (3, 3), None, p), inputs, gm, go)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _deterministic_twice(fn, inputs, grad_mask, go):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return run(fn, inputs, grad_mask, go), run(fn, inputs, grad_mask, go)
    finally:
        torch.use_deterministic_algorithms(was)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_deterministic_bitwise(seed, dtype):
    _need_cuda_build()
    C = _mod()
    qkv, table, pad_qkv = make_block(2, 20, 18, 2, (12, 12), 32, dtype, aux_dtype=_aux(dtype))
    ls = logit_scale_for(2, _aux(dtype))
    fn = lambda x, s, t, p: C.shifted_window_attention_v2_cuda(x, s, t, (12, 12), (6, 6), p)  # noqa: E731
    go = torch.randn(2, 20, 18, 64, device="cuda").to(dtype)
    inputs, gm = [qkv, ls, table, pad_qkv], [True] * 4
    a, b = _deterministic_twice(fn, inputs, gm, go)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    fast = run(fn, inputs, gm, go)  # the atomic path: same values up to summation order
    for x, y in zip(a, fast):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-3, atol=2e-3)


@gpu
def test_gpu_deterministic_windowed_chunks(seed, monkeypatch):
    """Windowed V1 in deterministic mode vs the atomic path and the reference."""
    _need_cuda_build()
    q, k, v, table, mask = make_windows(6, 2, (7, 7), 32, torch.float32, nw=3)
    fn = _v1((7, 7), mask)
    go = torch.randn(q.shape, device="cuda")
    a, b = _deterministic_twice(fn, [q, k, v, table], [True] * 4, go)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    exact = run(_v1_ref((7, 7), mask), [t.detach().double() for t in (q, k, v, table)], [True] * 4, go.double())
    for x, z in zip(a, exact):
        torch.testing.assert_close(x.double(), z, rtol=1e-5, atol=1e-5)


@gpu
def test_gpu_expanded_grad_out(seed):
    _need_cuda_build()
    q, k, v, table, mask = make_windows(2, 2, (7, 7), 32, torch.float32, nw=2)
    go = torch.randn(1, 1, 1, 32, device="cuda").expand(q.shape)
    compare(_v1((7, 7), mask), _v1_ref((7, 7), mask), [q, k, v, table], [True] * 4, go=go)


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@gpu
@pytest.mark.parametrize("cosine", [False, True])
def test_gpu_opcheck_windowed(seed, cosine):
    _need_cuda_build()
    q, k, v, table, mask = make_windows(2, 2, (7, 7), 32, torch.float32, nw=2)
    scale = torch.rand(2, device="cuda") + 0.1
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), table.requires_grad_(), 7, 7, mask,
            scale.requires_grad_(cosine), cosine)
    _opcheck(torch.ops.fastswin.window_attention_cuda_fwd.default, args)
    out, lse = torch.ops.fastswin.window_attention_cuda_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, table, out, lse, 7, 7, mask, scale, cosine, True, False)
    _opcheck(torch.ops.fastswin.window_attention_cuda_bwd.default,
             tuple(a.detach() if torch.is_tensor(a) else a for a in bargs))


@gpu
@pytest.mark.parametrize("cosine", [False, True])
def test_gpu_opcheck_block(seed, cosine):
    _need_cuda_build()
    qkv, table, pad_qkv = make_block(1, 10, 13, 2, (7, 7), 32, torch.float32)
    scale = torch.rand(2, device="cuda") + 0.1
    args = (qkv.requires_grad_(), table.requires_grad_(), 7, 7, 3, 3, pad_qkv.requires_grad_(),
            scale.requires_grad_(cosine), cosine)
    _opcheck(torch.ops.fastswin.shifted_window_attention_cuda_fwd.default, args)
    out, lse = torch.ops.fastswin.shifted_window_attention_cuda_fwd(*args)
    bargs = (torch.randn_like(out), qkv, table, out, lse, 7, 7, 3, 3, pad_qkv, scale, cosine, True, True, False)
    _opcheck(torch.ops.fastswin.shifted_window_attention_cuda_bwd.default,
             tuple(a.detach() if torch.is_tensor(a) else a for a in bargs))


@gpu
def test_gpu_functional_by_name(seed):
    _need_cuda_build()
    import fastswin.functional as fw
    from fastswin import backends

    q, k, v, table, mask = make_windows(2, 2, (7, 7), 32, torch.float16, nw=2, aux_dtype=torch.float32)
    out = fw.window_attention(q, k, v, table, (7, 7), mask, backend="cuda")
    assert backends.last_selected("window_attention") == "cuda"
    ref = _ref().window_attention(q.double(), k.double(), v.double(), table.double(), (7, 7), mask.double())
    assert (out.double() - ref).abs().max().item() < 5e-2 * max(1.0, ref.abs().max().item())
    assert math.isfinite(out.float().sum().item())
