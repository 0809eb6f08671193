"""Bad inputs to the Swin functional entries raise errors that name the argument."""
import numpy as np
import pytest
import torch

from fastswin._checks import pair as fastswin_pair

from fastswin.functional.window_attention import (shifted_window_attention, shifted_window_attention_v2,
                                                  window_attention, window_attention_v2)

f64 = torch.float64
WIN = (3, 4)
N = 12
TABLE = 5 * 7


@pytest.fixture
def win(seed):
    """Valid windowed inputs: B*nW = 4, 2 heads, N = 12, d = 3; mask for nW = 2."""
    return dict(q=torch.randn(4, 2, N, 3, dtype=f64), k=torch.randn(4, 2, N, 3, dtype=f64),
                v=torch.randn(4, 2, N, 3, dtype=f64), rel_pos_table=torch.randn(TABLE, 2, dtype=f64),
                window_size=WIN, mask=torch.randn(2, N, N, dtype=f64))


@pytest.fixture
def blk(seed):
    """Valid block-level inputs: (B, H, W) = (2, 5, 7), 2 heads, d = 3."""
    return dict(qkv=torch.randn(2, 5, 7, 3, 2, 3, dtype=f64), rel_pos_table=torch.randn(TABLE, 2, dtype=f64),
                window_size=WIN, shift_size=(1, 2), pad_qkv=torch.randn(3, 2, 3, dtype=f64))


LS = dict(logit_scale=torch.full((2, 1, 1), 2.0, dtype=f64))


def v1(kw):
    return window_attention(**kw)


def v2(kw):
    return window_attention_v2(**kw, **LS)


def b1(kw):
    return shifted_window_attention(**kw)


def b2(kw):
    return shifted_window_attention_v2(**kw, **LS)


def test_valid_inputs_run(win, blk):
    for fn, kw in ((v1, win), (v2, win), (b1, blk), (b2, blk)):
        fn(kw)


@pytest.mark.parametrize("fn", [v1, v2])
@pytest.mark.parametrize("name,bad,exc,match", [
    ("q", lambda t: t[0], ValueError, "q: expected a 4-D"),
    ("k", lambda t: t.unsqueeze(0), ValueError, "k: expected a 4-D"),
    ("q", lambda t: t.to(torch.int64), TypeError, "q: expected dtype"),
    ("v", lambda t: t.float(), TypeError, "v: expected dtype float64"),
    ("k", lambda t: t.to("meta"), ValueError, "k: expected device"),
    ("k", lambda t: t[..., :2], ValueError, "k: .*head_dim mismatch"),
    ("v", lambda t: t[:2], ValueError, "v: expected the shape of q"),
    ("q", lambda t: t[:, :, :9], ValueError, "q: expected N = window_size"),
    ("rel_pos_table", lambda t: t[:-1], ValueError, r"rel_pos_table: expected shape \(35, 2\)"),
    ("rel_pos_table", lambda t: t[:, :1], ValueError, "rel_pos_table: expected shape"),
    ("rel_pos_table", lambda t: t.flatten(), ValueError, "rel_pos_table: expected a 2-D"),
    ("rel_pos_table", lambda t: t.float(), TypeError, "rel_pos_table: expected dtype float64"),
    ("mask", lambda t: t[:, :, :5], ValueError, r"mask: expected shape \(nW, 12, 12\)"),
    ("mask", lambda t: t[0], ValueError, "mask: expected a 3-D"),
    ("mask", lambda t: torch.cat([t, t[:1]]), ValueError, "mask: .*not divisible by mask's nW = 3"),
    ("mask", lambda t: t.to(torch.int32), TypeError, "mask: expected dtype in"),
    ("mask", lambda t: t.to("meta"), ValueError, "mask: expected device"),
    ("window_size", lambda t: (3, 4, 1), TypeError, "window_size"),
    ("window_size", lambda t: (0, 4), ValueError, "window_size"),
])
def test_windowed_bad_inputs(win, fn, name, bad, exc, match):
    win[name] = bad(win[name])
    with pytest.raises(exc, match=match):
        fn(win)


@pytest.mark.parametrize("fn", [b1, b2])
@pytest.mark.parametrize("name,bad,exc,match", [
    ("qkv", lambda t: t[0], ValueError, "qkv: expected a 6-D"),
    ("qkv", lambda t: t[:, :, :, :2], ValueError, "qkv: expected size 3 in dimension 3"),
    ("qkv", lambda t: t.to(torch.int32), TypeError, "qkv: expected dtype"),
    ("qkv", lambda t: t[:, :0], ValueError, "qkv: expected H >= 1"),
    ("rel_pos_table", lambda t: t[:-2], ValueError, r"rel_pos_table: expected shape \(35, 2\)"),
    ("rel_pos_table", lambda t: t.to("meta"), ValueError, "rel_pos_table: expected device"),
    ("pad_qkv", lambda t: t[:, :, :2], ValueError, "pad_qkv: expected shape"),
    ("pad_qkv", lambda t: t.float(), TypeError, "pad_qkv: expected dtype float64"),
    ("shift_size", lambda s: (3, 2), ValueError, "shift_size: expected 0 <= shift < window"),
    ("shift_size", lambda s: (1, 4), ValueError, "shift_size: expected 0 <= shift < window"),
    ("shift_size", lambda s: -1, ValueError, "shift_size"),
    ("shift_size", lambda s: 1.5, TypeError, "shift_size"),
])
def test_block_bad_inputs(blk, fn, name, bad, exc, match):
    blk[name] = bad(blk[name])
    with pytest.raises(exc, match=match):
        fn(blk)


@pytest.mark.parametrize("fn,kw", [(v2, "win"), (b2, "blk")])
@pytest.mark.parametrize("bad,exc,match", [
    (torch.full((3, 1, 1), 2.0, dtype=f64), ValueError, r"logit_scale: expected shape \(2, 1, 1\)"),
    (torch.full((2, 1), 2.0, dtype=f64), ValueError, "logit_scale: expected shape"),
    (torch.full((2, 1, 1), 2.0), TypeError, "logit_scale: expected dtype float64"),
    (torch.full((2, 1, 1), 2, dtype=torch.int64), TypeError, "logit_scale: expected dtype in"),
])
def test_bad_logit_scale(request, fn, kw, bad, exc, match):
    kw = request.getfixturevalue(kw)
    with pytest.raises(exc, match=match):
        (window_attention_v2 if fn is v2 else shifted_window_attention_v2)(**kw, logit_scale=bad)


def test_bad_scalars(win, blk):
    with pytest.raises(TypeError, match="scale"):
        window_attention(**win, scale="0.5")
    with pytest.raises(ValueError, match="dropout_p"):
        window_attention(**win, dropout_p=1.5)
    with pytest.raises(ValueError, match="dropout_p"):
        shifted_window_attention(**blk, dropout_p=-0.1)
    with pytest.raises(ValueError, match="backend"):
        window_attention(**win, backend="fastest")


@pytest.mark.parametrize("fn,kw,name", [
    (v1, "win", "q"), (v1, "win", "v"), (v1, "win", "rel_pos_table"), (v2, "win", "k"),
    (b1, "blk", "qkv"), (b1, "blk", "pad_qkv"), (b2, "blk", "rel_pos_table"),
])
def test_nan_inputs_raise_when_checked(request, monkeypatch, fn, kw, name):
    kw = request.getfixturevalue(kw)
    kw[name] = kw[name].clone()
    kw[name].view(-1)[3] = float("nan")
    monkeypatch.setenv("FASTSWIN_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=f"{name}: contains NaN"):
        fn(kw)
    monkeypatch.setenv("FASTSWIN_CHECK_FINITE", "0")
    fn(kw)  # unchecked: runs (and propagates the NaN)


def test_mask_nan_raises_but_inf_is_allowed(win, monkeypatch):
    monkeypatch.setenv("FASTSWIN_CHECK_FINITE", "1")
    win["mask"][0, 0, 1] = float("-inf")
    window_attention(**win)
    win["mask"][0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="mask: contains NaN"):
        window_attention(**win)


def test_low_precision_activations_accept_float32_tables(win, blk):
    """autocast's mix: float16/bfloat16 activations with float32 parameters; not float64."""
    for dtype in (torch.float16, torch.bfloat16):
        out = window_attention(**dict(win, q=win["q"].to(dtype), k=win["k"].to(dtype), v=win["v"].to(dtype),
                                      rel_pos_table=win["rel_pos_table"].float(), mask=win["mask"].float()))
        assert out.dtype == dtype
        out = shifted_window_attention_v2(**dict(blk, qkv=blk["qkv"].to(dtype), pad_qkv=blk["pad_qkv"].float(),
                                                 rel_pos_table=blk["rel_pos_table"].float()),
                                          logit_scale=LS["logit_scale"].float())
        assert out.dtype == dtype
    with pytest.raises(TypeError, match="rel_pos_table: expected dtype float16 or float32"):
        window_attention(**dict(win, q=win["q"].half(), k=win["k"].half(), v=win["v"].half()))


@pytest.mark.parametrize("fn", [v1, v2])
def test_mask_dtype_promotes_like_timm(win, fn):
    """timm adds the mask to the logits: a bool mask and a float mask whose dtype promotes to q's
    are accepted and cast to q's dtype (the same numbers as the add); the rest raise naming mask."""
    want = fn(dict(win, mask=win["mask"].float().double()))
    out = fn(dict(win, mask=win["mask"].float()))  # float32 mask, float64 q
    assert out.dtype == f64 and torch.equal(out, want)
    bool_mask = win["mask"] > 0
    assert torch.equal(fn(dict(win, mask=bool_mask)), fn(dict(win, mask=bool_mask.double())))
    w32 = {k: (t.float() if isinstance(t, torch.Tensor) else t) for k, t in win.items()}
    half = w32["mask"].half()
    out = (window_attention if fn is v1 else window_attention_v2)(
        **dict(w32, mask=half), **({} if fn is v1 else dict(logit_scale=LS["logit_scale"].float())))
    want = (window_attention if fn is v1 else window_attention_v2)(
        **dict(w32, mask=half.float()), **({} if fn is v1 else dict(logit_scale=LS["logit_scale"].float())))
    assert out.dtype == torch.float32 and torch.equal(out, want)
    with pytest.raises(TypeError, match="mask: expected dtype float32"):  # float64 mask, float32 q
        (window_attention if fn is v1 else window_attention_v2)(
            **dict(w32, mask=win["mask"]), **({} if fn is v1 else dict(logit_scale=LS["logit_scale"].float())))
    wbf = dict(win, q=win["q"].bfloat16(), k=win["k"].bfloat16(), v=win["v"].bfloat16(),
               rel_pos_table=win["rel_pos_table"].float())
    extra = {} if fn is v1 else dict(logit_scale=LS["logit_scale"].float())
    with pytest.raises(TypeError, match="mask: expected dtype bfloat16 or float32"):  # float16 mask, bfloat16 q
        (window_attention if fn is v1 else window_attention_v2)(**dict(wbf, mask=win["mask"].half()), **extra)
    out = (window_attention if fn is v1 else window_attention_v2)(**dict(wbf, mask=bool_mask), **extra)
    assert out.dtype == torch.bfloat16


def test_dropout_p_one_is_allowed(win, blk):
    """timm accepts attn_drop=1.0 (every probability dropped: the attention output is 0)."""
    out = window_attention(**win, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out = shifted_window_attention_v2(**blk, **LS, dropout_p=1)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("size", [np.int64(3), np.array([3, 4]), np.array(3), (np.int32(3), 4), torch.tensor([3, 4])])
def test_window_size_accepts_numpy_integers(win, size):
    """timm's to_2tuple takes any integer scalar or iterable; sizes become Python ints."""
    kw = dict(win, window_size=size)
    if fastswin_pair("window_size", size) == (3, 3):
        kw.update(q=win["q"][:, :, :9], k=win["k"][:, :, :9], v=win["v"][:, :, :9], mask=win["mask"][:, :9, :9],
                  rel_pos_table=win["rel_pos_table"][:25])
    out = window_attention(**kw)
    assert torch.equal(out, window_attention(**dict(kw, window_size=fastswin_pair("window_size", size))))


@pytest.mark.parametrize("bad,match", [
    (True, "window_size: .*bool"), ((3, True), "window_size: .*bool"), (np.bool_(True), "window_size: .*bool"),
    (np.array([True, True]), "window_size: .*bool"), (3.0, "window_size"), ((3, 4.0), "window_size"),
    ("34", "window_size"), ([3], "window_size"), (None, "window_size"),
])
def test_window_size_rejects_non_integers(win, bad, match):
    with pytest.raises(TypeError, match=match):
        window_attention(**dict(win, window_size=bad))
