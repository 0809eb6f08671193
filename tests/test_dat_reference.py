"""The DAT / DAT++ reference pieces against hand-written float64 loops, and float64 gradcheck.

The loops follow the definitions (LeapLabTHU/DAT ``DAttentionBaseline``, commits 42b489e and
2f31405) tap by tap, independent of ``grid_sample``; see ``fastswin/reference/dat.py``.
"""
import math

import pytest
import torch

from fastswin.backends import BackendUnavailableError
from fastswin.functional.deformable_attention import deformable_attention as fn_deformable_attention
from fastswin.reference import dat as ref

F64 = torch.float64


# ---- the oracle: python loops over queries, samples and bilinear taps ----------------------------

def _grid_1d(n, variant, kind):
    """Coordinates in [-1, 1] of n points: kind "ref" (reference points) or "query"."""
    if kind == "ref" or variant == "dat":
        div = n if variant == "dat" else n - 1
        return [(i + 0.5) / div * 2 - 1 for i in range(n)]
    return [i / (n - 1) * 2 - 1 for i in range(n)]


def _bilinear_tap(table, y, x):
    """table: nested list (Th, Tw); (y, x) in [-1, 1] with align_corners=True; zero outside."""
    th, tw = len(table), len(table[0])
    iy, ix = (y + 1) / 2 * (th - 1), (x + 1) / 2 * (tw - 1)
    y0, x0 = math.floor(iy), math.floor(ix)
    wy, wx = iy - y0, ix - x0
    s = 0.0
    for a, fy in ((0, 1 - wy), (1, wy)):
        for b, fx in ((0, 1 - wx), (1, wx)):
            yy, xx = y0 + a, x0 + b
            if 0 <= yy < th and 0 <= xx < tw:
                s += table[yy][xx] * fy * fx
    return s


def loop_core(q, k, v, pos, table, bias, *, H, W, n_heads, n_groups, variant, scale):
    bh, c, hw = q.shape
    ns = k.shape[2]
    hg = n_heads // n_groups
    qy, qx = _grid_1d(H, variant, "query"), _grid_1d(W, variant, "query")
    Q, K, V, P = q.tolist(), k.tolist(), v.tolist(), pos.reshape(pos.shape[0], ns, 2).tolist()
    T = None if table is None else table.tolist()
    Bb = None if bias is None else bias.tolist()
    out = torch.empty(bh, c, hw, dtype=F64)
    for b in range(bh):
        batch, head = divmod(b, n_heads)
        grp = batch * n_groups + head // hg
        for m in range(hw):
            ym, xm = qy[m // W], qx[m % W]
            logits = []
            for n in range(ns):
                s = sum(Q[b][ch][m] * K[b][ch][n] for ch in range(c)) * scale
                if T is not None:
                    py, px = P[grp][n]
                    s += _bilinear_tap(T[head], (ym - py) * 0.5, (xm - px) * 0.5)
                if Bb is not None:
                    s += Bb[b][m][n]
                logits.append(s)
            mx = max(logits)
            e = [math.exp(l - mx) for l in logits]
            z = sum(e)
            for ch in range(c):
                out[b, ch, m] = sum(e[n] / z * V[b][ch][n] for n in range(ns))
    return out


def _inputs(B, n_heads, n_groups, c, H, W, hk, wk, table_hw, *, spread=1.4, with_bias=False, dtype=F64):
    bh = B * n_heads
    q = torch.randn(bh, c, H * W, dtype=dtype)
    k = torch.randn(bh, c, hk * wk, dtype=dtype)
    v = torch.randn(bh, c, hk * wk, dtype=dtype)
    # Beyond [-1, 1]: samples off the map, and displacements off the table.
    pos = (torch.rand(B * n_groups, hk, wk, 2, dtype=dtype) * 2 - 1) * spread
    table = None if table_hw is None else torch.randn(n_heads, *table_hw, dtype=dtype)
    bias = torch.randn(bh, H * W, hk * wk, dtype=dtype) if with_bias else None
    return q, k, v, pos, table, bias


# (B, heads, groups, c, H, W, Hk, Wk): stride 1 and 2, groups 1 and > 1, Ns != HW, non-square
CASES = [
    (2, 2, 1, 3, 3, 4, 3, 4),    # stride 1, one group, non-square
    (1, 6, 3, 2, 4, 5, 2, 3),    # stride 2, three groups, Ns != HW
    (2, 4, 2, 2, 5, 3, 3, 2),    # stride 2 (ceil), two groups, tall map
]


@pytest.mark.parametrize("variant", ["dat", "dat++"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}g{}c{}_{}x{}_k{}x{}".format(*c))
def test_core_matches_loops(variant, case, seed):
    B, nh, g, c, H, W, hk, wk = case
    q, k, v, pos, table, _ = _inputs(B, nh, g, c, H, W, hk, wk, (2 * H - 1, 2 * W - 1))
    scale = c ** -0.5
    got = ref.deformable_attention(q, k, v, pos, table, query_size=(H, W), n_heads=nh, n_groups=g, variant=variant, scale=scale)
    want = loop_core(q, k, v, pos, table, None, H=H, W=W, n_heads=nh, n_groups=g, variant=variant, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_core_any_table_size_bias_and_no_table(variant, seed):
    B, nh, g, c, H, W, hk, wk = 1, 4, 2, 2, 3, 5, 2, 2
    q, k, v, pos, table, bias = _inputs(B, nh, g, c, H, W, hk, wk, (4, 3), with_bias=True)
    kw = dict(query_size=(H, W), n_heads=nh, n_groups=g, variant=variant, scale=0.7)
    got = ref.deformable_attention(q, k, v, pos, table, bias, **kw)
    want = loop_core(q, k, v, pos, table, bias, H=H, W=W, n_heads=nh, n_groups=g, variant=variant, scale=0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = ref.deformable_attention(q, k, v, pos, None, None, **kw)
    want = loop_core(q, k, v, pos, None, None, H=H, W=W, n_heads=nh, n_groups=g, variant=variant, scale=0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_core_default_scale(seed):
    q, k, v, pos, table, _ = _inputs(1, 2, 1, 5, 2, 3, 2, 2, (3, 5))
    kw = dict(query_size=(2, 3), n_heads=2, n_groups=1, variant="dat")
    a = ref.deformable_attention(q, k, v, pos, table, **kw)
    b = ref.deformable_attention(q, k, v, pos, table, scale=5 ** -0.5, **kw)
    assert torch.equal(a, b)


def test_functional_dispatches_to_reference(seed, monkeypatch):
    # Without the interpreter, triton refuses CPU tensors; cuda has no deformable kernel.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, pos, table, bias = _inputs(2, 4, 2, 3, 3, 3, 2, 3, (5, 5), with_bias=True)
    kw = dict(query_size=(3, 3), n_heads=4, n_groups=2, variant="dat++")
    want = ref.deformable_attention(q, k, v, pos, table, bias, **kw)
    got = fn_deformable_attention(q, k, v, pos, table, bias, backend="reference", **kw)
    assert torch.equal(got, want)
    got = fn_deformable_attention(q, k, v, pos, table, bias, backend="auto", **kw)
    assert torch.equal(got, want)
    for b in ("triton", "cuda"):
        with pytest.raises(BackendUnavailableError, match=b):
            fn_deformable_attention(q, k, v, pos, table, bias, backend=b, **kw)


def test_core_dropout_is_same_draw_as_inplace(seed):
    q, k, v, pos, table, _ = _inputs(1, 2, 1, 2, 3, 3, 2, 2, (5, 5))
    kw = dict(query_size=(3, 3), n_heads=2, n_groups=1, variant="dat")
    torch.manual_seed(5)
    got = ref.deformable_attention(q, k, v, pos, table, dropout_p=0.4, **kw)
    # By hand: the logits, softmax, then the original's in-place dropout with the same seed.
    attn = torch.einsum("bcm,bcn->bmn", q, k).mul(2 ** -0.5)
    qg = ref.query_grid(3, 3, variant="dat", dtype=F64).reshape(1, 9, 1, 2)
    disp = (qg - pos.reshape(1, 1, 4, 2)) * 0.5
    attn = attn + torch.nn.functional.grid_sample(table[:, None], disp.expand(2, 9, 4, 2).flip(-1), align_corners=True)[:, 0]
    attn = attn.softmax(2)
    torch.manual_seed(5)
    torch.nn.functional.dropout(attn, 0.4, True, inplace=True)
    torch.testing.assert_close(got, torch.einsum("bmn,bcn->bcm", attn, v), rtol=1e-12, atol=1e-12)


# ---- grids and offsets ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_grids(variant):
    r = ref.reference_points(3, 4, variant=variant, dtype=F64)
    qg = ref.query_grid(5, 2, variant=variant, dtype=F64)
    assert r.shape == (3, 4, 2) and qg.shape == (5, 2, 2)
    assert r[:, 0, 0].tolist() == pytest.approx(_grid_1d(3, variant, "ref"), abs=1e-15)
    assert r[0, :, 1].tolist() == pytest.approx(_grid_1d(4, variant, "ref"), abs=1e-15)
    assert qg[:, 0, 0].tolist() == pytest.approx(_grid_1d(5, variant, "query"), abs=1e-15)
    assert qg[0, :, 1].tolist() == pytest.approx(_grid_1d(2, variant, "query"), abs=1e-15)


@pytest.mark.parametrize("variant", ["dat", "dat++"])
@pytest.mark.parametrize("factor", [-1, 0, 2.5])
def test_offset_to_pos(variant, factor, seed):
    off = torch.randn(4, 2, 3, 5, dtype=F64) * 2
    pos, r = ref.offset_to_pos(off, variant=variant, offset_range_factor=factor, no_off=False)
    o = off.permute(0, 2, 3, 1)
    rr = ref.reference_points(3, 5, variant=variant, dtype=F64)
    assert torch.equal(r, rr.expand(4, -1, -1, -1))
    div = (3, 5) if variant == "dat" else (2, 4)
    # the range is a float32 tensor in the original, hence the rounding
    rng = torch.tensor([1 / div[0], 1 / div[1]], dtype=torch.float32).to(F64)
    scaled = factor > 0 if variant == "dat" else factor >= 0
    if scaled:
        o = o.tanh() * rng * factor
    want = o + rr
    if factor < 0:
        want = want.tanh() if variant == "dat" else want.clamp(-1, 1)
    torch.testing.assert_close(pos, want, rtol=1e-15, atol=1e-15)


def test_offset_to_pos_no_off(seed):
    off = torch.randn(2, 2, 3, 3, dtype=F64, requires_grad=True)
    pos, r = ref.offset_to_pos(off, variant="dat++", offset_range_factor=3, no_off=True)
    assert torch.equal(pos, r)
    pos.sum().backward()
    assert torch.equal(off.grad, torch.zeros_like(off))  # zero, not None: the original's fill_
    with pytest.raises(NotImplementedError, match="no_off"):
        ref.offset_to_pos(off, variant="dat", offset_range_factor=3, no_off=True)


def test_log_cpb_coords(seed):
    pos = torch.rand(2, 2, 3, 2, dtype=F64) * 2 - 1
    d = ref.log_cpb_coords(pos, query_size=(3, 4), n_groups=1)
    assert d.shape == (2, 12, 6, 2)
    qg = torch.tensor([[_grid_1d(3, "dat++", "query")[i], _grid_1d(4, "dat++", "query")[j]] for i in range(3) for j in range(4)], dtype=F64)
    raw = (qg[None, :, None] - pos.reshape(2, 1, 6, 2)) * 4
    torch.testing.assert_close(d, raw.sign() * torch.log2(raw.abs() + 1) / 3, rtol=1e-14, atol=1e-15)


# ---- gradients ------------------------------------------------------------------------------------

def _pos_off_pixel_lines(H, W, th, tw, bg, hk, wk, variant, margin=0.02):
    """Positions whose bias taps sit well inside table cells (bilinear is not smooth on cell lines)."""
    qg = ref.query_grid(H, W, variant=variant, dtype=F64).reshape(1, H * W, 1, 2)
    for _ in range(1000):
        pos = (torch.rand(bg, hk, wk, 2, dtype=F64) * 2 - 1) * 1.2
        d = (qg - pos.reshape(bg, 1, hk * wk, 2)) * 0.5
        py = (d[..., 0] + 1) / 2 * (th - 1)
        px = (d[..., 1] + 1) / 2 * (tw - 1)
        frac = torch.stack([py - py.round(), px - px.round()]).abs()
        if frac.min() > margin:
            return pos
    raise AssertionError("no position draw off the pixel lines")


@pytest.mark.parametrize("variant", ["dat", "dat++"])
@pytest.mark.parametrize("groups", [1, 2])
def test_core_gradcheck(variant, groups, seed):
    B, nh, c, H, W, hk, wk = 1, 2, 2, 2, 3, 2, 2
    th, tw = 2 * H - 1, 2 * W - 1
    q, k, v, _, table, bias = _inputs(B, nh, groups, c, H, W, hk, wk, (th, tw), with_bias=True)
    pos = _pos_off_pixel_lines(H, W, th, tw, B * groups, hk, wk, variant)
    args = [t.requires_grad_() for t in (q, k, v, pos, table, bias)]

    def f(*a):
        return ref.deformable_attention(*a, query_size=(H, W), n_heads=nh, n_groups=groups, variant=variant)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- GPU tier -------------------------------------------------------------------------------------

@pytest.mark.gpu
class TestDatReferenceCuda:
    @pytest.mark.parametrize("variant", ["dat", "dat++"])
    def test_cuda_fp32_matches_cpu(self, variant, seed):
        q, k, v, pos, table, bias = _inputs(2, 6, 3, 8, 7, 9, 4, 5, (13, 17), with_bias=True, dtype=torch.float32)
        kw = dict(query_size=(7, 9), n_heads=6, n_groups=3, variant=variant)
        cpu = ref.deformable_attention(q, k, v, pos, table, bias, **kw)
        with _no_tf32():
            gpu = ref.deformable_attention(*(t.cuda() for t in (q, k, v, pos, table, bias)), **kw)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


class _no_tf32:
    """fp32 matmuls in full precision (einsum may otherwise use tf32 on a GPU)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old
