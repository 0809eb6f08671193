"""fastswin.patch / unpatch on built timm (and torchvision) Swin models.

Oracle: the same model unpatched. Tiny random-init models in float64 on the reference backend:
outputs and every gradient (parameters and input) within 1e-10. Training-mode cases reseed before
each run: the patched path draws timm's / torchvision's dropout masks exactly, so they compare too.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block

import fastswin
from fastswin import BackendUnavailableError
from fastswin._patch import is_patched, patch, unpatch

f64 = torch.float64
TOL = 1e-10


# ---- helpers -------------------------------------------------------------------------------------


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def _timm_model(v2, img=32, window=4, **kw):
    kw = dict(dict(img_size=img, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=window,
                   num_classes=10, drop_path_rate=0.0), **kw)
    if v2:
        m = SwinTransformerV2(**kw)
    else:
        m = SwinTransformer(**kw)
    m = m.to(f64).eval()
    _randomize(m)
    return m


def _set_fused(model, fused):
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused


def _run(model, x, seed=None, output=lambda o: o, **kw):
    """Output and gradients (input first, then every parameter by name); ``output`` picks the
    tensor from what ``model(x, **kw)`` returns (e.g. a Hugging Face output's ``.logits``)."""
    if seed is not None:
        torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = output(model(x, **kw))
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(123))
    (out * g).sum().backward()
    grads = {"<input>": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return out.detach(), grads


def _assert_same_run(a, b, tol=TOL):
    out_a, g_a = a
    out_b, g_b = b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=tol)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        if g_a[name] is None or g_b[name] is None:
            assert g_a[name] is None and g_b[name] is None, name
            continue
        torch.testing.assert_close(g_a[name], g_b[name], rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


def _compare(model, x, seed=None, backend="reference"):
    """patched vs unpatched on the same model (unpatched again afterwards)."""
    assert not is_patched(model)
    want = _run(model, x, seed)
    n = patch(model, backend=backend)
    assert n > 0 and is_patched(model)
    try:
        got = _run(model, x, seed)
    finally:
        unpatch(model)
    _assert_same_run(want, got)
    return n


def _uses_op(monkeypatch):
    """Count calls of the block-level ops (so a silent fallback cannot pass as 'patched')."""
    import fastswin._patch as P

    calls = []
    for name in ("shifted_window_attention", "shifted_window_attention_v2"):
        fn = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    return calls


# ---- timm: eval-mode equality ----------------------------------------------------------------------


TIMM_CASES = [  # (v2, model kwargs, input (H, W))
    (False, dict(img=32, window=4), (32, 32)),
    (True, dict(img=32, window=4), (32, 32)),
    (False, dict(img=32, window=(2, 4)), (32, 32)),  # non-square window
    (True, dict(img=32, window=(4, 2), pretrained_window_sizes=(6, 3)), (32, 32)),
    (True, dict(img=32, window=4, pretrained_window_sizes=(8, 8)), (32, 32)),
    # feature maps 9x9 / 5x5: not multiples of the window (padding), last stage smaller than window
    (False, dict(img=36, window=4), (36, 36)),
    (True, dict(img=36, window=4), (36, 36)),
    # always_partition: window > resolution in the last stage is padded, shift kept
    (False, dict(img=24, window=4, always_partition=True), (24, 24)),
    (True, dict(img=24, window=4, always_partition=True), (24, 24)),
    # dynamic masks (strict_img_size=False), inputs of other sizes than img_size
    (False, dict(img=32, window=4, strict_img_size=False), (44, 52)),
    (True, dict(img=32, window=4, strict_img_size=False), (20, 36)),
    (False, dict(img=32, window=(4, 2), strict_img_size=False, always_partition=True), (28, 12)),
]


@pytest.mark.parametrize("v2,kw,hw", TIMM_CASES)
def test_timm_patched_equals_unpatched(v2, kw, hw, monkeypatch):
    m = _timm_model(v2, **kw)
    if not v2:
        _set_fused(m, False)
    x = torch.randn(2, 3, *hw, dtype=f64)
    calls = _uses_op(monkeypatch)
    n = _compare(m, x)
    assert n == 4
    assert len(calls) == 4  # every block ran the op (no fallback)


def test_timm_v1_fused_attn_branch():
    """timm's SDPA branch (fused_attn=True): the op runs the reference in SDPA form."""
    m = _timm_model(False, img=36, window=4)
    _set_fused(m, True)
    _compare(m, torch.randn(2, 3, 36, 36, dtype=f64))


def test_timm_scale_read_at_call_time():
    m = _timm_model(False, img=36, window=4)
    _set_fused(m, False)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.scale = 0.3
    _compare(m, torch.randn(1, 3, 36, 36, dtype=f64))


def test_qkv_bias_variants():
    m = _timm_model(False, img=32, window=4, qkv_bias=False)
    _compare(m, torch.randn(1, 3, 32, 32, dtype=f64))
    m = _timm_model(True, img=36, window=4, qkv_bias=False)
    _compare(m, torch.randn(1, 3, 36, 36, dtype=f64))
    m = _timm_model(True, img=36, window=4)
    for mod in m.modules():
        if hasattr(mod, "qkv_bias_separate"):
            mod.qkv_bias_separate = True
    _compare(m, torch.randn(1, 3, 36, 36, dtype=f64))


@pytest.mark.parametrize("v2", [False, True])
def test_set_input_size_after_patch(v2, monkeypatch):
    m = _timm_model(v2, img=32, window=4)
    x = torch.randn(2, 3, 40, 24, dtype=f64)
    assert patch(m, backend="reference") == 4
    m.set_input_size(img_size=(40, 24), window_size=(4, 2))
    calls = _uses_op(monkeypatch)
    got = _run(m, x)
    assert len(calls) == 4
    assert unpatch(m) == 4
    _assert_same_run(_run(m, x), got)
    # and back to a size where the last stage is smaller than the window
    patch(m, backend="reference")
    m.set_input_size(img_size=(24, 24), window_size=4)
    y = torch.randn(1, 3, 24, 24, dtype=f64)
    got = _run(m, y)
    unpatch(m)
    _assert_same_run(_run(m, y), got)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_training_dropout_draws_match(v2, fused):
    """attn_drop + proj_drop + drop_path in training: same seed, same masks, same result."""
    if v2 and fused:
        pytest.skip("timm V2 has no fused path")
    # drop_path too: outside _attn, but it draws in between the blocks' dropouts
    m = _timm_model(v2, img=36, window=4, attn_drop_rate=0.2, proj_drop_rate=0.15, drop_path_rate=0.2)
    if not v2:
        _set_fused(m, fused)
    m.train()
    x = torch.randn(2, 3, 36, 36, dtype=f64)
    _compare(m, x, seed=7)
    # and it really drops: two seeds differ
    patch(m, backend="reference")
    a, _ = _run(m, x, seed=1)
    b, _ = _run(m, x, seed=2)
    assert not torch.allclose(a, b)


def test_training_dropout_explicit_fused_backend_raises():
    m = _timm_model(False, img=32, window=4, attn_drop_rate=0.1).train()
    patch(m, backend="triton")
    with pytest.raises(BackendUnavailableError, match="dropout"):
        m(torch.randn(1, 3, 32, 32, dtype=f64))


@pytest.mark.parametrize("v2", [False, True])
def test_checkpoint_through_patched_block(v2):
    m = _timm_model(v2, img=36, window=4, attn_drop_rate=0.2, proj_drop_rate=0.1).train()
    block = m.layers[0].blocks[1]  # shifted, padded (9x9 map, window 4)
    patch(m, backend="reference")
    x = torch.randn(2, 9, 9, 24, dtype=f64)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, t):
            return self.block(t)

    class Ckpt(Plain):
        def forward(self, t):
            return torch.utils.checkpoint.checkpoint(self.block, t, use_reentrant=False)

    want = _run(Plain(), x, seed=3)
    got = _run(Ckpt(), x, seed=3)
    _assert_same_run(want, got)
    unpatch(m)
    _assert_same_run(_run(Plain(), x, seed=3), got)


def test_fastswin_attention_inside_timm_block():
    """A timm block whose attn was swapped for fastswin.WindowAttention is patched too."""
    blk = SwinTransformerBlock(16, (6, 10), num_heads=2, window_size=4, shift_size=2, dtype=f64).eval()
    _randomize(blk)
    ours = fastswin.WindowAttention(16, num_heads=2, window_size=4, dtype=f64)
    ours.load_state_dict(blk.attn.state_dict())
    blk.attn = ours
    _set_fused(blk, False)
    _compare(blk, torch.randn(2, 6, 10, 16, dtype=f64))


# ---- structure: state_dict, idempotence, unpatch, copies -----------------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_state_dict_modules_unchanged_and_unpatch_restores(v2):
    m = _timm_model(v2, img=36, window=4)
    sd = m.state_dict()
    names = [n for n, _ in m.named_modules()]
    bufs = {n: b.clone() for n, b in m.named_buffers()}
    x = torch.randn(2, 3, 36, 36, dtype=f64)
    before = m(x)
    assert patch(m) == 4
    sd2 = m.state_dict()
    assert list(sd2) == list(sd)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert [n for n, _ in m.named_modules()] == names
    assert {n: b for n, b in m.named_buffers()}.keys() == bufs.keys()
    m.load_state_dict(sd, strict=True)  # loads into the patched model
    assert unpatch(m) == 4
    assert not is_patched(m)
    for mod in m.modules():
        assert "_attn" not in mod.__dict__
    assert torch.equal(m(x), before)  # bitwise: the original path again
    assert unpatch(m) == 0


def test_patch_twice_is_idempotent():
    m = _timm_model(False)
    assert patch(m, backend="reference") == 4
    first = [b.__dict__["_attn"] for b in m.modules() if isinstance(b, SwinTransformerBlock)]
    assert patch(m, backend="auto") == 4
    second = [b.__dict__["_attn"] for b in m.modules() if isinstance(b, SwinTransformerBlock)]
    assert all(a is b for a, b in zip(first, second))
    assert all(a.backend == "auto" and a.original is SwinTransformerBlock._attn for a in second)
    assert unpatch(m) == 4 and not is_patched(m)


def test_deepcopy_and_pickle_of_patched_model():
    m = _timm_model(True, img=36, window=4)
    patch(m, backend="reference")
    x = torch.randn(1, 3, 36, 36, dtype=f64)
    want = m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert is_patched(clone)
        for b in clone.modules():
            if isinstance(b, SwinTransformerV2Block):
                assert b.__dict__["_attn"].owner is b  # points at the copy, not the original
        torch.testing.assert_close(clone(x), want, rtol=0, atol=0)
        assert unpatch(clone) == 4
    assert is_patched(m)


def test_single_block_and_mixed_patch_count():
    blk = SwinTransformerV2Block(16, (8, 8), num_heads=2, window_size=4, shift_size=2, dtype=f64)
    assert patch(blk) == 1 and is_patched(blk)
    assert unpatch(blk) == 1


def test_public_export_stays_callable():
    """``fastswin.patch`` must be the function, even after the implementation module is imported
    (a submodule named ``fastswin/patch.py`` would replace the attribute with the module)."""
    if "patch" not in getattr(fastswin, "__all__", ()):
        pytest.skip("fastswin does not export patch yet")
    import importlib

    impl = importlib.import_module("fastswin._patch")
    for name in ("patch", "unpatch", "is_patched"):
        assert callable(getattr(fastswin, name)), name
        assert getattr(fastswin, name) is getattr(impl, name)


# ---- fallbacks: where the op cannot be the same, the original runs ----------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_stale_static_mask_falls_back_to_original(v2, monkeypatch):
    """A static-mask block fed another size: timm applies its (wrong-size) mask as is; the patched
    block must do exactly what timm does, not build the right mask."""
    cls = SwinTransformerV2Block if v2 else SwinTransformerBlock
    blk = cls(16, (8, 16), num_heads=2, window_size=4, shift_size=2, dtype=f64).eval()
    _randomize(blk)
    x = torch.randn(2, 16, 8, 16, dtype=f64)  # same number of windows, other layout
    calls = _uses_op(monkeypatch)
    with pytest.warns(RuntimeWarning, match="runs its original .* static attn_mask was built for"):
        _compare(blk, x)
    assert calls == []
    # a size whose window count does not divide: timm errors, and so does the patched block
    y = torch.randn(1, 12, 12, 16, dtype=f64)
    with pytest.raises(RuntimeError) as e1:
        blk(y)
    patch(blk)
    with pytest.raises(RuntimeError) as e2, pytest.warns(RuntimeWarning, match="runs its original"):
        blk(y)
    assert str(e1.value) == str(e2.value)


# ---- errors -------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(TypeError, match="no Swin block"):
        patch(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="no Swin block"):
        unpatch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        patch("swin")
    with pytest.raises(TypeError, match="nn.Module"):
        is_patched(3)
    m = _timm_model(False)
    with pytest.raises(ValueError, match="backend"):
        patch(m, backend="fast")
    assert not is_patched(m)

    class MyBlock(SwinTransformerBlock):
        def _attn(self, x):
            return super()._attn(x)

    blk = MyBlock(16, (8, 8), num_heads=2, window_size=4, dtype=f64)
    with pytest.raises(TypeError, match="overrides _attn"):
        patch(nn.Sequential(SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=4, dtype=f64), blk))

    other = SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=4, dtype=f64)
    other.attn = nn.Identity()
    with pytest.raises(TypeError, match="not timm's or fastswin's"):
        patch(other)

    foreign = SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=4, dtype=f64)
    foreign._attn = lambda x: x
    with pytest.raises(TypeError, match="something else"):
        patch(foreign)


# ---- torchvision --------------------------------------------------------------------------------


def _tv_model(v2, window=(4, 4), dropout=0.0, attention_dropout=0.0):
    from torchvision.models import swin_transformer as tv

    kw = dict(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=list(window),
              stochastic_depth_prob=0.0, num_classes=10, dropout=dropout, attention_dropout=attention_dropout)
    if v2:
        kw.update(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2)
    m = tv.SwinTransformer(**kw).to(f64).eval()
    _randomize(m)
    return m


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("window,hw", [((4, 4), (32, 32)), ((4, 4), (36, 44)), ((2, 4), (28, 20)),
                                       ((4, 4), (12, 20))])
def test_torchvision_patched_equals_unpatched(v2, window, hw, monkeypatch):
    m = _tv_model(v2, window)
    calls = _uses_op(monkeypatch)
    assert _compare(m, torch.randn(2, 3, *hw, dtype=f64)) == 4
    assert len(calls) == 4


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_training_dropout(v2):
    m = _tv_model(v2, dropout=0.1, attention_dropout=0.2).train()
    _compare(m, torch.randn(2, 3, 36, 28, dtype=f64), seed=5)


def test_torchvision_state_dict_and_unpatch():
    m = _tv_model(True)
    sd = m.state_dict()
    x = torch.randn(1, 3, 32, 32, dtype=f64)
    before = m(x)
    assert patch(m) == 4 and list(m.state_dict()) == list(sd)
    assert patch(m) == 4
    assert unpatch(m) == 4
    assert torch.equal(m(x), before)


# ---- Triton under the interpreter ---------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("v2", [False, True])
def test_triton_backend_equals_reference(v2):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # 16x16 image -> 4x4 then 2x2 maps, window 3: padded, shifted, window > map in the last stage
    m = _timm_model(v2, img=12, window=3, strict_img_size=False).to(dev)
    if not v2:
        _set_fused(m, False)
    x = torch.randn(1, 3, 16, 16, dtype=f64, device=dev)
    if dev == "cuda":  # no fp64 Triton on a GPU: compare in float32 with a float32 tolerance
        m, x = m.float(), x.float()
    patch(m, backend="reference")
    want = _run(m, x)
    patch(m, backend="triton")
    got = _run(m, x)
    from fastswin import backends

    op = "shifted_window_attention_v2" if v2 else "shifted_window_attention"
    assert backends._LAST[op] == "triton"
    tol = TOL if dev == "cpu" else 1e-4
    _assert_same_run(want, got, tol=tol)
