"""fastswin.WindowAttention / WindowAttentionV2 as drop-ins for timm's modules."""
import numpy as np
import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmV1
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from timm.models.swin_transformer_v2 import WindowAttention as TimmV2

import fastswin
from fastswin import BackendUnavailableError
from fastswin.reference import swin as ref

f64 = torch.float64
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

V1_CASES = [  # kwargs of both constructors
    dict(dim=16, num_heads=2, window_size=4),
    dict(dim=12, num_heads=3, window_size=(3, 5), qkv_bias=False),
    dict(dim=16, num_heads=2, head_dim=6, window_size=(4, 3)),
]
V2_CASES = [
    dict(dim=16, window_size=(4, 4), num_heads=2),
    dict(dim=12, window_size=(3, 5), num_heads=3, pretrained_window_size=(6, 6)),
    dict(dim=16, window_size=(4, 3), num_heads=2, qkv_bias=False),
    dict(dim=16, window_size=(4, 4), num_heads=4, qkv_bias_separate=True, pretrained_window_size=(2, 3)),
]


def _timm(v2, kw, dtype=f64):
    m = (TimmV2 if v2 else TimmV1)(**kw, dtype=dtype)
    if not v2:
        m.fused_attn = False  # timm's default; its SDPA path rounds differently
    return m


def _ours(v2, kw, dtype=f64, **extra):
    m = (fastswin.WindowAttentionV2 if v2 else fastswin.WindowAttention)(**kw, dtype=dtype, **extra)
    if not v2:
        m.fused_attn = False  # as _timm, whatever TIMM_FUSED_ATTN says
    return m


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _pair(v2, kw, dtype=f64):
    t = _timm(v2, kw, dtype)
    _randomize(t)
    o = _ours(v2, kw, dtype)
    o.load_state_dict(t.state_dict(), strict=True)
    return t, o


def _shift_mask(window, nw_h=2, nw_w=2, dtype=f64):
    """timm's own SW-MSA mask for a map of 2x2 windows."""
    window = (window, window) if isinstance(window, int) else window
    res = (window[0] * nw_h, window[1] * nw_w)
    blk = SwinTransformerBlock(4, res, num_heads=1, window_size=window,
                               shift_size=(window[0] // 2, window[1] // 2), dtype=dtype)
    return blk.attn_mask


CASES = [(False, kw) for kw in V1_CASES] + [(True, kw) for kw in V2_CASES]
IDS = [f"v{2 if v2 else 1}-{i}" for i, (v2, _) in enumerate(CASES)]


# ---- checkpoint compatibility --------------------------------------------------------------------------


@pytest.mark.parametrize("v2,kw", CASES, ids=IDS)
def test_state_dict_both_ways(seed, v2, kw):
    t, o = _pair(v2, kw)
    assert list(o.state_dict().keys()) == list(t.state_dict().keys())
    assert [n for n, _ in o.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in o.named_buffers()] == [n for n, _ in t.named_buffers()]
    assert [n for n, _ in o.named_modules()] == [n for n, _ in t.named_modules()]
    for (n, a), (_, b) in zip(o.named_buffers(), t.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    t2 = _timm(v2, kw)
    t2.load_state_dict(o.state_dict(), strict=True)
    for a, b in zip(t2.state_dict().values(), t.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("v2,kw", CASES, ids=IDS)
def test_seeded_init_matches_timm(v2, kw):
    # same constructor order and init draws: a seeded build gives timm's exact weights
    torch.manual_seed(1234)
    t = _timm(v2, kw, torch.float32)
    torch.manual_seed(1234)
    o = _ours(v2, kw, torch.float32)
    for (n, a), (_, b) in zip(o.state_dict().items(), t.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation
def test_set_window_size_matches_timm(seed):
    t, o = _pair(False, V1_CASES[0])
    t.set_window_size((6, 5))
    o.set_window_size((6, 5))
    assert o.window_size == t.window_size == (6, 5)
    for (n, a), (_, b) in zip(o.state_dict().items(), t.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(o.relative_position_index, t.relative_position_index)
    t2, o2 = _pair(True, V2_CASES[1])
    t2.set_window_size((5, 5))
    o2.set_window_size((5, 5))
    assert torch.equal(o2.relative_coords_table, t2.relative_coords_table)
    assert torch.equal(o2.relative_position_index, t2.relative_position_index)


# ---- forward / backward on windows ------------------------------------------------------------------------


@pytest.mark.parametrize("v2,kw", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_backward_matches_timm(seed, v2, kw, dtype, masked):
    t, o = _pair(v2, kw, dtype)
    window = t.window_size if isinstance(t.window_size, tuple) else (t.window_size,) * 2
    n = window[0] * window[1]
    mask = _shift_mask(window, dtype=dtype) if masked else None  # 4 windows per image
    x = torch.randn(2 * 4, n, kw["dim"], dtype=dtype)
    g = torch.randn(2 * 4, n, kw["dim"], dtype=dtype)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yo = t(xt, mask), o(xo, mask)
    # same ops in the same order as timm's non-fused path: bit-identical forward
    assert torch.equal(yo, yt)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(xo.grad, xt.grad, rtol=tol, atol=tol)
    for (name, po), (_, pt) in zip(o.named_parameters(), t.named_parameters()):
        torch.testing.assert_close(po.grad, pt.grad, rtol=tol, atol=tol, msg=name)


# ---- the block-level entry against the block's _attn ---------------------------------------------------------

BLOCKS = [  # (input_resolution, window, shift, always_partition, dynamic_mask)
    ((8, 8), 4, 2, False, False),
    ((7, 9), 4, 2, False, False),
    ((5, 6), (3, 4), (1, 2), False, False),
    ((3, 5), 4, 2, False, False),
    ((3, 3), 4, 2, True, False),
    ((7, 9), 4, 2, False, True),
    ((6, 6), 3, 0, False, False),
]


@pytest.mark.parametrize("res,window,shift,always_partition,dynamic_mask", BLOCKS)
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_block_matches_timm_attn(seed, res, window, shift, always_partition, dynamic_mask, v2, dtype):
    common = dict(window_size=window, shift_size=shift, always_partition=always_partition, dynamic_mask=dynamic_mask,
                  dtype=dtype)
    if v2:
        blk = SwinTransformerV2Block(16, res, num_heads=2, pretrained_window_size=(5, 5), **common)
        o = fastswin.WindowAttentionV2(16, blk.window_size, 2, pretrained_window_size=(5, 5), dtype=dtype)
    else:
        blk = SwinTransformerBlock(16, res, num_heads=2, **common)
        blk.attn.fused_attn = False
        o = fastswin.WindowAttention(16, 2, window_size=blk.window_size, dtype=dtype)
        o.fused_attn = False
    _randomize(blk.attn)
    o.load_state_dict(blk.attn.state_dict(), strict=True)
    x = torch.randn(2, *res, 16, dtype=dtype)
    g = torch.randn(2, *res, 16, dtype=dtype)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yo = blk._attn(xt), o.forward_block(xo, blk.shift_size)
    tol = TOL[dtype]
    torch.testing.assert_close(yo, yt, rtol=tol, atol=tol)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    torch.testing.assert_close(xo.grad, xt.grad, rtol=tol, atol=tol)
    for (name, po), (_, pt) in zip(o.named_parameters(), blk.attn.named_parameters()):
        torch.testing.assert_close(po.grad, pt.grad, rtol=tol, atol=tol, msg=name)


# ---- attention dropout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_attention_dropout_matches_timm_in_training(seed, v2):
    kw = dict(V2_CASES[0] if v2 else V1_CASES[0], attn_drop=0.3)
    t, o = _pair(v2, kw)
    t.train(), o.train()
    x = torch.randn(8, 16, 16, dtype=f64)
    mask = _shift_mask(4)
    torch.manual_seed(7)
    yt = t(x, mask)
    torch.manual_seed(7)
    yo = o(x, mask)
    assert torch.equal(yo, yt)  # same dropout draws as timm's nn.Dropout on the probabilities
    torch.manual_seed(8)
    assert not torch.equal(o(x, mask), yo)  # dropout is really on
    o.eval(), t.eval()
    assert torch.equal(o(x, mask), t(x, mask))


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_attention_dropout_needs_the_reference(seed, monkeypatch, v2, backend):
    """Fused backends do not implement attention dropout: with attn_drop > 0 in training an explicitly
    requested fused backend raises (whether or not it is registered and could run the call otherwise);
    auto runs the reference."""
    kw = dict(V2_CASES[0] if v2 else V1_CASES[0], attn_drop=0.3)
    o = _ours(v2, kw, backend=backend).train()
    x = torch.randn(4, 16, 16, dtype=f64)
    for call in (lambda: o(x), lambda: o.forward_block(torch.randn(1, 5, 6, 16, dtype=f64), 2)):
        with pytest.raises(BackendUnavailableError, match="attention dropout"):
            call()
    o.backend = "auto"
    o(x)
    monkeypatch.setenv("FASTSWIN_BACKEND", backend)
    with pytest.raises(BackendUnavailableError, match="attention dropout"):
        o(x)


def _unregister_fused(monkeypatch):
    """These tests are about backends that cannot run a call; other work registers Triton/CUDA
    kernels for these ops, so take them out of the registry for the test."""
    from fastswin import backends

    import fastswin.functional.window_attention  # noqa: F401  (registers the ops)

    for op in ("window_attention", "window_attention_v2", "shifted_window_attention", "shifted_window_attention_v2"):
        for b in ("triton", "cuda"):
            monkeypatch.delitem(backends._REGISTRY[op], b, raising=False)


# ---- backend choice ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_explicit_triton_backend_raises(seed, monkeypatch, v2):
    _unregister_fused(monkeypatch)
    o = _ours(v2, V2_CASES[0] if v2 else V1_CASES[0], backend="triton")
    with pytest.raises(BackendUnavailableError, match="not implemented"):
        o(torch.randn(4, 16, 16, dtype=f64))
    with pytest.raises(BackendUnavailableError):
        o.forward_block(torch.randn(1, 5, 5, 16, dtype=f64), 2)


def test_bad_backend_name_raises():
    with pytest.raises(ValueError, match="backend"):
        fastswin.WindowAttention(16, 2, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        fastswin.WindowAttentionV2(16, 4, 2, backend="fast")


@pytest.mark.parametrize("v2", [False, True])
def test_env_backend_override(seed, monkeypatch, v2):
    _unregister_fused(monkeypatch)
    t, o = _pair(v2, V2_CASES[0] if v2 else V1_CASES[0])
    o.backend = "triton"  # the environment replaces the argument
    x = torch.randn(4, 16, 16, dtype=f64)
    monkeypatch.setenv("FASTSWIN_BACKEND", "reference")
    assert torch.equal(o(x), t(x))
    monkeypatch.setenv("FASTSWIN_BACKEND", "triton")
    o.backend = "reference"
    with pytest.raises(BackendUnavailableError):
        o(x)


def test_functional_entries_are_registered():
    import importlib

    from fastswin import backends

    importlib.import_module("fastswin.functional.window_attention")
    for op in ("window_attention", "window_attention_v2", "shifted_window_attention", "shifted_window_attention_v2"):
        assert backends._REGISTRY[op]["reference"].fn is getattr(ref, op)
    x = torch.randn(2, 1, 4, 2, dtype=f64)
    why = backends.explain("window_attention", x, x, x, torch.randn(9, 1, dtype=f64), (2, 2), None, None)
    assert why["reference"] == []


def test_public_functional_names_are_the_functions():
    # a submodule named like its function shadows a lazily exported name once imported
    import importlib

    import fastswin.functional as FF

    importlib.import_module("fastswin.functional.window_attention")
    for name in ("window_attention", "window_attention_v2", "shifted_window_attention", "shifted_window_attention_v2"):
        assert callable(getattr(FF, name)), name


def test_module_bad_input_names_x():
    o = fastswin.WindowAttention(16, 2, window_size=4, dtype=f64)
    with pytest.raises(ValueError, match="x"):
        o(torch.randn(4, 15, 16, dtype=f64))
    with pytest.raises(ValueError, match="x"):
        o.forward_block(torch.randn(4, 15, 16, dtype=f64))


# ---- mixed precision ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2,kw", [CASES[0], CASES[3]], ids=["v1", "v2"])
def test_autocast_matches_timm(seed, v2, kw):
    """Under autocast the activations are bfloat16 while the table, logit_scale and mask stay
    float32: accepted, and the same ops as timm's give the same numbers."""
    t, o = _pair(v2, kw, torch.float32)
    window = o.window_size
    x = torch.randn(8, window[0] * window[1], kw["dim"])
    mask = _shift_mask(window, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yt, yo = t(x, mask), o(x, mask)
    assert yo.dtype == yt.dtype
    torch.testing.assert_close(yo, yt, rtol=0, atol=0)


# ---- mask dtypes, as timm's ``attn + mask`` promotes ---------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float16),
                                              (torch.float64, torch.bool), (torch.float32, torch.bool)])
def test_mask_dtype_promotion_matches_timm(seed, v2, dtype, mask_dtype):
    t, o = _pair(v2, V2_CASES[0] if v2 else V1_CASES[0], dtype)
    x = torch.randn(8, 16, 16, dtype=dtype)
    mask = (torch.rand(4, 16, 16) > 0.5) if mask_dtype == torch.bool else (torch.randn(4, 16, 16) * 3).to(mask_dtype)
    yt, yo = t(x, mask), o(x, mask)
    assert yo.dtype == yt.dtype == dtype
    assert torch.equal(yo, yt)


@pytest.mark.parametrize("v2", [False, True])
def test_mask_dtype_timm_rejects_is_an_error_naming_mask(seed, v2):
    t, o = _pair(v2, V2_CASES[0] if v2 else V1_CASES[0], torch.float32)
    x, mask = torch.randn(8, 16, 16), torch.randn(4, 16, 16, dtype=f64)
    with pytest.raises(RuntimeError):
        t(x, mask)  # float64 logits @ float32 v
    with pytest.raises(TypeError, match="mask: expected dtype float32"):
        o(x, mask)


# ---- timm's fused_attn flag (V1) ------------------------------------------------------------------------------


def test_fused_attn_flag_set_as_timm(monkeypatch):
    import timm.layers.config as timm_config

    kw = V1_CASES[0]
    assert TimmV1(**kw).fused_attn is fastswin.WindowAttention(**kw).fused_attn is False  # timm's default
    assert "fused_attn" in fastswin.WindowAttention.__annotations__
    monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 2)  # TIMM_FUSED_ATTN=2 at timm's import
    assert TimmV1(**kw).fused_attn is fastswin.WindowAttention(**kw).fused_attn is True
    monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 1)  # "tested" only: the Swin path is experimental
    assert TimmV1(**kw).fused_attn is fastswin.WindowAttention(**kw).fused_attn is False
    # timm's V2 module has no fused path and no flag; neither has ours
    assert not hasattr(TimmV2(**V2_CASES[0]), "fused_attn")
    assert not hasattr(fastswin.WindowAttentionV2(**V2_CASES[0]), "fused_attn")


@pytest.mark.parametrize("env,want", [(None, False), ("0", False), ("1", False), ("2", True)])
def test_fused_attn_flag_without_timm(monkeypatch, env, want):
    """timm is not a dependency: without it, TIMM_FUSED_ATTN is read as timm reads it."""
    import sys

    from fastswin.modules import window_attention as mod

    monkeypatch.setitem(sys.modules, "timm.layers", None)  # import fails
    if env is None:
        monkeypatch.delenv("TIMM_FUSED_ATTN", raising=False)
    else:
        monkeypatch.setenv("TIMM_FUSED_ATTN", env)
    assert mod._use_fused_attn(experimental=True) is want
    assert fastswin.WindowAttention(**V1_CASES[0]).fused_attn is want
    assert mod._use_fused_attn(experimental=False) is (env != "0")


@pytest.mark.parametrize("kw", V1_CASES, ids=["v1-0", "v1-1", "v1-2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_attn_matches_timm_fused_path(seed, kw, dtype, masked):
    """With fused_attn on both (timm: SDPA with bias + mask as attn_mask), the same numbers, bit for bit;
    in training too (SDPA's own dropout draws)."""
    t, o = _pair(False, kw, dtype)
    t.fused_attn = o.fused_attn = True
    window = t.window_size
    n = window[0] * window[1]
    mask = _shift_mask(window, dtype=dtype) if masked else None
    x = torch.randn(2 * 4, n, kw["dim"], dtype=dtype)
    assert torch.equal(o(x, mask), t(x, mask))
    t.attn_drop.p = o.attn_drop.p = 0.3
    t.train(), o.train()
    torch.manual_seed(11)
    yt = t(x, mask)
    torch.manual_seed(11)
    assert torch.equal(o(x, mask), yt)


@pytest.mark.parametrize("res,window,shift", [((7, 9), 4, 2), ((8, 8), 4, 2), ((6, 6), 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_attn_forward_block_matches_timm(seed, res, window, shift, dtype):
    blk = SwinTransformerBlock(16, res, num_heads=2, window_size=window, shift_size=shift, dtype=dtype)
    blk.attn.fused_attn = True
    o = fastswin.WindowAttention(16, 2, window_size=blk.window_size, dtype=dtype)
    o.fused_attn = True
    _randomize(blk.attn)
    o.load_state_dict(blk.attn.state_dict(), strict=True)
    x = torch.randn(2, *res, 16, dtype=dtype)
    yo, yt = o.forward_block(x, blk.shift_size), blk._attn(x)
    if res[0] % window or res[1] % window:  # padded: the padded tokens' qkv round differently (bias vs linear(0))
        torch.testing.assert_close(yo, yt, rtol=TOL[dtype], atol=TOL[dtype])
    else:
        assert torch.equal(yo, yt)


# ---- sizes as timm's to_2tuple takes them ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [np.int64(4), np.array([4, 4]), (np.int32(4), 4), [4, 4]])
def test_numpy_window_sizes_match_timm(seed, size):
    t1, o1 = _pair(False, dict(V1_CASES[0], window_size=size))
    assert o1.window_size == t1.window_size == (4, 4) and all(type(s) is int for s in o1.window_size)
    t2, o2 = _pair(True, dict(V2_CASES[1], window_size=(3, 5), pretrained_window_size=np.array([6, 6])))
    assert o2.pretrained_window_size == t2.pretrained_window_size == (6, 6)
    assert torch.equal(o2.relative_coords_table, t2.relative_coords_table)
    x = torch.randn(8, 16, 16, dtype=f64)
    assert torch.equal(o1(x), t1(x))


def test_bool_window_size_raises():
    with pytest.raises(TypeError, match="window_size: .*bool"):
        fastswin.WindowAttention(16, 2, window_size=True)
    with pytest.raises(TypeError, match="pretrained_window_size: .*bool"):
        fastswin.WindowAttentionV2(16, (4, 4), 2, pretrained_window_size=(True, 3))


# ---- attn_drop = 1 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_attn_drop_one_matches_timm(seed, v2):
    t, o = _pair(v2, dict(V2_CASES[0] if v2 else V1_CASES[0], attn_drop=1.0))
    t.train(), o.train()
    x = torch.randn(8, 16, 16, dtype=f64)
    assert torch.equal(o(x), t(x))  # the attention output is 0: only proj's bias is left
    o.forward_block(torch.randn(1, 5, 6, 16, dtype=f64), 2)


# ---- bookkeeping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_dropout_path_records_the_reference_as_last_selected(seed, monkeypatch, v2):
    from fastswin import backends

    o = _ours(v2, dict(V2_CASES[0] if v2 else V1_CASES[0], attn_drop=0.3)).train()
    op, block_op = ("window_attention_v2", "shifted_window_attention_v2") if v2 else \
        ("window_attention", "shifted_window_attention")
    monkeypatch.setitem(backends._LAST, op, "cuda")  # stale, from an earlier eval-mode call
    monkeypatch.setitem(backends._LAST, block_op, "triton")
    o(torch.randn(4, 16, 16, dtype=f64))
    o.forward_block(torch.randn(1, 5, 6, 16, dtype=f64), 2)
    assert backends.last_selected(op) == backends.last_selected(block_op) == "reference"
    with pytest.raises(ValueError, match="backend"):
        backends.note_selected(op, "fastest")


def test_reference_reasons_are_the_shared_always_able():
    from fastswin import backends

    import fastswin.functional.bilinear_sample  # noqa: F401  (registers the op)
    import fastswin.functional.window_attention  # noqa: F401

    for op in ("window_attention", "window_attention_v2", "shifted_window_attention", "shifted_window_attention_v2",
               "bilinear_sample"):
        assert backends._REGISTRY[op]["reference"].reasons is backends.always_able
    assert backends.always_able(1, 2, x=3) == []
