"""Fused Triton DAT / DAT++ attention (``fastswin.kernels.deformable_attention``) against the
float64 PyTorch reference (``fastswin.reference.dat.deformable_attention``).

Runs on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (conftest skips otherwise); tiny shapes.
Tolerances: float64 1e-10; float32 1e-5 relative; float16/bfloat16 the DESIGN.md error rule (2x
outputs / 3x gradients the error of the reference run in that dtype, against float64, + floor).
"""
import pytest
import torch

pytestmark = pytest.mark.triton

F64 = torch.float64


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kern():
    from fastswin.ops import deformable_attention_triton as D

    return D._kernels()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_kern(), "POISON", True)


def ref(*args, **kw):
    from fastswin.reference.dat import deformable_attention

    return deformable_attention(*args, **kw)


def tri(*args, **kw):
    from fastswin.functional.deformable_attention import deformable_attention

    return deformable_attention(*args, backend="triton", **kw)


def make(b, h, g, c, hw, hkwk, dtype=F64, bias=False, spread=1.3):
    (H, W), (Hk, Wk) = hw, hkwk
    d = _dev()
    t = dict(
        q=torch.randn(b * h, c, H * W, dtype=dtype, device=d),
        k=torch.randn(b * h, c, Hk * Wk, dtype=dtype, device=d),
        v=torch.randn(b * h, c, Hk * Wk, dtype=dtype, device=d),
        # past [-1, 1]: some displacements reach off the table
        pos=(torch.rand(b * g, Hk, Wk, 2, dtype=dtype, device=d) * 2 - 1) * spread,
        rpe=torch.randn(h, 2 * H - 1, 2 * W - 1, dtype=dtype, device=d),
    )
    if bias:
        t["bias"] = torch.randn(b * h, H * W, Hk * Wk, dtype=dtype, device=d)
    for x in t.values():
        x.requires_grad_()
    return t


def run(fn, t, go, variant, h, g, hw, **kw):
    ins = [t["q"], t["k"], t["v"], t["pos"], t["rpe"]] + ([t["bias"]] if "bias" in t else [])
    out = fn(t["q"], t["k"], t["v"], t["pos"], t["rpe"], t.get("bias"), query_size=hw, n_heads=h, n_groups=g,
             variant=variant, **kw)
    return [out] + list(torch.autograd.grad(out, ins, go))


def compare(t, variant, h, g, hw, atol=1e-10, **kw):
    go = torch.randn(t["q"].shape, dtype=t["q"].dtype, device=_dev())
    a = run(tri, t, go, variant, h, g, hw, **kw)
    b = run(ref, t, go, variant, h, g, hw, **kw)
    for name, x, y in zip(["out", "dq", "dk", "dv", "dpos", "drpe", "dbias"], a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    return a


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", ["dat", "dat++"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 3])
def test_float64(seed, variant, stride, groups):
    hw = (5, 4)  # non-square
    hkwk = (-(-5 // stride), -(-4 // stride))
    t = make(2 if groups == 1 else 1, 3, groups, 4, hw, hkwk)
    compare(t, variant, 3, groups, hw)


def test_attn_bias_and_scale(seed):
    t = make(1, 2, 2, 3, (3, 5), (2, 3), bias=True)
    compare(t, "dat++", 2, 2, (3, 5), scale=0.7)


def test_no_rpe_table(seed):
    t = make(1, 2, 1, 4, (3, 3), (2, 2))
    go = torch.randn(t["q"].shape, dtype=F64, device=_dev())
    kw = dict(query_size=(3, 3), n_heads=2, n_groups=1, variant="dat")
    a = tri(t["q"], t["k"], t["v"], t["pos"], None, None, **kw)
    b = ref(t["q"], t["k"], t["v"], t["pos"], None, None, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    ga = torch.autograd.grad(a, (t["q"], t["k"], t["v"]), go)
    gb = torch.autograd.grad(b, (t["q"], t["k"], t["v"]), go)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_tiled_queries_and_keys(seed, monkeypatch):
    """Ns > BLOCK_N (separate dq kernel) and M > BLOCK_M, with 16 x 16 tiles."""
    monkeypatch.setattr(_kern(), "MAX_BLOCK", 16)
    t = make(1, 2, 2, 4, (5, 5), (5, 4), bias=True)
    compare(t, "dat", 2, 2, (5, 5))


def test_strided_inputs_expanded_grad(seed):
    h, g, hw = 2, 1, (3, 4)
    base = torch.randn(2, 6, 12, dtype=F64, device=_dev())
    q = base[:, ::2].detach().requires_grad_()       # (2, 3, 12) non-contiguous
    k = torch.randn(2, 6, 3, dtype=F64, device=_dev()).transpose(1, 2).contiguous().transpose(1, 2)[:, :3].detach()
    k.requires_grad_()
    v = torch.randn(2, 3, 6, dtype=F64, device=_dev())[:, :, ::2].detach().requires_grad_()
    pos = (torch.rand(1, 3, 1, 2, dtype=F64, device=_dev()) * 2 - 1).requires_grad_()
    rpe = torch.randn(2, 5, 7, dtype=F64, device=_dev()).requires_grad_()
    t = dict(q=q, k=k, v=v, pos=pos, rpe=rpe)
    go = torch.randn(1, 1, 1, dtype=F64, device=_dev()).expand(2, 3, 12)
    a = run(tri, t, go, "dat", h, g, hw)
    b = run(ref, t, go, "dat", h, g, hw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_grid_dtype(seed):
    t = make(1, 2, 1, 4, (4, 3), (2, 2))
    compare(t, "dat", 2, 1, (4, 3), grid_dtype=torch.float32)


def test_float32(seed):
    t = make(1, 3, 3, 8, (4, 5), (4, 5), torch.float32)
    go = torch.randn(t["q"].shape, device=_dev())
    a = run(tri, t, go, "dat++", 3, 3, (4, 5))
    t64 = {n: x.detach().double().requires_grad_() for n, x in t.items()}
    b = run(ref, t64, go.double(), "dat++", 3, 3, (4, 5))
    for x, y in zip(a, b):
        assert _rel(x, y) < 1e-5


def _error_rule(t64, dtype, variant, h, g, hw, floor=1e-3):
    go = torch.randn(t64["q"].shape, dtype=F64, device=t64["q"].device)
    exact = run(ref, t64, go, variant, h, g, hw)
    lo = {n: x.detach().to(dtype).requires_grad_() for n, x in t64.items()}
    k = run(tri, lo, go.to(dtype), variant, h, g, hw)
    r = run(ref, lo, go.to(dtype), variant, h, g, hw)
    for i, (x, y, e) in enumerate(zip(k, r, exact)):
        err_k = (x.double() - e).abs().max().item()
        err_r = (y.double() - e).abs().max().item()
        assert err_k <= (2 if i == 0 else 3) * err_r + floor * max(1.0, e.abs().max().item()), (i, err_k, err_r)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_half_error_rule(seed, dtype):
    _error_rule(make(1, 3, 3, 16, (4, 5), (2, 3), spread=1.1), dtype, "dat", 3, 3, (4, 5))


def test_deterministic_mode_bitwise(seed):
    t = make(2, 2, 1, 4, (3, 4), (2, 2), bias=True)
    go = torch.randn(t["q"].shape, dtype=F64, device=_dev())
    fast = run(tri, t, go, "dat++", 2, 1, (3, 4))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        d1 = run(tri, t, go, "dat++", 2, 1, (3, 4))
        d2 = run(tri, t, go, "dat++", 2, 1, (3, 4))
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y, z in zip(d1, d2, fast):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=0, atol=1e-10)


def test_gradcheck(seed):
    h, g, hw = 2, 2, (2, 3)
    d = _dev()
    q = torch.randn(2, 2, 6, dtype=F64, device=d, requires_grad=True)
    k = torch.randn(2, 2, 2, dtype=F64, device=d, requires_grad=True)
    v = torch.randn(2, 2, 2, dtype=F64, device=d, requires_grad=True)
    # away from integer table coordinates (the bias is not differentiable in pos there)
    pos = torch.tensor([[[[0.13, -0.41]], [[-0.77, 0.29]]], [[[0.52, 0.61]], [[-0.23, -0.09]]]],
                       dtype=F64, device=d).view(2, 2, 1, 2).requires_grad_()
    rpe = torch.randn(2, 3, 5, dtype=F64, device=d, requires_grad=True)
    bias = torch.randn(2, 6, 2, dtype=F64, device=d, requires_grad=True)

    def f(q, k, v, pos, rpe, bias):
        return tri(q, k, v, pos, rpe, bias, query_size=hw, n_heads=h, n_groups=g, variant="dat")

    # fast_mode (random projections): full Jacobians cost ~200 interpreted launches (~45 s)
    assert torch.autograd.gradcheck(f, (q, k, v, pos, rpe, bias), fast_mode=True)


def test_opcheck(seed):
    t = make(1, 2, 1, 4, (3, 3), (2, 2), torch.float32, bias=True)
    from fastswin.reference.dat import query_grid

    qg = query_grid(3, 3, variant="dat", dtype=torch.float32, device=_dev()).reshape(9, 2)
    args = (t["q"], t["k"], t["v"], t["pos"], qg, t["rpe"], t["bias"], 2, 1, 0.5)
    torch.library.opcheck(torch.ops.fastswin.deformable_attention_triton_fwd.default, args)
    det = [x.detach() if torch.is_tensor(x) else x for x in args]
    out, lse = _kern().deformable_attention_fwd(*det[:7], n_heads=2, n_groups=1, scale=0.5)
    torch.library.opcheck(torch.ops.fastswin.deformable_attention_triton_bwd.default,
                          (torch.randn_like(out), *det[:7], out, lse, 2, 1, 0.5, True, True, True))


def test_reasons_refuse_dropout(seed):
    import fastswin.backends as backends

    t = make(1, 2, 1, 4, (3, 3), (2, 2))
    why = backends.explain("deformable_attention", t["q"], t["k"], t["v"], t["pos"], t["rpe"], None,
                           query_size=(3, 3), n_heads=2, n_groups=1, variant="dat", dropout_p=0.1)["triton"]
    assert any("dropout" in w for w in why)
    with pytest.raises(Exception, match="dropout"):
        tri(t["q"], t["k"], t["v"], t["pos"], t["rpe"], None, query_size=(3, 3), n_heads=2, n_groups=1,
            variant="dat", dropout_p=0.1)


@pytest.mark.parametrize("variant,extra", [("dat", {}), ("dat++", {"fixed_pe": True})])
def test_module_matches_reference(seed, variant, extra):
    import fastswin

    cfg = dict(q_size=(6, 4), kv_size=(6, 4), n_heads=6, n_head_channels=2, n_groups=3, attn_drop=0.0,
               proj_drop=0.0, stride=2, offset_range_factor=2, use_pe=True, dwc_pe=False, no_off=False,
               fixed_pe=False)
    cfg.update(stage_idx=2) if variant == "dat" else cfg.update(ksize=3, log_cpb=False)
    cfg.update(extra)
    torch.manual_seed(seed)
    a = fastswin.DeformableAttention(**cfg, variant=variant, backend="reference").double().to(_dev())
    b = fastswin.DeformableAttention(**cfg, variant=variant, backend="triton").double().to(_dev())
    b.load_state_dict(a.state_dict())
    if "rpe_table" in dict(a.named_parameters()):  # a random table, not the zero init
        with torch.no_grad():
            a.rpe_table.normal_()
            b.rpe_table.copy_(a.rpe_table)
    x = torch.randn(2, 12, 6, 4, dtype=F64, device=_dev())
    ya = a(x)[0]
    yb = b(x)[0]
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-10)
    go = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, list(a.parameters()), go, allow_unused=True)
    gb = torch.autograd.grad(yb, list(b.parameters()), go, allow_unused=True)
    for (n, _), x_, y_ in zip(a.named_parameters(), gb, ga):
        if y_ is None:
            assert x_ is None, n
            continue
        torch.testing.assert_close(x_, y_, rtol=0, atol=1e-10, msg=lambda m: f"{n}: {m}")


@pytest.mark.gpu
class TestGPU:
    """DAT-T stage 3: batch 2, 14 x 14, C 384, 12 heads (c = 32), 3 groups, stride 1 and 2."""

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("stride", [1, 2])
    def test_dat_t_stage3(self, seed, dtype, stride):
        hk = 14 // stride
        t64 = make(2, 12, 3, 32, (14, 14), (hk, hk), F64, bias=False, spread=1.1)
        _error_rule(t64, dtype, "dat", 12, 3, (14, 14))

    def test_dat_t_stage3_float32(self, seed):
        t = make(2, 12, 3, 32, (14, 14), (7, 7), torch.float32)
        go = torch.randn(t["q"].shape, device="cuda")
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            a = run(tri, t, go, "dat++", 12, 3, (14, 14))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        t64 = {n: x.detach().double().requires_grad_() for n, x in t.items()}
        b = run(ref, t64, go.double(), "dat++", 12, 3, (14, 14))
        for x, y in zip(a, b):
            assert _rel(x, y) < 1e-5

    def test_deterministic_bitwise(self, seed):
        t = make(2, 12, 3, 32, (14, 14), (7, 7), torch.float16)
        go = torch.randn(t["q"].shape, dtype=torch.float16, device="cuda")
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            a = run(tri, t, go, "dat", 12, 3, (14, 14))
            b = run(tri, t, go, "dat", 12, 3, (14, 14))
        finally:
            torch.use_deterministic_algorithms(prev)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
