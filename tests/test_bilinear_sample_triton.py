"""Triton bilinear sampling (``fastswin.kernels.bilinear_sample``) against ``F.grid_sample``.

Runs on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (the conftest skips the ``triton``
tests otherwise). Tiny shapes: the interpreter costs ~ms per program.

Tolerances: float64 1e-12 (absolute, values O(1)); float32 1e-5 relative to the largest
magnitude; float16 (and bfloat16 on a GPU) the DESIGN.md error rule: at most 2x (outputs) / 3x
(gradients) the error of the PyTorch reference run in that dtype, against float64, plus a floor.
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.triton

F64 = torch.float64


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ops():
    from fastswin.ops import bilinear_sample_triton as B

    return B


def _kern():
    return _ops()._kernels()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_kern(), "POISON", True)


def ref(feat, pos):
    from fastswin.reference.bilinear import bilinear_sample

    return bilinear_sample(feat, pos)


def tri(feat, pos):
    from fastswin.functional.bilinear_sample import bilinear_sample

    return bilinear_sample(feat, pos, backend="triton")


def make(n, c, h, w, hk, wk, dtype=F64, spread=1.3):
    feat = torch.randn(n, c, h, w, dtype=dtype, device=_dev())
    # positions spread past [-1, 1]: some samples have taps off the map, some none at all
    pos = (torch.rand(n, hk, wk, 2, dtype=dtype, device=_dev()) * 2 - 1) * spread
    return feat.requires_grad_(), pos.requires_grad_()


def grads(fn, feat, pos, go):
    out = fn(feat, pos)
    gf, gp = torch.autograd.grad(out, (feat, pos), go)
    return out, gf, gp


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", [
    (2, 5, 4, 6, 3, 7),    # non-square map and sample grid, C not a block multiple
    (1, 3, 7, 7, 7, 7),    # same grid size (stride 1)
    (3, 40, 5, 3, 2, 2),   # two channel chunks (BLOCK_C = 32)
    (1, 2, 1, 5, 4, 3),    # H = 1
    (1, 2, 6, 5, 12, 12),  # K = 144 > BLOCK_K: two sample blocks
])
def test_float64_fwd_bwd(seed, shape):
    feat, pos = make(*shape)
    go = torch.randn(shape[0], shape[1], shape[4], shape[5], dtype=F64, device=_dev())
    a = grads(tri, feat, pos, go)
    b = grads(ref, feat, pos, go)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_strided_feat_expanded_grad(seed):
    base = torch.randn(2, 4, 6, 8, dtype=F64, device=_dev())
    feat = base.permute(0, 1, 3, 2)[:, ::2].detach().requires_grad_()  # non-contiguous
    pos = (torch.rand(2, 3, 4, 2, dtype=F64, device=_dev()) * 2.4 - 1.2).requires_grad_()
    go = torch.randn(1, 1, 1, 1, dtype=F64, device=_dev()).expand(2, 2, 3, 4)
    for x, y in zip(grads(tri, feat, pos, go), grads(ref, feat, pos, go)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_float32(seed):
    feat, pos = make(2, 6, 5, 7, 4, 3, torch.float32)
    go = torch.randn(2, 6, 4, 3, device=_dev())
    a = grads(tri, feat, pos, go)
    b = grads(ref, feat.double(), pos.double(), go.double())
    for x, y in zip(a, b):
        assert _rel(x, y) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_half_error_rule(seed, dtype):
    feat, pos = make(2, 6, 5, 7, 4, 3, F64, spread=1.1)
    go = torch.randn(2, 6, 4, 3, dtype=F64, device=_dev())
    exact = grads(ref, feat, pos, go)
    lo = [t.detach().to(dtype).requires_grad_() for t in (feat, pos)]
    k = grads(tri, *lo, go.to(dtype))
    r = grads(ref, *lo, go.to(dtype))
    for i, (x, y, e) in enumerate(zip(k, r, exact)):
        mult = 2 if i == 0 else 3
        assert (x.double() - e).abs().max() <= mult * (y.double() - e).abs().max() + 1e-3


def test_non_finite_positions_follow_cpu_grid_sample(seed):
    """NaN / Inf / huge positions: the float32/float64 CPU grid_sample rule (C++ header)."""
    nan, inf = float("nan"), float("inf")
    feat = torch.randn(1, 3, 4, 5, dtype=F64, requires_grad=True)
    pos = torch.tensor([[[[nan, 0.2], [0.1, inf], [1e30, 0.3], [-3.0, 0.5], [0.2, -0.4], [-inf, nan],
                          [1e308, 1e308]]]], dtype=F64, requires_grad=True)
    go = torch.randn(1, 3, 1, 7, dtype=F64)
    b = grads(ref, feat, pos, go)
    a = grads(_ops().bilinear_sample_triton, feat.to(_dev()), pos.to(_dev()), go.to(_dev()))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y, rtol=0, atol=1e-12, equal_nan=True)


def test_deterministic_mode_bitwise(seed):
    feat, pos = make(2, 5, 3, 4, 6, 6, spread=0.9)  # many samples share taps
    go = torch.randn(2, 5, 6, 6, dtype=F64, device=_dev())
    fast = grads(tri, feat, pos, go)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        d1 = grads(tri, feat, pos, go)
        d2 = grads(tri, feat, pos, go)
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y, z in zip(d1, d2, fast):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=0, atol=1e-12)


def test_needs_only_one_grad(seed):
    feat, pos = make(1, 3, 4, 4, 2, 3)
    go = torch.randn(1, 3, 2, 3, dtype=F64, device=_dev())
    (gf,) = torch.autograd.grad(tri(feat, pos.detach()), feat, go)
    (gp,) = torch.autograd.grad(tri(feat.detach(), pos), pos, go)
    _, rf, rp = grads(ref, feat, pos, go)
    torch.testing.assert_close(gf, rf, rtol=0, atol=1e-12)
    torch.testing.assert_close(gp, rp, rtol=0, atol=1e-12)


def test_gradcheck(seed):
    feat = torch.randn(1, 2, 3, 4, dtype=F64, device=_dev(), requires_grad=True)
    # away from integer pixel coordinates (the gradient in pos is discontinuous there)
    iy = torch.tensor([0.3, 1.6, -0.5, 2.4], dtype=F64)
    ix = torch.tensor([0.2, 2.7, 3.4, -0.6], dtype=F64)
    pos = torch.stack((iy / 2 * 2 - 1, ix / 3 * 2 - 1), -1).view(1, 2, 2, 2).to(_dev()).requires_grad_()
    assert torch.autograd.gradcheck(tri, (feat, pos))


def test_opcheck(seed):
    feat, pos = make(2, 3, 4, 5, 2, 3, torch.float32)
    torch.library.opcheck(torch.ops.fastswin.bilinear_sample_triton_fwd.default, (feat, pos))
    go = torch.randn(2, 3, 2, 3, device=_dev())
    for nf, np_ in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.fastswin.bilinear_sample_triton_bwd.default,
                              (go, feat.detach(), pos.detach(), nf, np_))


def test_registered_backend(seed):
    import fastswin.backends as backends

    feat, pos = make(1, 2, 3, 3, 2, 2)
    assert backends.explain("bilinear_sample", feat, pos)["triton"] == []
    assert backends.select("bilinear_sample", "triton", feat, pos) is not None


@pytest.mark.gpu
class TestGPU:
    """DAT-T stage 3: B = 2, 14 x 14, C = 384, 3 groups -> feat (6, 128, 14, 14), 14 x 14 samples."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_dat_t_stage3(self, seed, dtype):
        feat = torch.randn(6, 128, 14, 14, dtype=F64, device="cuda", requires_grad=True)
        pos = ((torch.rand(6, 14, 14, 2, dtype=F64, device="cuda") * 2 - 1) * 1.1).requires_grad_()
        go = torch.randn(6, 128, 14, 14, dtype=F64, device="cuda")
        exact = grads(ref, feat, pos, go)
        lo = [t.detach().to(dtype).requires_grad_() for t in (feat, pos)]
        k = grads(tri, *lo, go.to(dtype))
        r = grads(ref, *lo, go.to(dtype))
        for i, (x, y, e) in enumerate(zip(k, r, exact)):
            if dtype == torch.float32:
                assert _rel(x, e) < 1e-5
            else:
                assert (x.double() - e).abs().max() <= (2 if i == 0 else 3) * (y.double() - e).abs().max() + 1e-3

    def test_deterministic_bitwise(self, seed):
        feat = torch.randn(6, 128, 14, 14, device="cuda", requires_grad=True)
        pos = (torch.rand(6, 14, 14, 2, device="cuda") * 2 - 1).requires_grad_()
        go = torch.randn(6, 128, 14, 14, device="cuda")
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            a = grads(tri, feat, pos, go)
            b = grads(tri, feat, pos, go)
        finally:
            torch.use_deterministic_algorithms(prev)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
