"""``torch.compile(fullgraph=True)`` of fastswin's modules and of patched timm Swin models.

Main check: ``fullgraph=True`` raises on any graph break; on top of that dynamo's
``graph_break`` counter must stay empty. Oracle: the same module run eagerly (outputs and the
gradients of the input and of every parameter).

* CPU tier (always runs): ``backend="aot_eager"`` on tiny shapes, the "reference" backend and,
  marked ``triton``, the Triton kernels under ``TRITON_INTERPRET=1``. float32 (Swin) / float64
  (DAT); compiled vs eager within 1e-5 (float32) / 1e-10 (float64) of the magnitude.
* GPU tier (``gpu``): the default inductor backend, fp32 and bf16 autocast. fp32: compiled vs eager
  within a tf32-aware tolerance. bf16: error against a float64 eager reference at most 2x (output)
  / 3x (gradients) that of plain PyTorch (the "reference" backend) under the same autocast, plus
  1e-4 x the magnitude (the rule of ``test_window_attention_gpu.py`` / ``compare``).
"""
import contextlib
import copy

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import fastswin
from test_dat_module import make_cfg
from test_patch import _timm_model

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

# ---- helpers -------------------------------------------------------------------------------------


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def run(module, fn, x, *args, autocast=None):
    """Outputs of ``fn(x, *args)``, then the gradients of x and of every parameter of ``module``
    (a fixed random cotangent on every floating output that carries a gradient)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        outs = _outputs(fn(x, *args))
    gen = torch.Generator(device=x.device).manual_seed(123)
    loss = 0
    for o in outs:
        if o.requires_grad:
            loss = loss + (o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
    loss.backward()
    return [o.detach() for o in outs] + [x.grad] + [p.grad for p in module.parameters()]


def compiled_run(module, x, *args, autocast=None, **compile_kw):
    """``run`` through ``torch.compile(module, fullgraph=True)``, asserting no graph break."""
    torch._dynamo.reset()
    counters.clear()
    c = torch.compile(module, fullgraph=True, **compile_kw)
    got = run(module, c, x, *args, autocast=autocast)
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    torch._dynamo.reset()
    return got


def assert_close(got, want, tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, i
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert torch.isfinite(a).all(), f"[{i}] not finite"
        err = (a.double() - b.double()).abs().max().item()
        mag = b.double().abs().max().item()
        assert err <= tol * max(mag, 1.0), f"[{i}] max error {err:.3g} vs magnitude {mag:.3g}"


def assert_error_rule(got, low, exact, n_out):
    """bf16: |got - exact| <= 2x (outputs) / 3x (gradients) |low - exact| + 1e-4 x magnitude."""
    for i, (a, l, b) in enumerate(zip(got, low, exact)):
        if b is None:
            assert a is None and l is None, i
            continue
        assert a.shape == b.shape, i
        assert torch.isfinite(a).all(), f"[{i}] not finite"
        err = (a.double() - b).abs().max().item()
        err_pt = (l.double() - b).abs().max().item()
        mag = b.abs().max().item()
        factor = 2 if i < n_out else 3
        assert err <= factor * err_pt + 1e-4 * max(mag, 1.0), (
            f"[{i}] error {err:.3g} > {factor} x PyTorch's {err_pt:.3g} (magnitude {mag:.3g})")


def _tiny_swin(v2, dtype=F32):
    # one stage of two blocks (the second shifted, so the mask path runs): 8x8 tokens, window 4
    return _timm_model(v2, img=32, embed_dim=16, depths=(2,), num_heads=(2,)).to(dtype)


def _dat(variant, backend, dtype=F64, device="cpu"):
    m = fastswin.DeformableAttention(**make_cfg(variant, use_pe=True), variant=variant, backend=backend)
    return m.to(device=device, dtype=dtype).eval()


# ---- CPU tier: aot_eager ------------------------------------------------------------------------


SWIN_CPU = [
    pytest.param(False, "reference", id="v1-reference"),
    pytest.param(True, "reference", id="v2-reference"),
    pytest.param(False, "triton", id="v1-triton", marks=pytest.mark.triton),
    pytest.param(True, "triton", id="v2-triton", marks=pytest.mark.triton),
]


@pytest.mark.parametrize("v2,backend", SWIN_CPU)
def test_cpu_patched_swin_aot_eager(seed, v2, backend):
    m = _tiny_swin(v2)
    assert fastswin.patch(m, backend=backend) == 2
    x = torch.randn(1, 3, 32, 32)
    want = run(m, m, x)
    got = compiled_run(m, x, backend="aot_eager")
    assert_close(got, want, 1e-5)


DAT_CPU = [
    pytest.param("dat", "reference", id="dat-reference"),
    pytest.param("dat++", "reference", id="datpp-reference"),
    pytest.param("dat", "triton", id="dat-triton", marks=pytest.mark.triton),
    pytest.param("dat++", "triton", id="datpp-triton", marks=pytest.mark.triton),
]


@pytest.mark.parametrize("variant,backend", DAT_CPU)
def test_cpu_deformable_attention_aot_eager(seed, variant, backend):
    m = _dat(variant, backend)  # float64: the reference and the interpreted Triton kernels allow it
    x = torch.randn(2, 12, 6, 5, dtype=F64)
    want = run(m, m, x)
    got = compiled_run(m, x, backend="aot_eager")
    assert_close(got, want, 1e-10)


def test_cpu_auto_backend_fullgraph(seed, caplog):
    """backend="auto" compiles without a graph break, also with fastswin's debug log on (the
    backend choice is logged at trace time only outside torch.compile: dynamo cannot trace Logger
    methods, which was one graph break per auto-dispatched op)."""
    caplog.set_level(logging.DEBUG, logger="fastswin")
    m = fastswin.WindowAttention(16, 2, window_size=4, backend="auto").double()
    x = torch.randn(4, 16, 16, dtype=F64)
    want = run(m, m, x)
    got = compiled_run(m, x, backend="aot_eager")
    assert_close(got, want, 1e-10)


# ---- GPU tier: inductor -------------------------------------------------------------------------


def _fp32_tol():
    return 5e-3 if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 else 1e-4


def _copies(base):
    """make(backend) for check_gpu: a deep copy of ``base`` (same weights), on ``backend`` if given."""

    def make(backend):
        m = copy.deepcopy(base)
        if backend is not None:
            m.backend = backend
        return m

    return make


def check_gpu(make, x, *args, dtype):
    """make(backend) -> a cuda fp32 module (same weights for every backend). Compiled (inductor)
    vs eager on its own backend; bf16 under autocast, with the error rule."""
    m = make(None)
    n_out = len(_outputs(m(x, *args)))
    autocast = BF16 if dtype == BF16 else None
    got = compiled_run(m, x, *args, autocast=autocast)
    eager = run(m, m, x, *args, autocast=autocast)
    if dtype == F32:
        assert_close(got, eager, _fp32_tol())
        return
    ref = make("reference")
    low = run(ref, ref, x, *args, autocast=BF16)
    ref64 = copy.deepcopy(ref).double()
    exact = run(ref64, ref64, x.double(), *[a.double() if torch.is_tensor(a) else a for a in args])
    assert_error_rule(got, low, exact, n_out)
    assert_error_rule(eager, low, exact, n_out)


GPU_DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]
GPU_BACKENDS = ["triton", "auto"]


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_gpu_window_attention_module(seed, v2, backend, with_mask, dtype):
    dim, heads, window, nw, B = 64, 2, 7, 4, 2
    n = window * window
    if v2:
        base = fastswin.WindowAttentionV2(dim, window_size=window, num_heads=heads, backend=backend)
    else:
        base = fastswin.WindowAttention(dim, heads, window_size=window, backend=backend)
    base = base.cuda()
    with torch.no_grad():  # non-trivial bias table / logit scale
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    make = _copies(base)

    x = torch.randn(B * nw, n, dim, device="cuda")
    args = ()
    if with_mask:
        args = (torch.where(torch.rand(nw, n, n, device="cuda") < 0.3, -100.0, 0.0),)
    check_gpu(make, x, *args, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_gpu_deformable_attention(seed, variant, backend, dtype):
    base = _dat(variant, backend, dtype=F32, device="cuda")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    make = _copies(base)

    x = torch.randn(2, 12, 6, 5, device="cuda")
    check_gpu(make, x, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_gpu_patched_swin(seed, v2, backend, dtype):
    base = _timm_model(v2, img=64, window=4).float().cuda()  # 16x16 then 8x8 tokens, shifted blocks

    def make(be):
        m = copy.deepcopy(base)
        assert fastswin.patch(m, backend=be or backend) == 4
        return m

    x = torch.randn(2, 3, 64, 64, device="cuda")
    check_gpu(make, x, dtype=dtype)


class _Logits(torch.nn.Module):
    """A DAT backbone's logits only (its forward also returns positions and references)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_cpu_dat_backbone_aot_eager(seed, variant):
    """A small fastswin.models DAT / DAT++ (every block type of the variant, one per stage) compiles
    with fullgraph=True and equals eager, outputs and every gradient (float64, reference)."""
    from test_dat_models import small

    import fastswin.models as M

    spec = [["S"], ["L"], ["D"], ["D"]] if variant == "dat" else [["N"], ["D"], ["D"], ["D"]]
    net = M.DAT(**small(variant, depths=[1, 1, 1, 1], stage_spec=spec), backend="reference").to(F64).eval()
    m = _Logits(net)
    x = torch.randn(1, 3, 64, 64, dtype=F64)
    want = run(m, m, x)
    got = compiled_run(m, x, backend="aot_eager")
    assert_close(got, want, 1e-10)
