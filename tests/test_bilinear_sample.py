"""The compiled op ``torch.ops.fastswin.bilinear_sample`` (DAT's bilinear sampling).

    feat (N, C, H, W), pos (N, Hk, Wk, 2) in (y, x) order, normalized to [-1, 1], align_corners=True,
    zero padding -> out (N, C, Hk, Wk) == F.grid_sample(feat, pos[..., (1, 0)], "bilinear", "zeros", True)

CPU tier (always): the C++ CPU kernels against F.grid_sample and against an independent
float64 loop written from the formula; float64 gradcheck; opcheck; determinism; low precision;
strides; awkward shapes; backend choice; bad inputs; the package without the extension.

GPU tier (``TestCUDA``, only with a CUDA device and an extension built with its CUDA kernels):
the CUDA kernels against F.grid_sample in every dtype under DESIGN.md's error rule, gradients,
deterministic mode, fast vs deterministic backward.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastswin import _extension, backends
from fastswin.backends import BackendUnavailableError
from fastswin.functional.bilinear_sample import bilinear_sample as fs_bilinear_sample

HAS_OP = _extension.has_op("bilinear_sample")
if HAS_OP:
    import fastswin.ops.bilinear_sample  # noqa: F401  (fake kernels, autograd, "cuda" backend)

needs_op = pytest.mark.skipif(not HAS_OP, reason="fastswin._C is not built: " + "; ".join(_extension.unavailable_reasons()))

# (N, C, H, W, Hk, Wk): batch 1, H == 1, W == 1, 1x1 maps, Hk != H, non-square everything.
SHAPES = [
    (2, 3, 5, 7, 4, 6),
    (1, 4, 6, 6, 6, 6),
    (2, 2, 1, 5, 3, 4),
    (2, 2, 5, 1, 3, 4),
    (1, 3, 1, 1, 2, 3),
    (3, 5, 8, 3, 2, 9),
]


def op(feat, pos):
    return torch.ops.fastswin.bilinear_sample(feat, pos)


def grid_ref(feat, pos):
    return F.grid_sample(feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True)


def loop_ref(feat, pos):
    """Independent float64 oracle written from the formula (no grid_sample):
    iy = (y + 1) / 2 * (H - 1), y0 = floor(iy), wy = iy - y0 (same for x);
    out = sum over the taps (y0 + a, x0 + b) inside the map of f * (wy if a else 1 - wy) * (wx if b else 1 - wx)."""
    feat, pos = feat.double(), pos.double()
    N, C, H, W = feat.shape
    _, Hk, Wk, _ = pos.shape
    out = torch.zeros(N, C, Hk, Wk, dtype=torch.float64)
    for n in range(N):
        for i in range(Hk):
            for j in range(Wk):
                y, x = float(pos[n, i, j, 0]), float(pos[n, i, j, 1])
                iy, ix = (y + 1) / 2 * (H - 1), (x + 1) / 2 * (W - 1)
                y0, x0 = math.floor(iy), math.floor(ix)
                wy, wx = iy - y0, ix - x0
                for a in (0, 1):
                    for b in (0, 1):
                        yy, xx = y0 + a, x0 + b
                        if 0 <= yy < H and 0 <= xx < W:
                            w = (wy if a else 1 - wy) * (wx if b else 1 - wx)
                            out[n, :, i, j] += feat[n, :, yy, xx] * w
    return out


def make_pos(N, Hk, Wk, H, W, *, dtype=torch.float64, margin=0.1, gen=None):
    """Positions whose pixel coordinates lie in [-2, size + 1): on the map, straddling its border
    (one tap off) and fully off it (no tap). Fractional parts stay in [margin, 1 - margin], away
    from integer pixel coordinates where bilinear sampling has a kink (finite differences would
    straddle it). For a size-1 axis the pixel coordinate is always 0: any normalized value works."""

    def axis(size):
        if size == 1:
            return torch.rand(N, Hk, Wk, generator=gen, dtype=torch.float64) * 3 - 1.5
        whole = torch.randint(-2, size + 1, (N, Hk, Wk), generator=gen).double()
        frac = margin + (1 - 2 * margin) * torch.rand(N, Hk, Wk, generator=gen, dtype=torch.float64)
        return (whole + frac) / (size - 1) * 2 - 1

    return torch.stack([axis(H), axis(W)], dim=-1).to(dtype)


def make_inputs(shape, dtype=torch.float64, device="cpu", seed=0):
    N, C, H, W, Hk, Wk = shape
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    pos = make_pos(N, Hk, Wk, H, W, gen=gen)
    return feat.to(device=device, dtype=dtype), pos.to(device=device, dtype=dtype)


def border_pos(H, W, dtype=torch.float64):
    """Positions exactly on pixel centres, on the map's edges (-1, +1), one pixel beyond them
    (pixel coordinate exactly -1 or W: one tap at zero weight) and far outside."""
    def coords(size):
        px = [-1.0, -0.5, 0.0, 0.5, float(size - 1), size - 0.5, float(size), -3.0, size + 2.0]
        if size == 1:
            return [-1.0, 0.0, 1.0, -7.0, 5.0]
        return [p / (size - 1) * 2 - 1 for p in px]

    ys, xs = coords(H), coords(W)
    grid = torch.tensor([[(y, x) for x in xs] for y in ys], dtype=torch.float64)
    return grid.unsqueeze(0).to(dtype)


# ---- CPU tier ------------------------------------------------------------------------------------


@needs_op
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_float64_vs_grid_sample_and_loop(shape, seed):
    feat, pos = make_inputs(shape, seed=seed)
    out = op(feat, pos)
    assert out.shape == (shape[0], shape[1], shape[4], shape[5]) and out.dtype == torch.float64
    # Same arithmetic in float64: a few ulp of |feat| at most.
    torch.testing.assert_close(out, grid_ref(feat, pos), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, loop_ref(feat, pos), rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_float32_vs_grid_sample(shape, seed):
    feat, pos = make_inputs(shape, torch.float32, seed=seed)
    # fp32: the pixel coordinate ix carries a few ulp of rounding (~ (W-1) * 2^-24 absolute; the
    # CPU grid_sample also rounds it differently: (x + 1) * ((W - 1) / 2)), times a neighbour
    # difference of |feat| <~ 8 -> ~1e-6; 1e-5 leaves margin, as DESIGN.md asks for fp32.
    torch.testing.assert_close(op(feat, pos), grid_ref(feat, pos), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op(feat, pos).double(), loop_ref(feat, pos), rtol=1e-5, atol=1e-5)


@needs_op
@pytest.mark.parametrize("hw", [(5, 7), (1, 4), (4, 1), (1, 1)])
def test_border_taps_match_grid_sample(hw, seed):
    """Taps exactly on pixel centres and on / just beyond the border: values and the one-sided
    gradients grid_sample takes there (same floor convention)."""
    H, W = hw
    pos = border_pos(H, W).requires_grad_()
    feat = torch.randn(1, 3, H, W, dtype=torch.float64, requires_grad=True)
    out, ref = op(feat, pos), grid_ref(feat, pos)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (feat, pos), g), torch.autograd.grad(ref, (feat, pos), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


NONFINITE_VALS = [float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 3.0, -3.0, 0.3]


def nonfinite_pos(dtype=torch.float64):
    """Every pair of (y, x) from NONFINITE_VALS: one or both coordinates NaN/Inf, huge, off the map
    or on it. Shape (1, 8, 8, 2)."""
    v = torch.tensor(NONFINITE_VALS, dtype=torch.float64)
    return torch.stack(torch.meshgrid(v, v, indexing="ij"), dim=-1).unsqueeze(0).to(dtype)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(4, 5), (1, 5), (4, 1)])
def test_nonfinite_and_huge_positions_like_grid_sample(dtype, hw, seed):
    """NaN/Inf positions give what the CPU grid_sample gives, bit for bit where it is NaN or 0:
    NaN outputs, no grad_feat contribution, NaN in the *other* coordinate's grad_pos. Huge finite
    ones (range-checked before the float -> int conversion: no undefined behaviour) read 0 with
    zero gradients."""
    gen = torch.Generator().manual_seed(seed)
    H, W = hw
    feat = torch.randn(1, 3, H, W, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    pos = nonfinite_pos(dtype).requires_grad_()
    out, ref = op(feat, pos), grid_ref(feat, pos)
    assert out.isnan().any()  # the case this test is about
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, equal_nan=True)
    assert torch.equal(out.isnan(), ref.isnan())
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    ours = torch.autograd.grad(out, (feat, pos), g)
    refs = torch.autograd.grad(ref, (feat, pos), g)
    assert refs[1].isnan().any() and not refs[1].isnan().all()
    for a, b in zip(ours, refs):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)
    # One gradient at a time (grad_pos alone takes its own path).
    (gp,) = torch.autograd.grad(op(feat.detach(), pos), (pos,), g)
    torch.testing.assert_close(gp, refs[1], rtol=tol, atol=tol, equal_nan=True)
    # The deterministic backward is the same code on CPU; C == 0: empty sums, no NaN (as ATen).
    empty_f = torch.zeros(1, 0, H, W, dtype=dtype, requires_grad=True)
    (gp0,) = torch.autograd.grad(op(empty_f, pos).sum(), (pos,))
    (gp0_ref,) = torch.autograd.grad(grid_ref(empty_f, pos).sum(), (pos,))
    assert torch.equal(gp0, gp0_ref) and not gp0.any()


@needs_op
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nonfinite_positions_low_precision(dtype, seed):
    """Half types compute in float: the float32 CPU grid_sample's NaN rule on the same values
    (the CPU grid_sample's own half-precision fallback converts floor(NaN) to int, undefined)."""
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(1, 3, 4, 5, generator=gen).to(dtype).requires_grad_()
    pos = nonfinite_pos(dtype).requires_grad_()
    f32, p32 = feat.detach().float().requires_grad_(), pos.detach().float().requires_grad_()
    out, ref = op(feat, pos), grid_ref(f32, p32)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    torch.testing.assert_close(out.float(), ref, rtol=LOWP_RTOL[dtype], atol=1e-3, equal_nan=True)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    for a, b in zip(torch.autograd.grad(out, (feat, pos), g), torch.autograd.grad(ref, (f32, p32), g.float())):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.float(), b, rtol=0, atol=LOWP_RTOL[dtype] * b.nan_to_num().abs().max().item() + 1e-3, equal_nan=True)


@needs_op
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4], (2, 2, 4, 3, 5, 2)])
def test_gradcheck_float64(shape, seed):
    feat, pos = make_inputs(shape, seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    assert torch.autograd.gradcheck(op, (feat, pos))
    # One gradient at a time: the other comes back as an empty (0,) tensor from the op.
    assert torch.autograd.gradcheck(lambda f: op(f, pos.detach()), (feat,))
    assert torch.autograd.gradcheck(lambda p: op(feat.detach(), p), (pos,))


@needs_op
def test_backward_matches_grid_sample(seed):
    feat, pos = make_inputs((2, 4, 6, 9, 5, 7), seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    g = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    ours = torch.autograd.grad(op(feat, pos), (feat, pos), g)
    ref = torch.autograd.grad(grid_ref(feat, pos), (feat, pos), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_op
def test_opcheck(seed):
    shape = (2, 3, 5, 7, 4, 6)
    for rf, rp in [(True, True), (True, False), (False, True), (False, False)]:
        feat, pos = make_inputs(shape, seed=seed + 2 * rf + rp)
        torch.library.opcheck(torch.ops.fastswin.bilinear_sample.default, (feat.requires_grad_(rf), pos.requires_grad_(rp)))
    # Non-contiguous inputs.
    feat, pos = make_inputs((2, 6, 5, 7, 4, 6), seed=seed + 7)
    torch.library.opcheck(
        torch.ops.fastswin.bilinear_sample.default,
        (feat[:, ::2].requires_grad_(), pos.transpose(1, 2).requires_grad_()),
    )
    # The backward op on its own (its schema and fake kernel), both flag combinations.
    feat, pos = make_inputs(shape, seed=seed + 8)
    grad_out = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    for rf, rp in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.fastswin.bilinear_sample_backward.default, (grad_out, feat, pos, rf, rp, False))


@needs_op
def test_torch_compile_fullgraph(seed):
    """Fake kernels + autograd registration trace under torch.compile (aot_eager: no C++ codegen,
    so it stays fast on CPU; the traced graph is what inductor would get)."""
    feat, pos = make_inputs((2, 3, 5, 7, 4, 6), seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    fn = torch.compile(op, backend="aot_eager", fullgraph=True)
    out = fn(feat, pos)
    torch.testing.assert_close(out, grid_ref(feat, pos), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (feat, pos), g), torch.autograd.grad(grid_ref(feat, pos), (feat, pos), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_deterministic_mode_bitwise(dtype, seed):
    feat, pos = make_inputs((3, 8, 9, 11, 12, 10), dtype, seed=seed)
    g = torch.randn(3, 8, 12, 10, dtype=torch.float64).to(dtype)

    def run():
        f, p = feat.clone().requires_grad_(), pos.clone().requires_grad_()
        out = op(f, p)
        return (out, *torch.autograd.grad(out, (f, p), g))

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The CPU backward ignores the flag: it is always the deterministic one.
    for a, b in zip(first, run()):
        assert torch.equal(a, b)


# Low precision: the op converts to float (at::opmath_type) on load and rounds once on store, so
# against a float64 oracle fed the *same* (already rounded) inputs its error is the final rounding:
# half an ulp, 2^-11 relative for fp16 and 2^-8 for bf16 (plus ~1e-6 absolute of fp32 arithmetic).
# The tolerances are twice that. Gradients sum over samples/channels in float and round once:
# the same bound relative to the largest gradient.
LOWP_RTOL = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


@needs_op
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5]])
def test_low_precision_vs_float64(dtype, shape, seed):
    feat, pos = make_inputs(shape, dtype, seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    f64, p64 = feat.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
    out, ref = op(feat, pos), grid_ref(f64, p64)
    rtol = LOWP_RTOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-5)
    # DESIGN.md's error rule where CPU grid_sample runs this dtype: at most 2x its error.
    try:
        plain = grid_ref(feat.detach(), pos.detach())
    except RuntimeError:  # this dtype is not implemented by the CPU grid_sample
        plain = None
    if plain is not None:
        err, err_plain = (out.double() - ref).abs().max(), (plain.double() - ref).abs().max()
        assert err <= 2 * err_plain + 1e-6, (err, err_plain)
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    for a, b in zip(torch.autograd.grad(out, (feat, pos), g), torch.autograd.grad(ref, (f64, p64), g.double())):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=0, atol=rtol * b.abs().max().item() + 1e-5)


@needs_op
def test_non_contiguous_inputs_and_expanded_grad(seed):
    N, C, H, W, Hk, Wk = 2, 6, 5, 7, 4, 3
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 2 * C, H, W, generator=gen, dtype=torch.float64)
    pos_t = make_pos(N, Wk, Hk, H, W, gen=gen)  # (N, Wk, Hk, 2), transposed below
    pos_wide = torch.randn(N, Hk, Wk, 3, generator=gen, dtype=torch.float64)
    pos_wide[..., :2] = make_pos(N, Hk, Wk, H, W, gen=gen)
    cases = [
        (base[:, ::2], make_pos(N, Hk, Wk, H, W, gen=gen)),                      # strided channels
        (base[:, :C].contiguous(memory_format=torch.channels_last), pos_wide[..., :2]),  # NHWC, last-dim stride 1 of 3
        (base[:, :C].transpose(2, 3).contiguous().transpose(2, 3), pos_t.transpose(1, 2)),
        (base[:1, :C].expand(N, C, H, W), make_pos(N, Hk, Wk, H, W, gen=gen)),   # stride-0 batch
    ]
    for feat, pos in cases:
        assert not (feat.is_contiguous() and pos.is_contiguous())
        torch.testing.assert_close(op(feat, pos), grid_ref(feat, pos), rtol=1e-12, atol=1e-12)
        f, p = feat.clone().requires_grad_(), pos.clone().requires_grad_()
        # out.sum() hands the backward an expanded (stride-0) grad_out.
        ours = torch.autograd.grad(op(f, p).sum(), (f, p))
        ref = torch.autograd.grad(grid_ref(f, p).sum(), (f, p))
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("shape", [(0, 2, 3, 4, 2, 2), (2, 0, 3, 4, 2, 2), (2, 3, 3, 4, 0, 5)])
def test_empty(shape, seed):
    feat, pos = make_inputs(shape, seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    out = op(feat, pos)
    assert out.shape == (shape[0], shape[1], shape[4], shape[5])
    gf, gp = torch.autograd.grad(out.sum(), (feat, pos), allow_unused=True)
    assert gf.shape == feat.shape and gp.shape == pos.shape
    assert not gf.any() and not gp.any()


@needs_op
def test_double_backward_raises(seed):
    feat, pos = make_inputs((1, 2, 4, 5, 2, 3), seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    (gf,) = torch.autograd.grad(op(feat, pos).square().sum(), (feat,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gf.sum().backward()


@needs_op
def test_functional_backends(monkeypatch, seed):
    monkeypatch.delenv("FASTSWIN_BACKEND", raising=False)
    feat, pos = make_inputs((2, 3, 5, 7, 4, 6), torch.float32, seed=seed)
    # On CPU tensors auto prefers ATen's grid_sample (measured faster); the C++ kernel runs by name.
    assert backends.select("bilinear_sample", "auto", feat, pos).backend == "reference"
    assert backends.explain("bilinear_sample", feat, pos)["cuda"] == []
    out = fs_bilinear_sample(feat, pos, backend="cuda")
    assert backends.last_selected("bilinear_sample") == "cuda"
    torch.testing.assert_close(out, fs_bilinear_sample(feat, pos, backend="reference"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs_bilinear_sample(feat, pos), F.grid_sample(
        feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True), rtol=0, atol=0)
    assert backends.last_selected("bilinear_sample") == "reference"


def test_cuda_backend_unavailable_says_why(monkeypatch):
    """With the extension missing (simulated), backend='cuda' raises with the reason and 'auto'
    falls back to another backend."""
    import fastswin.ops.bilinear_sample  # noqa: F401  (registers the "cuda" entry either way)

    monkeypatch.delenv("FASTSWIN_BACKEND", raising=False)
    monkeypatch.setattr(_extension, "unavailable_reasons", lambda: ["fastswin._C is not importable (simulated)"])
    feat, pos = make_inputs((1, 2, 3, 4, 2, 2))
    with pytest.raises(BackendUnavailableError, match="simulated"):
        fs_bilinear_sample(feat, pos, backend="cuda")
    assert backends.select("bilinear_sample", "auto", feat, pos).backend == "reference"


def test_package_imports_without_extension():
    """In a fresh interpreter where ``fastswin._C`` cannot be imported: the ops module imports,
    registers only a reasons function for 'cuda', and the functional entry says why."""
    code = r"""
import sys
sys.modules["fastswin._C"] = None  # makes `from . import _C` raise ImportError
import torch
from fastswin import backends
from fastswin.functional.bilinear_sample import bilinear_sample
import fastswin.ops.bilinear_sample as ops
assert not ops.AVAILABLE
feat, pos = torch.randn(1, 2, 3, 4), torch.rand(1, 2, 2, 2) * 2 - 1
try:
    bilinear_sample(feat, pos, backend="cuda")
except backends.BackendUnavailableError as e:
    assert "not importable" in str(e), e
else:
    raise AssertionError("backend='cuda' ran without the extension")
assert backends.select("bilinear_sample", "auto", feat, pos).backend == "reference"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "FASTSWIN_BACKEND"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_op
@pytest.mark.parametrize("backend", ["cuda", "reference", "auto"])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_like_grid_sample(backend, amp_dtype, monkeypatch, seed):
    """Under torch.autocast ATen's grid_sampler runs in float32 (autocast's fp32 list): so does
    every backend. Low-precision inputs are cast up, the output is float32, gradients come back
    in the inputs' dtypes."""
    monkeypatch.delenv("FASTSWIN_BACKEND", raising=False)
    feat, pos = make_inputs((2, 3, 5, 7, 4, 6), torch.bfloat16, seed=seed)
    feat.requires_grad_()
    pos.requires_grad_()
    with torch.autocast("cpu", dtype=amp_dtype):
        out = fs_bilinear_sample(feat, pos, backend=backend)
        ref = grid_ref(feat, pos)
    assert ref.dtype == torch.float32 and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, dtype=torch.float32)
    for a, b in zip(torch.autograd.grad(out, (feat, pos), g), torch.autograd.grad(ref, (feat, pos), g)):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * b.abs().max().item())


@needs_op
def test_autocast_op_mixed_dtypes_and_compile(seed):
    """The op itself (torch.library autocast rule): mixed low/full precision inputs, as
    grid_sample accepts them under autocast; float64 is left alone; autocast off changes nothing;
    torch.compile traces it."""
    feat, pos = make_inputs((2, 3, 5, 7, 4, 6), torch.float32, seed=seed)
    for f, p in [(feat.bfloat16(), pos), (feat, pos.half()), (feat.bfloat16(), pos.bfloat16())]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = op(f, p), grid_ref(f, p)
        assert out.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    f64, p64 = feat.double(), pos.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op(f64, p64).dtype == torch.float64
    assert op(feat.bfloat16(), pos.bfloat16()).dtype == torch.bfloat16  # no autocast: runs in bf16
    fn = torch.compile(op, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(feat.bfloat16(), pos)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, grid_ref(feat.bfloat16().float(), pos), rtol=1e-5, atol=1e-5)


FAKE_BAD = [
    # (feat shape, pos shape, grad_out shape or None, message)
    ((2, 3, 0, 7), (2, 4, 6, 2), None, "feat: expected H >= 1 and W >= 1"),
    ((2, 3, 5, 0), (2, 4, 6, 2), None, "feat: expected H >= 1 and W >= 1"),
    ((2, 3, 5, 7), (2, 4, 6, 2), (2, 3, 4, 5), "grad_out: expected shape"),
    ((2, 3, 5, 7), (2, 4, 6, 2), (2, 3, 4, 6, 1), "grad_out: expected shape"),
    ((2, 3, 5, 7), (2, 4, 6, 2), (2, 2, 4, 6), "grad_out: expected shape"),
]


@needs_op
@pytest.mark.parametrize("fshape,pshape,gshape,msg", FAKE_BAD)
def test_fake_kernels_check_like_cpp(fshape, pshape, gshape, msg):
    """The fake (meta) kernels reject what the C++ checks reject, with the same message."""
    for device in ("cpu", "meta"):
        feat, pos = torch.randn(fshape).to(device), (torch.rand(pshape) * 2 - 1).to(device)
        with pytest.raises(RuntimeError, match=msg):
            if gshape is None:
                op(feat, pos)
            else:
                torch.ops.fastswin.bilinear_sample_backward(torch.randn(gshape).to(device), feat, pos, True, True, False)
    # dtype and device of grad_out, on meta tensors.
    feat, pos = torch.empty(2, 3, 5, 7, device="meta"), torch.empty(2, 4, 6, 2, device="meta")
    with pytest.raises(RuntimeError, match="grad_out: expected dtype"):
        torch.ops.fastswin.bilinear_sample_backward(torch.empty(2, 3, 4, 6, dtype=torch.float64, device="meta"), feat, pos, True, True, False)
    with pytest.raises(RuntimeError, match="grad_out: expected device"):
        torch.ops.fastswin.bilinear_sample_backward(torch.empty(2, 3, 4, 6), feat, pos, True, True, False)


# ---- bad inputs -------------------------------------------------------------------------------------

BAD = [
    # (feat shape, pos shape, feat dtype, pos dtype, the argument the message must name)
    ((2, 3, 5), (2, 4, 6, 2), torch.float32, torch.float32, "feat"),
    ((2, 3, 5, 7), (2, 4, 2), torch.float32, torch.float32, "pos"),
    ((2, 3, 5, 7), (3, 4, 6, 2), torch.float32, torch.float32, "pos"),
    ((2, 3, 5, 7), (2, 4, 6, 3), torch.float32, torch.float32, "pos"),
    ((2, 3, 5, 7), (2, 4, 6, 2), torch.int32, torch.int32, "feat"),
    ((2, 3, 5, 7), (2, 4, 6, 2), torch.float32, torch.int64, "pos"),
    ((2, 3, 5, 7), (2, 4, 6, 2), torch.float32, torch.float64, "pos"),
]


def _bad_tensor(shape, dtype):
    return torch.ones(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("fshape,pshape,fdt,pdt,name", BAD)
def test_bad_inputs_functional(fshape, pshape, fdt, pdt, name):
    feat, pos = _bad_tensor(fshape, fdt), _bad_tensor(pshape, pdt)
    for backend in ("reference", "cuda", "auto"):
        with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
            fs_bilinear_sample(feat, pos, backend=backend)


@needs_op
@pytest.mark.parametrize("fshape,pshape,fdt,pdt,name", BAD)
def test_bad_inputs_op(fshape, pshape, fdt, pdt, name):
    feat, pos = _bad_tensor(fshape, fdt), _bad_tensor(pshape, pdt)
    with pytest.raises(RuntimeError, match=f"{name}: expected"):
        op(feat, pos)


@pytest.mark.parametrize("meta", ["feat", "pos"])
def test_device_mix(meta):
    """No second real device here: the meta device stands in for the mix."""
    feat, pos = torch.randn(2, 3, 5, 7), torch.rand(2, 4, 6, 2) * 2 - 1
    if meta == "feat":
        feat = feat.to("meta")
    else:
        pos = pos.to("meta")
    with pytest.raises(ValueError, match="^pos: expected device"):
        fs_bilinear_sample(feat, pos, backend="cuda" if HAS_OP else "reference")
    if HAS_OP:
        with pytest.raises(RuntimeError, match="pos: expected device"):
            op(feat, pos)


@needs_op
def test_bad_grad_out():
    feat, pos = make_inputs((2, 3, 5, 7, 4, 6))
    with pytest.raises(RuntimeError, match="grad_out: expected shape"):
        torch.ops.fastswin.bilinear_sample_backward(torch.randn(2, 3, 4, 5, dtype=torch.float64), feat, pos, True, True, False)
    with pytest.raises(RuntimeError, match="grad_out: expected dtype"):
        torch.ops.fastswin.bilinear_sample_backward(torch.randn(2, 3, 4, 6), feat, pos, True, True, False)


# ---- GPU tier -----------------------------------------------------------------------------------------

HAS_CUDA_KERNELS = HAS_OP and _extension.has_cuda_kernels()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(torch.cuda.is_available() and not HAS_CUDA_KERNELS, reason="fastswin._C was built without its CUDA kernels")
class TestCUDA:
    # (N, C, H, W, Hk, Wk): the CPU set plus DAT-like sizes (groups folded into N; a 56x56 map
    # sampled on a 14x14 grid) and one where many samples share pixels (atomic contention).
    SHAPES = SHAPES + [(8, 32, 56, 56, 14, 14), (4, 64, 14, 14, 14, 14), (2, 16, 3, 3, 40, 40), (1, 130, 9, 33, 7, 37)]

    @staticmethod
    def inputs(shape, dtype, seed, requires_grad=True):
        feat, pos = make_inputs(shape, dtype, "cuda", seed)
        return feat.requires_grad_(requires_grad), pos.requires_grad_(requires_grad)

    @staticmethod
    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_fp32_fp64_vs_grid_sample(self, shape, dtype, seed):
        feat, pos = self.inputs(shape, dtype, seed)
        out, ref = op(feat, pos), grid_ref(feat, pos)
        tol = 1e-12 if dtype == torch.float64 else 1e-5  # same arithmetic; fp32 may differ in FMA contraction
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (feat, pos), g), torch.autograd.grad(ref, (feat, pos), g)):
            # Gradients sum many terms in a different order (atomics): scale the tolerance by the size.
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_low_precision_error_rule(self, shape, dtype, seed):
        """DESIGN.md: error against float64 at most 2x (outputs) / 3x (gradients) that of
        F.grid_sample run in the same low precision (plus one ulp-sized floor for exact ties)."""
        feat, pos = self.inputs(shape, dtype, seed)
        f64, p64 = feat.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
        out, plain, ref = op(feat, pos), grid_ref(feat, pos), grid_ref(f64, p64)
        floor = LOWP_RTOL[dtype] * ref.abs().max().item()
        assert self.err(out, ref) <= 2 * self.err(plain, ref) + floor
        g = torch.randn(out.shape, device="cuda", dtype=torch.float64)
        ours = torch.autograd.grad(out, (feat, pos), g.to(dtype))
        plains = torch.autograd.grad(plain, (feat, pos), g.to(dtype))
        refs = torch.autograd.grad(ref, (f64, p64), g)
        for a, p, r in zip(ours, plains, refs):
            assert self.err(a, r) <= 3 * self.err(p, r) + LOWP_RTOL[dtype] * r.abs().max().item()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
    def test_deterministic_bitwise_and_agrees_with_fast(self, dtype, seed):
        shape = (2, 16, 3, 3, 40, 40)  # 1600 samples per 3x3 map: heavy atomic contention
        feat, pos = self.inputs(shape, dtype, seed, requires_grad=False)
        g = torch.randn(2, 16, 40, 40, device="cuda", dtype=torch.float64).to(dtype)

        def grads(deterministic, need=(True, True)):
            return torch.ops.fastswin.bilinear_sample_backward(g, feat, pos, need[0], need[1], deterministic)

        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            f, p = feat.clone().requires_grad_(), pos.clone().requires_grad_()
            out = op(f, p)
            via_autograd = torch.autograd.grad(out, (f, p), g)
        finally:
            torch.use_deterministic_algorithms(was)
        first, second = grads(True), grads(True)
        for a, b, c in zip(first, second, via_autograd):
            assert torch.equal(a, b) and torch.equal(a, c)
        fast = grads(False)
        rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, LOWP_RTOL.get(dtype))
        for a, b in zip(fast, first):
            torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=rtol * max(1.0, b.abs().max().item()))
        # One gradient at a time, both modes.
        for det in (True, False):
            gf, gp = grads(det, (True, False))
            assert gp.numel() == 0 and gf.shape == feat.shape
            gf, gp = grads(det, (False, True))
            assert gf.numel() == 0 and gp.shape == pos.shape
            torch.testing.assert_close(gp, first[1], rtol=0, atol=0)

    def test_non_contiguous_and_opcheck(self, seed):
        feat, pos = make_inputs((2, 8, 6, 9, 5, 7), torch.float32, "cuda", seed)
        feat = feat.contiguous(memory_format=torch.channels_last).requires_grad_()
        pos = pos.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        torch.testing.assert_close(op(feat, pos), grid_ref(feat, pos), rtol=1e-5, atol=1e-5)
        ours = torch.autograd.grad(op(feat, pos).sum(), (feat, pos))
        ref = torch.autograd.grad(grid_ref(feat, pos).sum(), (feat, pos))
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        torch.library.opcheck(torch.ops.fastswin.bilinear_sample.default, (feat, pos))

    def test_gradcheck_float64(self, seed):
        feat, pos = self.inputs((2, 3, 5, 7, 4, 6), torch.float64, seed)
        assert torch.autograd.gradcheck(op, (feat, pos))
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert torch.autograd.gradcheck(op, (feat, pos))
        finally:
            torch.use_deterministic_algorithms(was)

    def test_nonfinite_positions_and_backend_choice(self, seed):
        """NaN/Inf positions follow the CPU grid_sample's rule (bilinear_sample.h), as on CPU."""
        feat = torch.randn(1, 2, 4, 5, device="cuda", requires_grad=True)
        pos = nonfinite_pos(torch.float32).cuda().requires_grad_()
        out = op(feat, pos)
        f_cpu, p_cpu = feat.detach().cpu().requires_grad_(), pos.detach().cpu().requires_grad_()
        ref = grid_ref(f_cpu, p_cpu)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
        g = torch.randn_like(out)
        refs = torch.autograd.grad(ref, (f_cpu, p_cpu), g.cpu())
        for det in (False, True):
            grads = torch.ops.fastswin.bilinear_sample_backward(g, feat.detach(), pos.detach(), True, True, det)
            for a, b in zip(grads, refs):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert backends.select("bilinear_sample", "auto", feat, pos.clamp(-1, 1)).backend == "cuda"

    @pytest.mark.slow
    def test_int64_indexing(self, seed):
        """N*C*H*W > 2^31: offsets must be computed in int64. Sampled near the end of the tensor and
        checked against grid_sample on the cropped corner (pixel centres stay put under
        align_corners=True when the positions are renormalized to the crop)."""
        free, _ = torch.cuda.mem_get_info()
        if free < 24 * 2**30:
            pytest.skip("needs ~24 GiB of free GPU memory")
        N, C, H, W = 2, 1, 32768, 32770  # 2.15e9 elements > 2^31, fp16: 4 GiB
        feat = torch.empty(N, C, H, W, device="cuda", dtype=torch.float16).normal_()
        pos = (torch.rand(N, 16, 16, 2, device="cuda") * 0.02 + 0.97).half()  # bottom-right corner
        out = op(feat, pos)
        g = torch.randn_like(out)
        gf, gp = torch.ops.fastswin.bilinear_sample_backward(g, feat, pos, True, True, False)

        rows = slice(int(0.96 * (H - 1)), H)
        cols = slice(int(0.96 * (W - 1)), W)
        f_small = feat[:, :, rows, cols].float().requires_grad_()
        iy = (pos[..., 0].float() + 1) / 2 * (H - 1) - rows.start
        ix = (pos[..., 1].float() + 1) / 2 * (W - 1) - cols.start
        hs, ws = f_small.shape[2], f_small.shape[3]
        p_small = torch.stack([iy / (hs - 1) * 2 - 1, ix / (ws - 1) * 2 - 1], -1)
        ref = grid_ref(f_small, p_small)
        # fp16 output and positions quantized to fp16 then re-expressed in fp32: loose tolerances.
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
        (ref_gf,) = torch.autograd.grad(ref, (f_small,), g.float())
        torch.testing.assert_close(gf[:, :, rows, cols].float(), ref_gf, rtol=1e-2, atol=1e-2)
        # grad_feat is zero outside the sampled corner.
        assert not gf[:, :, : rows.start].any() and not gf[:, :, :, : cols.start].any()
        assert gp.shape == pos.shape and torch.isfinite(gp).all()
