"""The Swin V1/V2 reference against hand-written float64 loops and against timm's blocks.

The loop oracles below are written from the definitions (timm's source read as a spec) and use
no helper of :mod:`fastswin.reference`: token pairs, bias rows, shift regions and masks are
computed one by one in Python floats.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastswin.reference import swin as ref

f64 = torch.float64


# ---- oracles: plain Python over windows / tokens ------------------------------------------------


def o_bias_row(mh, mw, i, j):
    """Row of the ((2Mh-1)(2Mw-1), heads) table for query token i and key token j (row-major)."""
    hi, wi = divmod(i, mw)
    hj, wj = divmod(j, mw)
    return (hi - hj + mh - 1) * (2 * mw - 1) + (wi - wj + mw - 1)


def o_softmax(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    return [x / s for x in e]


def o_dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def o_score_v1(scale, table, mh, mw):
    def score(qi, kj, h, i, j):
        return o_dot([x * scale for x in qi], kj) + table[o_bias_row(mh, mw, i, j)][h]
    return score


def o_score_v2(logit_scale, table, mh, mw):
    def score(qi, kj, h, i, j):
        nq = max(math.sqrt(o_dot(qi, qi)), 1e-12)
        nk = max(math.sqrt(o_dot(kj, kj)), 1e-12)
        s = math.exp(min(logit_scale[h], math.log(100.0)))
        t = table[o_bias_row(mh, mw, i, j)][h]
        return o_dot(qi, kj) / (nq * nk) * s + 16.0 / (1.0 + math.exp(-t))
    return score


def o_attend(queries, keys, values, score, h, i_index, masks):
    """One output row: softmax over keys of score + mask, times values."""
    logits = [score(queries, k, h, i_index, j) + masks[j] for j, k in enumerate(keys)]
    p = o_softmax(logits)
    return [sum(p[j] * values[j][c] for j in range(len(keys))) for c in range(len(values[0]))]


def o_windows(q, k, v, score, mask):
    """Windowed oracle: q, k, v (B*nW, heads, N, d); window b uses mask[b % nW]."""
    q, k, v = q.tolist(), k.tolist(), v.tolist()
    m = None if mask is None else mask.tolist()
    out = []
    for b in range(len(q)):
        out.append([])
        for h in range(len(q[0])):
            n = len(q[b][h])
            rows = []
            for i in range(n):
                mrow = [0.0] * n if m is None else m[b % len(m)][i]
                rows.append(o_attend(q[b][h][i], k[b][h], v[b][h], score, h, i, mrow))
            out[-1].append(rows)
    return torch.tensor(out, dtype=f64)


def o_regions(size, m, s):
    """timm's labels of one padded axis: slices [0, -m), [-m, -s), [-s, None), later wins."""
    labels = [None] * size
    for r, (a, b) in enumerate(((0, -m), (-m, -s), (-s, None))):
        for p in range(size)[slice(a, b)]:
            labels[p] = r
    return labels


def o_block(qkv, pad_qkv, window, shift, score):
    """Block-level oracle: qkv (B, H, W, 3, heads, d) -> (B, H, W, heads*d).

    Token y of the map sits at (y - s) mod H in the rolled map; the rolled map is padded at the
    bottom/right up to a multiple of the window with pad_qkv; windows are cut from the padded
    rolled map; pairs from different regions of the padded map get -100 when shifted.
    """
    B, H, W, _, heads, d = qkv.shape
    (mh, mw), (sh, sw) = window, shift
    hp, wp = -(-H // mh) * mh, -(-W // mw) * mw
    x = qkv.tolist()
    pad = [[[0.0] * d] * heads] * 3 if pad_qkv is None else pad_qkv.tolist()
    rh, rw = o_regions(hp, mh, sh), o_regions(wp, mw, sw)
    shifted = sh or sw

    def token(b, py, px):
        return x[b][(py + sh) % H][(px + sw) % W] if py < H and px < W else pad

    out = torch.empty(B, H, W, heads * d, dtype=f64)
    for b in range(B):
        for y in range(H):
            for xx in range(W):
                py, px = (y - sh) % H, (xx - sw) % W
                y0, x0 = py // mh * mh, px // mw * mw
                i = (py - y0) * mw + (px - x0)
                keys = [(y0 + a, x0 + c) for a in range(mh) for c in range(mw)]
                masks = [(-100.0 if shifted and (rh[ky], rw[kx]) != (rh[py], rw[px]) else 0.0) for ky, kx in keys]
                q_tok = token(b, py, px)
                kv = [token(b, ky, kx) for ky, kx in keys]
                row = []
                for h in range(heads):
                    row += o_attend(q_tok[0][h], [t[1][h] for t in kv], [t[2][h] for t in kv], score, h, i, masks)
                out[b, y, xx] = torch.tensor(row, dtype=f64)
    return out


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- helpers against definitions and timm ---------------------------------------------------------


@pytest.mark.parametrize("window", [(1, 1), (3, 3), (2, 5), (7, 7), (4, 3)])
def test_relative_position_index(window):
    from timm.models.swin_transformer import get_relative_position_index

    mh, mw = window
    idx = ref.relative_position_index(window)
    n = mh * mw
    assert idx.dtype == torch.long and idx.shape == (n, n)
    expect = torch.tensor([[o_bias_row(mh, mw, i, j) for j in range(n)] for i in range(n)])
    assert torch.equal(idx, expect)
    assert torch.equal(idx, get_relative_position_index(mh, mw))


@pytest.mark.parametrize("HW,window,shift", [
    ((8, 8), (4, 4), (2, 2)), ((7, 9), (4, 4), (2, 2)), ((5, 6), (3, 4), (1, 2)),
    ((3, 3), (4, 4), (2, 2)), ((6, 5), (3, 4), (0, 2)), ((4, 4), (2, 2), (1, 0)),
])
def test_shift_attn_mask_matches_definition_and_timm(HW, window, shift):
    from timm.models.swin_transformer import SwinTransformerBlock

    H, W = HW
    mask = ref.shift_attn_mask(H, W, window, shift, dtype=f64)
    (mh, mw), (sh, sw) = window, shift
    hp, wp = -(-H // mh) * mh, -(-W // mw) * mw
    rh, rw = o_regions(hp, mh, sh), o_regions(wp, mw, sw)
    expect = []
    for wy in range(hp // mh):
        for wx in range(wp // mw):
            toks = [(wy * mh + a, wx * mw + c) for a in range(mh) for c in range(mw)]
            region = [(rh[y], rw[x]) for y, x in toks]
            expect.append([[0.0 if ra == rb else -100.0 for rb in region] for ra in region])
    assert torch.equal(mask, torch.tensor(expect, dtype=f64))
    blk = SwinTransformerBlock(4, HW, num_heads=1, window_size=window, shift_size=shift, always_partition=True,
                               dtype=f64)
    assert torch.equal(mask, blk.attn_mask)


@pytest.mark.parametrize("window,pretrained", [
    ((7, 7), 0), ((3, 5), 0), ((8, 8), (6, 6)), ((1, 4), 0), ((4, 4), (1, 3)),
])
def test_cpb_coords_table(window, pretrained):
    from timm.models.swin_transformer_v2 import WindowAttention as TimmV2

    mh, mw = window
    t = ref.cpb_coords_table(window, pretrained)
    assert t.shape == (1, 2 * mh - 1, 2 * mw - 1, 2) and t.dtype == torch.float32
    ph, pw = (pretrained, pretrained) if isinstance(pretrained, int) else pretrained
    dh, dw = (max(ph - 1, 1), max(pw - 1, 1)) if ph > 0 else (max(mh - 1, 1), max(mw - 1, 1))

    def f(x):
        x = 8.0 * x
        return math.copysign(math.log2(abs(x) + 1.0) / 3.0, x) if x else 0.0

    expect = [[[f(a / dh), f(b / dw)] for b in range(-(mw - 1), mw)] for a in range(-(mh - 1), mh)]
    torch.testing.assert_close(t[0].double(), torch.tensor(expect, dtype=f64), rtol=1e-6, atol=1e-6)
    for dtype in (torch.float32, f64):
        m = TimmV2(8, window, 2, pretrained_window_size=pretrained, dtype=dtype)
        assert torch.equal(ref.cpb_coords_table(window, pretrained, dtype=dtype), m.relative_coords_table)


def test_partition_roundtrip(seed):
    x = torch.randn(2, 6, 8, 5, dtype=f64)
    w = ref.window_partition(x, (3, 4))
    assert w.shape == (8, 3, 4, 5)
    assert torch.equal(w[5], x[1, 0:3, 4:8])  # window b*nW + w: image 1, window (0, 1)
    assert torch.equal(ref.window_reverse(w, (3, 4), 6, 8), x)


# ---- windowed entries against the loop oracle --------------------------------------------------------


def _windows(bw, heads, window, d):
    n = window[0] * window[1]
    q, k, v = (torch.randn(bw, heads, n, d, dtype=f64) for _ in range(3))
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=f64)
    return q, k, v, table


def _random_mask(nw, n):
    # a mix of 0, -100 (timm's values) and arbitrary finite values
    m = torch.randn(nw, n, n, dtype=f64)
    m[torch.rand(nw, n, n) < 0.4] = -100.0
    return m


WINDOW_CASES = [  # (B*nW, nW for the mask or None, heads, window, d)
    (4, 2, 2, (3, 3), 4), (3, None, 3, (2, 4), 2), (1, 1, 1, (4, 3), 5), (2, None, 2, (1, 1), 3), (6, 3, 2, (1, 3), 2),
]


@pytest.mark.parametrize("bw,nw,heads,window,d", WINDOW_CASES)
@pytest.mark.parametrize("scale", [None, 0.37])
def test_window_attention_vs_loops(seed, bw, nw, heads, window, d, scale):
    q, k, v, table = _windows(bw, heads, window, d)
    mask = None if nw is None else _random_mask(nw, window[0] * window[1])
    out = ref.window_attention(q, k, v, table, window, mask, scale)
    s = d ** -0.5 if scale is None else scale
    close(out, o_windows(q, k, v, o_score_v1(s, table.tolist(), *window), mask))


@pytest.mark.parametrize("bw,nw,heads,window,d", WINDOW_CASES)
def test_window_attention_v2_vs_loops(seed, bw, nw, heads, window, d):
    q, k, v, table = _windows(bw, heads, window, d)
    table = 3 * table  # the sigmoid saturates: cover both ends
    q[0, 0, 0] = 0.0  # F.normalize's eps path: a zero query row
    logit_scale = torch.empty(heads, 1, 1, dtype=f64).uniform_(1.0, 6.0)  # some above log(100): clamped
    mask = None if nw is None else _random_mask(nw, window[0] * window[1])
    out = ref.window_attention_v2(q, k, v, logit_scale, table, window, mask)
    expect = o_windows(q, k, v, o_score_v2(logit_scale.flatten().tolist(), table.tolist(), *window), mask)
    close(out, expect)
    # logit_scale given as (heads,) means the same
    close(ref.window_attention_v2(q, k, v, logit_scale.flatten(), table, window, mask), out, 0)


# ---- block-level entries against the loop oracle ------------------------------------------------------

BLOCK_CASES = [  # (B, H, W, window, shift)
    (2, 6, 8, (3, 4), (1, 2)),   # divisible, shifted
    (2, 6, 8, (3, 4), (0, 0)),   # divisible, not shifted
    (1, 5, 7, (3, 4), (1, 2)),   # padding in both dims, batch 1
    (2, 5, 7, (3, 3), (1, 1)),   # square window, padding
    (1, 3, 4, (3, 4), (1, 2)),   # one window
    (1, 2, 3, (3, 4), (1, 2)),   # map smaller than the window (timm's always_partition)
    (2, 5, 6, (3, 4), (0, 2)),   # shift in one dimension only
    (1, 4, 5, (2, 2), (1, 1)),
]


def _block_inputs(B, H, W, window, heads=2, d=3, pad=True):
    qkv = torch.randn(B, H, W, 3, heads, d, dtype=f64)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=f64)
    pad_qkv = torch.randn(3, heads, d, dtype=f64) if pad else None
    return qkv, table, pad_qkv


@pytest.mark.parametrize("B,H,W,window,shift", BLOCK_CASES)
@pytest.mark.parametrize("pad", [True, False])
def test_shifted_window_attention_vs_loops(seed, B, H, W, window, shift, pad):
    qkv, table, pad_qkv = _block_inputs(B, H, W, window, pad=pad)
    out = ref.shifted_window_attention(qkv, table, window, shift, None, pad_qkv)
    assert out.shape == (B, H, W, 6)
    close(out, o_block(qkv, pad_qkv, window, shift, o_score_v1(3 ** -0.5, table.tolist(), *window)))


@pytest.mark.parametrize("B,H,W,window,shift", BLOCK_CASES)
def test_shifted_window_attention_v2_vs_loops(seed, B, H, W, window, shift):
    qkv, table, pad_qkv = _block_inputs(B, H, W, window)
    logit_scale = torch.empty(2, 1, 1, dtype=f64).uniform_(1.0, 6.0)
    out = ref.shifted_window_attention_v2(qkv, logit_scale, table, window, shift, pad_qkv)
    expect = o_block(qkv, pad_qkv, window, shift, o_score_v2(logit_scale.flatten().tolist(), table.tolist(), *window))
    close(out, expect)


# ---- block-level entries against timm's blocks, same weights, float64 ------------------------------------

TIMM_BLOCKS = [  # (input_resolution, window, shift, always_partition, dynamic_mask)
    ((8, 8), 4, 2, False, False),
    ((7, 9), 4, 2, False, False),       # padding
    ((5, 6), (3, 4), (1, 2), False, False),
    ((3, 3), 4, 2, False, False),       # timm: window -> (3, 3), shift -> 0
    ((3, 5), 4, 2, False, False),       # timm: window -> (3, 4), shift -> (0, 2)
    ((3, 3), 4, 2, True, False),        # always_partition: padded, shifted
    ((7, 9), 4, 2, False, True),        # dynamic_mask
    ((6, 6), 3, 0, False, False),
]


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("res,window,shift,always_partition,dynamic_mask", TIMM_BLOCKS)
@pytest.mark.parametrize("qkv_bias,head_dim", [(True, None), (False, None), (True, 6)])
def test_v1_block_vs_timm(seed, res, window, shift, always_partition, dynamic_mask, qkv_bias, head_dim):
    from timm.models.swin_transformer import SwinTransformerBlock

    blk = SwinTransformerBlock(8, res, num_heads=2, head_dim=head_dim, window_size=window, shift_size=shift,
                               always_partition=always_partition, dynamic_mask=dynamic_mask, qkv_bias=qkv_bias,
                               dtype=f64).eval()
    blk.attn.fused_attn = False
    _randomize(blk.attn)
    a = blk.attn
    x = torch.randn(2, *res, 8, dtype=f64)
    qkv = F.linear(x, a.qkv.weight, a.qkv.bias).view(2, *res, 3, 2, -1)
    pad_qkv = None if a.qkv.bias is None else a.qkv.bias.view(3, 2, -1)
    out = ref.shifted_window_attention(qkv, a.relative_position_bias_table, blk.window_size, blk.shift_size,
                                       a.scale, pad_qkv)
    close(F.linear(out, a.proj.weight, a.proj.bias), blk._attn(x))


@pytest.mark.parametrize("res,window,shift,always_partition,dynamic_mask", TIMM_BLOCKS)
@pytest.mark.parametrize("qkv_bias,pretrained", [(True, 0), (False, 0), (True, 6)])
def test_v2_block_vs_timm(seed, res, window, shift, always_partition, dynamic_mask, qkv_bias, pretrained):
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    blk = SwinTransformerV2Block(8, res, num_heads=2, window_size=window, shift_size=shift,
                                 always_partition=always_partition, dynamic_mask=dynamic_mask, qkv_bias=qkv_bias,
                                 pretrained_window_size=pretrained, dtype=f64).eval()
    _randomize(blk.attn)
    a = blk.attn
    x = torch.randn(2, *res, 8, dtype=f64)
    bias = None if a.q_bias is None else torch.cat((a.q_bias, a.k_bias, a.v_bias))
    qkv = F.linear(x, a.qkv.weight, bias).view(2, *res, 3, 2, -1)
    table = a.cpb_mlp(a.relative_coords_table).view(-1, 2)
    out = ref.shifted_window_attention_v2(qkv, a.logit_scale, table, blk.window_size, blk.shift_size,
                                          None if bias is None else bias.view(3, 2, -1))
    close(F.linear(out, a.proj.weight, a.proj.bias), blk._attn(x))


# ---- float64 gradcheck ----------------------------------------------------------------------------------


def _req(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_gradcheck_window_attention(seed):
    q, k, v, table = _req(*_windows(2, 2, (2, 2), 2))
    mask = _random_mask(2, 4)
    assert torch.autograd.gradcheck(lambda q, k, v, t: ref.window_attention(q, k, v, t, (2, 2), mask), (q, k, v, table))


def test_gradcheck_window_attention_v2(seed):
    q, k, v, table = _req(*_windows(1, 2, (2, 3), 2))
    logit_scale = torch.tensor([[[2.3]], [[5.0]]], dtype=f64, requires_grad=True)  # second head clamped
    mask = _random_mask(1, 6)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s, t: ref.window_attention_v2(q, k, v, s, t, (2, 3), mask), (q, k, v, logit_scale, table))


def test_gradcheck_shifted_window_attention(seed):
    qkv, table, pad_qkv = _req(*_block_inputs(1, 3, 5, (2, 2), heads=2, d=2))
    assert torch.autograd.gradcheck(
        lambda x, t, p: ref.shifted_window_attention(x, t, (2, 2), (1, 1), None, p), (qkv, table, pad_qkv))


def test_gradcheck_shifted_window_attention_v2(seed):
    qkv, table, pad_qkv = _req(*_block_inputs(1, 3, 4, (2, 3), heads=2, d=2))
    logit_scale = torch.tensor([[[1.1]], [[2.9]]], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, s, t, p: ref.shifted_window_attention_v2(x, s, t, (2, 3), (1, 1), p),
        (qkv, logit_scale, table, pad_qkv))


# ---- GPU tier ------------------------------------------------------------------------------------------


@pytest.mark.gpu
class TestReferenceOnCuda:
    """The reference on CUDA: fp32 equals the CPU run; fp16/bf16 stay near float64 (these
    low-precision errors are the yardstick later kernels are held to, DESIGN.md's error rule)."""

    def _block(self, dtype, device, v2):
        torch.manual_seed(0)
        qkv, table, pad_qkv = _block_inputs(2, 14, 13, (7, 7), heads=4, d=32)
        ls = torch.empty(4, 1, 1, dtype=f64).uniform_(1.0, 5.0)
        args = [t.to(device, dtype) for t in (qkv, ls, table, pad_qkv)]
        if v2:
            return ref.shifted_window_attention_v2(args[0], args[1], args[2], (7, 7), (3, 3), args[3])
        return ref.shifted_window_attention(args[0], args[2], (7, 7), (3, 3), None, args[3])

    @pytest.mark.parametrize("v2", [False, True])
    def test_fp32_cuda_equals_cpu(self, v2):
        cpu = self._block(torch.float32, "cpu", v2)
        gpu = self._block(torch.float32, "cuda", v2).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("v2", [False, True])
    @pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
    def test_low_precision_near_float64(self, v2, dtype, tol):
        exact = self._block(f64, "cpu", v2)
        low = self._block(dtype, "cuda", v2).cpu().double()
        assert torch.isfinite(low).all()
        assert (low - exact).abs().max().item() <= tol * max(1.0, exact.abs().max().item())
