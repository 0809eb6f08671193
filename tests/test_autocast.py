"""Training features: CPU bfloat16 autocast, deterministic mode, gradient checkpointing.

Autocast (``torch.autocast("cpu", dtype=torch.bfloat16)``, float32 parameters): fastswin adds no
autocast rule of its own to the attention; every op it runs is the ATen op the original runs, so
each computes in the dtype autocast gives the original's op: linear / matmul / einsum / conv in
bf16 (parameters cast on the fly), the V2 cpb MLP and 16*sigmoid in bf16, the V2 logit scale in
float32 (so the scaled cosine logits promote to float32), bias + mask additions promote to
float32, softmax float32, attn @ v back in bf16; in DAT the offsets are bf16 until the float32
offset range promotes the positions to float32. The one registered rule: ``bilinear_sample`` is
on autocast's float32 list, like ``F.grid_sample``. Oracles and tolerances:

* a patched tiny timm Swin V1 / V2 model against the same model unpatched: the output (bf16) and
  the input gradient are **bitwise** equal. Parameter gradients are equal up to reduction order:
  where the map is padded, timm gets the qkv bias's gradient from padded tokens inside the bf16
  linear backward (a bf16 sum, rounded once), the patched op gets it as the separate ``pad_qkv``
  gradient added in float32, and a few fp32 weight-gradient GEMMs see their operands in another
  layout. Both are roundings of the same sum, so the bound is two bf16 ulps (2**-7 relative) of
  each gradient tensor's largest element.
* ``fastswin.WindowAttention`` / ``WindowAttentionV2`` against timm's modules: bitwise, forward
  and backward (the same ATen ops in the same order).
* ``fastswin.DeformableAttention`` (reference backend) against the official DAT math re-derived
  in ``test_dat_module.derived_forward``, under the same autocast: ``pos`` and ``reference``
  (float32 under autocast, since the original's offset range is a float32 tensor) bitwise; ``y``
  (bf16) cannot be bitwise because the re-derivation orders some products differently from the
  original (einsum for the 1x1 convs), so the DESIGN.md error rule applies: ``y``'s error
  against the float64 module is at most 2x that of the re-derivation under autocast, plus a
  floor of one bf16 ulp of max|y|.

Deterministic mode (``torch.use_deterministic_algorithms(True)``) reaches the Triton backward
kernels (table gradients without atomics): the Triton window-attention backward (a patched
model) and the DAT backward (a module) are bitwise reproducible under the interpreter
(``@pytest.mark.triton``). Gradient checkpointing (``use_reentrant=False``) of a
``DeformableAttention`` gives bitwise the gradients of the plain run in float64.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastswin
from test_dat_module import derived_forward, make_cfg
from test_patch import _set_fused, _timm_model

f64, f32, bf16 = torch.float64, torch.float32, torch.bfloat16
BF16_ULP = 2.0 ** -8  # relative spacing of bf16 just above 1 (8 significand bits)


def _autocast():
    return torch.autocast("cpu", dtype=bf16)


def _randomize(m, scale=0.5):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * scale)


def _grads(fn, x, params, go_seed=123):
    """(output, d input, d params) for sum(fn(x) * g) with a fixed random g (float32 loss)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(go_seed), dtype=f32)
    gs = torch.autograd.grad((out.float() * g).sum(), [x] + list(params), allow_unused=True)
    return out.detach(), gs[0], gs[1:]


# ---- autocast: patched timm model ---------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("img", [32, 36], ids=["fits", "padded"])  # 36: 9x9 and 5x5 maps, padded
def test_patched_model_autocast_matches_unpatched(seed, v2, img):
    m = _timm_model(v2, img=img, window=4).float()
    if not v2:
        _set_fused(m, False)
    names, params = zip(*m.named_parameters())
    x = torch.randn(2, 3, img, img)

    def run():
        with _autocast():
            return _grads(m, x, params)

    want = run()
    assert fastswin.patch(m, backend="reference") == 4
    try:
        got = run()
    finally:
        fastswin.unpatch(m)
    assert got[0].dtype == want[0].dtype == bf16
    assert torch.equal(got[0], want[0]), "output"
    assert got[1].dtype == want[1].dtype == f32
    assert torch.equal(got[1], want[1]), "input gradient"
    for n, a, b in zip(names, got[2], want[2]):
        assert a.dtype == b.dtype == f32, n
        tol = 2 * BF16_ULP * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda s: f"grad {n}: {s}")


# ---- autocast: the modules --------------------------------------------------------------------


def _timm_shift_mask(window, nw=(2, 2)):
    from timm.models.swin_transformer import SwinTransformerBlock

    blk = SwinTransformerBlock(dim=8, input_resolution=(window[0] * nw[0], window[1] * nw[1]), num_heads=2,
                               window_size=window, shift_size=(window[0] // 2, window[1] // 2))
    return blk.attn_mask.float()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_modules_autocast_match_timm(seed, v2, masked):
    from timm.models.swin_transformer import WindowAttention as TimmV1
    from timm.models.swin_transformer_v2 import WindowAttention as TimmV2

    kw = dict(dim=16, num_heads=2, window_size=(4, 4))
    if v2:
        kw.update(pretrained_window_size=(6, 6))
    t = (TimmV2 if v2 else TimmV1)(**kw)
    o = (fastswin.WindowAttentionV2 if v2 else fastswin.WindowAttention)(**kw, backend="reference")
    if not v2:
        t.fused_attn = o.fused_attn = False
    _randomize(t)
    o.load_state_dict(t.state_dict())
    mask = _timm_shift_mask((4, 4)) if masked else None
    x = torch.randn(8, 16, 16)
    with _autocast():
        want = _grads(lambda x: t(x, mask), x, t.parameters())
        got = _grads(lambda x: o(x, mask), x, o.parameters())
    assert got[0].dtype == want[0].dtype == bf16
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    for (n, _), a, b in zip(t.named_parameters(), got[2], want[2]):
        assert (a is None) == (b is None), n
        assert a is None or torch.equal(a, b), n


DAT_AUTOCAST_CASES = [
    ("dat", dict()),
    ("dat", dict(stride=2, offset_range_factor=-1, n_groups=1)),
    ("dat", dict(dwc_pe=True)),
    ("dat++", dict()),
    ("dat++", dict(log_cpb=True)),
    ("dat++", dict(fixed_pe=True, n_groups=2)),
]


@pytest.mark.parametrize("variant,kw", DAT_AUTOCAST_CASES,
                         ids=[f"{v}-" + (",".join(f"{k}={x}" for k, x in kw.items()) or "default")
                              for v, kw in DAT_AUTOCAST_CASES])
def test_deformable_attention_autocast_matches_official_math(seed, variant, kw):
    cfg = make_cfg(variant, **kw)
    m = fastswin.DeformableAttention(**cfg, variant=variant, backend="reference")
    _randomize(m)
    x = torch.randn(2, m.nc, *cfg["q_size"])
    P = dict(m.named_parameters())
    with _autocast():
        got = m(x)
        want = derived_forward(variant, cfg, P, x)
    m64 = fastswin.DeformableAttention(**cfg, variant=variant, backend="reference").double()
    m64.load_state_dict(m.state_dict())
    with torch.no_grad():
        y64 = m64(x.double())[0]
    for a, b, name in zip(got, want, ("y", "pos", "reference")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
    assert got[0].dtype == bf16
    assert got[1].dtype == got[2].dtype == f32
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    err = (got[0].double() - y64).abs().max().item()
    err_orig = (want[0].double() - y64).abs().max().item()
    assert err <= 2 * err_orig + BF16_ULP * y64.abs().max().item(), (err, err_orig)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_bilinear_sample_runs_in_float32_under_autocast(seed, backend):
    if backend == "cuda" and fastswin.backends.explain("bilinear_sample", torch.randn(1, 1, 2, 2),
                                                        torch.zeros(1, 1, 1, 2))["cuda"]:
        pytest.skip("the compiled extension is not available")
    feat = torch.randn(2, 3, 5, 6).to(bf16)
    pos = (torch.rand(2, 4, 3, 2) * 2.2 - 1.1).to(bf16)
    with _autocast():
        want = F.grid_sample(feat, pos.flip(-1), mode="bilinear", padding_mode="zeros", align_corners=True)
        got = fastswin.functional.bilinear_sample(feat, pos, backend=backend)
    assert want.dtype == got.dtype == f32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- deterministic mode (Triton, under the interpreter) ---------------------------------------


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _spy(monkeypatch, module, name, flag):
    """Record the ``deterministic`` argument ``module.name`` is called with."""
    seen = []
    fn = getattr(module, name)

    def wrapped(*a, **k):
        seen.append(k[flag] if isinstance(flag, str) else a[flag])
        return fn(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return seen


@pytest.mark.triton
def test_triton_patched_model_backward_deterministic(seed, monkeypatch, deterministic):
    from fastswin.ops import window_attention_triton as W

    seen = _spy(monkeypatch, W._kernels(), "_launch_bwd", -1)
    m = _timm_model(True, img=16, window=4, depths=(1,), num_heads=(2,))  # 4x4 map: one window, shift 0
    m2 = _timm_model(False, img=32, window=4, depths=(2,), num_heads=(2,))  # 8x8 map: 4 windows, shifted
    _set_fused(m2, False)
    for model, img in ((m, 16), (m2, 32)):
        names, params = zip(*model.named_parameters())
        x = torch.randn(1, 3, img, img, dtype=f64)
        want = _grads(model, x, params)  # reference oracle (unpatched)
        fastswin.patch(model, backend="triton")
        a = _grads(model, x, params)
        b = _grads(model, x, params)
        assert seen and all(s is True for s in seen)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for n, ga, gb, gw in zip(names, a[2], b[2], want[2]):
            assert torch.equal(ga, gb), n
            torch.testing.assert_close(ga, gw, rtol=0, atol=1e-10, msg=lambda s: f"grad {n}: {s}")


@pytest.mark.triton
def test_triton_dat_backward_deterministic(seed, monkeypatch, deterministic):
    from fastswin.ops import deformable_attention_triton as D

    seen = _spy(monkeypatch, D._kernels(), "deformable_attention_bwd", "deterministic")
    cfg = make_cfg("dat", q_size=(4, 4), kv_size=(4, 4), stride=2)
    ref = fastswin.DeformableAttention(**cfg, variant="dat", backend="reference").double()
    _randomize(ref)
    tri = fastswin.DeformableAttention(**cfg, variant="dat", backend="triton").double()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, ref.nc, 4, 4, dtype=f64)
    want = _grads(lambda x: ref(x)[0], x, ref.parameters())
    a = _grads(lambda x: tri(x)[0], x, tri.parameters())
    b = _grads(lambda x: tri(x)[0], x, tri.parameters())
    assert seen == [True, True]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for (n, _), ga, gb, gw in zip(ref.named_parameters(), a[2], b[2], want[2]):
        assert torch.equal(ga, gb), n
        torch.testing.assert_close(ga, gw, rtol=0, atol=1e-10, msg=lambda s: f"grad {n}: {s}")


# ---- gradient checkpointing -------------------------------------------------------------------


def _checkpoint_case(variant, backend, kw):
    cfg = make_cfg(variant, **kw)
    m = fastswin.DeformableAttention(**cfg, variant=variant, backend=backend).double()
    _randomize(m)
    x = torch.randn(2, m.nc, *cfg["q_size"], dtype=f64)

    def plain(x):
        y, pos, _ = m(x)
        return y + pos.sum()  # both outputs carry gradient

    def ckpt(x):
        y, pos, _ = checkpoint(m, x, use_reentrant=False)
        return y + pos.sum()

    names = [n for n, _ in m.named_parameters()]
    a = _grads(plain, x, m.parameters())
    b = _grads(ckpt, x, m.parameters())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for n, ga, gb in zip(names, a[2], b[2]):
        assert (ga is None) == (gb is None), n
        assert ga is None or torch.equal(ga, gb), n


@pytest.mark.parametrize("variant,kw", [("dat", {}), ("dat++", dict(log_cpb=True, stride=2))])
def test_checkpoint_deformable_attention(seed, variant, kw):
    _checkpoint_case(variant, "reference", kw)


@pytest.mark.triton
def test_checkpoint_deformable_attention_triton(seed):
    _checkpoint_case("dat", "triton", dict(q_size=(4, 4), kv_size=(4, 4), stride=2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_checkpoint_patched_timm_model(seed, v2):
    """timm's own ``set_grad_checkpointing`` (non-reentrant checkpoint per block) on a patched model."""
    m = _timm_model(v2, img=32, window=4, depths=(2,), num_heads=(2,))  # 8x8 map, W-MSA + SW-MSA
    if not v2:
        _set_fused(m, False)
    fastswin.patch(m, backend="reference")
    names, params = zip(*m.named_parameters())
    x = torch.randn(2, 3, 32, 32, dtype=f64)
    a = _grads(m, x, params)
    m.set_grad_checkpointing(True)
    b = _grads(m, x, params)
    assert all(layer.grad_checkpointing for layer in m.layers)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for n, ga, gb in zip(names, a[2], b[2]):
        assert torch.equal(ga, gb), n
