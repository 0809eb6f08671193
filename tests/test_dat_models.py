"""``fastswin.models`` DAT / DAT++ backbones and their layers.

* The state_dict layout of every released configuration is written out below from the
  official ``models/dat.py`` / ``dat_blocks.py`` / ``nat.py`` (LeapLabTHU/DAT 42b489e and
  2f31405) -- key names, shapes and order (order = parameter order, which optimizer checkpoints
  rely on) -- and random state_dicts in that layout load with ``strict=True``.
* The layers are checked in float64 against step-by-step re-derivations of the originals'
  forward written here (window attention on partitioned windows with the rolled map and the
  region mask; NATTEN's window and bias rules with its own if/else formulas, looped per pixel).
* The whole backbones run forward and backward; the Triton backend (interpreter on CPU) equals
  the reference on a small DAT and DAT++ in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastswin.models as M
from fastswin.models.dat_layers import (DropPath, LocalAttention, NeighborhoodAttention2D, ShiftWindowAttention,
                                        TransformerMLPWithConv)
from fastswin.reference.neighborhood import neighborhood_attention_2d

F64 = torch.float64


# ---- the official state_dict layout, written out ------------------------------------------------

def official_layout(cfg):
    """[(key, shape)] in the official module order (own parameters, own buffers, then children)."""
    v1 = cfg["variant"] == "dat"
    out = []

    def add(prefix, **shapes):
        out.extend((f"{prefix}.{k}", tuple(s)) for k, s in shapes.items())

    def ln(prefix, c):
        add(prefix + ".norm", weight=(c,), bias=(c,))

    ds, dims, img = cfg["dim_stem"], cfg["dims"], cfg["img_size"] // cfg["patch_size"]
    conv_patches = cfg["use_conv_patches"]
    if conv_patches and not v1:
        add("patch_proj.0", weight=(ds // 2, 3, 3, 3), bias=(ds // 2,))
        ln("patch_proj.1", ds // 2)
        add("patch_proj.3", weight=(ds, ds // 2, 3, 3), bias=(ds,))
        ln("patch_proj.4", ds)
    else:
        k = 7 if conv_patches else cfg["patch_size"]
        add("patch_proj.0", weight=(ds, 3, k, k), bias=(ds,))
        ln("patch_proj.1", ds)
    for i in range(4):
        s, C, depth, heads = f"stages.{i}", dims[i], cfg["depths"][i], cfg["heads"][i]
        dim_in = ds if i == 0 else dims[i - 1] * 2
        if dim_in != C:
            add(s + ".proj", weight=(C, dim_in, 1, 1), bias=(C,))
        for j in range(2 * depth):
            ln(f"{s}.layer_norms.{j}", C)
        for j in range(depth):
            m = f"{s}.mlps.{j}"
            if cfg["use_dwc_mlps"][i]:
                sub = "" if v1 else ".0"
                add(m + ".linear1" + sub, weight=(4 * C, C, 1, 1), bias=(4 * C,))
                add(m + ".linear2" + sub, weight=(C, 4 * C, 1, 1), bias=(C,))
                add(m + ".dwc", weight=(4 * C, 1, 3, 3), bias=(4 * C,))
            else:
                add(m + ".chunk.linear1", weight=(4 * C, C), bias=(4 * C,))
                add(m + ".chunk.linear2", weight=(C, 4 * C), bias=(C,))
        for j, kind in enumerate(cfg["stage_spec"][i]):
            a = f"{s}.attns.{j}"
            if kind in "LS":
                M_ = cfg["window_sizes"][i]
                add(a, relative_position_bias_table=((2 * M_ - 1) ** 2, heads), relative_position_index=(M_ * M_, M_ * M_))
                if kind == "S":
                    add(a, attn_mask=((img // M_) ** 2, M_ * M_, M_ * M_))
                add(a + ".proj_qkv", weight=(3 * C, C), bias=(3 * C,))
                add(a + ".proj_out", weight=(C, C), bias=(C,))
            elif kind == "N":
                K = cfg["nat_ksizes"][i]
                add(a, rpb=(heads, 2 * K - 1, 2 * K - 1))
                add(a + ".qkv", weight=(3 * C, C), bias=(3 * C,))
                add(a + ".proj", weight=(C, C), bias=(C,))
            else:  # "D"
                g = cfg["groups"][i]
                if cfg["use_pes"][i]:  # "dat" sizes it by kv_size, "dat++" by q_size: both the stage's map
                    add(a, rpe_table=(heads, 2 * img - 1, 2 * img - 1))
                kk = (9, 7, 5, 3)[i] if v1 else cfg["ksizes"][i]
                add(a + ".conv_offset.0", weight=(C // g, 1, kk, kk), bias=(C // g,))
                ln(a + ".conv_offset.1", C // g)
                add(a + ".conv_offset.3", weight=(2, C // g, 1, 1))
                for p in ("proj_q", "proj_k", "proj_v", "proj_out"):
                    add(f"{a}.{p}", weight=(C, C, 1, 1), bias=(C,))
        if not v1 and cfg["use_lpus"][i]:
            for j in range(depth):
                add(f"{s}.local_perception_units.{j}", weight=(C, 1, 3, 3), bias=(C,))
        img //= 2
    for i in range(3):
        k = 3 if conv_patches else 2
        add(f"down_projs.{i}.0", weight=(dims[i + 1], dims[i], k, k))
        ln(f"down_projs.{i}.1", dims[i + 1])
    ln("cls_norm", dims[-1])
    add("cls_head", weight=(cfg["num_classes"], dims[-1]), bias=(cfg["num_classes"],))
    return out


@pytest.mark.parametrize("name", sorted(M.CONFIGS))
def test_state_dict_layout_is_the_official_one(name):
    model = M.build(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == official_layout(M.CONFIGS[name])


@pytest.mark.parametrize("name", sorted(M.CONFIGS))
def test_random_official_state_dict_loads_strict(name, seed):
    """A random state_dict in the official layout loads with strict=True; every tensor lands."""
    model = M.build(name)
    fresh = model.state_dict()
    sd = {}
    for k, shape in official_layout(M.CONFIGS[name]):
        # Index buffers keep their values (a random index would be out of range); the rest is random.
        sd[k] = fresh[k].clone() if k.endswith("relative_position_index") else torch.randn(shape)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].to(v.dtype)), k


@pytest.mark.parametrize("name,params", [("dat_tiny", 28.3), ("dat_small", 49.7), ("dat_base", 87.9),
                                         ("dat_pp_tiny", 24.0), ("dat_pp_small", 53.1), ("dat_pp_base", 93.7)])
def test_parameter_counts(name, params):
    """Papers: DAT-T/S/B 29/50/88 M (CVPR 2022, Table 1); DAT-T++/S++/B++ 24/53/94 M."""
    n = sum(p.numel() for p in M.build(name).parameters()) / 1e6
    assert abs(n - params) < 0.05


def test_buffers_have_the_original_values():
    model = M.dat_tiny()
    a = model.stages[0].attns[1]
    assert isinstance(a, ShiftWindowAttention) and a.shift_size == 4  # ceil(7 / 2), not Swin's 3
    # relative_position_index[p, q] = (dy + 6) * 13 + (dx + 6), p - q = (dy, dx)
    ys, xs = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    want = (ys[:, None] - ys[None, :] + 6) * 13 + (xs[:, None] - xs[None, :] + 6)
    assert torch.equal(a.relative_position_index, want)
    # attn_mask: regions of the 56x56 map cut at 56-7 and 56-4 in each axis, windows of the rolled map
    region = lambda i: 0 if i < 49 else (1 if i < 52 else 2)  # noqa: E731
    ids = torch.tensor([[3 * region(i) + region(j) for j in range(56)] for i in range(56)], dtype=torch.float32)
    win = ids.reshape(8, 7, 8, 7).permute(0, 2, 1, 3).reshape(64, 49)
    want_mask = torch.where(win[:, None, :] != win[:, :, None], -100.0, 0.0)
    assert torch.equal(a.attn_mask, want_mask)


# ---- layers against re-derived originals ---------------------------------------------------------

def derived_window_attention(m, x, shift, mask=None, proj_drop=0.0):
    """The original LocalAttention/ShiftWindowAttention forward, step by step, float64
    (``proj_drop``: the output dropout, drawn on the partitioned windows as the original does)."""
    B, C, H, W = x.shape
    M_ = m.window_size[0]
    h = m.heads
    if shift:
        x = torch.roll(x, (-shift, -shift), (2, 3))
        ids = torch.zeros(H, W)
        cuts = [slice(0, -M_), slice(-M_, -shift), slice(-shift, None)]
        c = 0
        for a in cuts:
            for b in cuts:
                ids[a, b] = c
                c += 1
        win = ids.reshape(H // M_, M_, W // M_, M_).permute(0, 2, 1, 3).reshape(-1, M_ * M_)
        mask = (win[:, None, :] - win[:, :, None]).ne(0).to(x.dtype) * -100.0
    t = x.reshape(B, C, H // M_, M_, W // M_, M_).permute(0, 2, 4, 3, 5, 1).reshape(-1, M_ * M_, C)
    qkv = t @ m.proj_qkv.weight.T + m.proj_qkv.bias
    q, k, v = qkv.chunk(3, dim=2)
    q = q * m.scale
    q, k, v = (z.reshape(z.shape[0], M_ * M_, h, -1).transpose(1, 2) for z in (q, k, v))
    attn = q @ k.transpose(-1, -2)
    bias = m.relative_position_bias_table[m.relative_position_index.view(-1)].view(M_ * M_, M_ * M_, h)
    attn = attn + bias.permute(2, 0, 1)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(-1, nW, h, M_ * M_, M_ * M_) + mask[None, :, None]).view(-1, h, M_ * M_, M_ * M_)
    o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, M_ * M_, C)
    o = o @ m.proj_out.weight.T + m.proj_out.bias
    if proj_drop:
        o = F.dropout(o, proj_drop, training=True)
    o = o.reshape(B, H // M_, W // M_, M_, M_, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    return torch.roll(o, (shift, shift), (2, 3)) if shift else o


@pytest.mark.parametrize("shift", [0, 2, 3])
def test_window_blocks_equal_the_original_math(shift, seed):
    C, heads, M_, H, W = 12, 3, 4, 8, 12
    if shift:
        m = ShiftWindowAttention(C, heads, M_, 0.0, 0.0, shift, (H, W), backend="reference").to(F64)
    else:
        m = LocalAttention(C, heads, M_, 0.0, 0.0, backend="reference").to(F64)
    x = torch.randn(2, C, H, W, dtype=F64, requires_grad=True)
    y, pos, ref = m(x)
    assert pos is None and ref is None
    want = derived_window_attention(m, x, shift)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + list(m.parameters()), g)
    exp = torch.autograd.grad(want, [x] + list(m.parameters()), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_blocks_output_dropout_draws_like_the_original(shift, seed):
    """In training, proj_drop zeroes the elements the original zeroes for the same seed (its mask
    is drawn on the partitioned windows of the rolled map)."""
    C, heads, M_, H, W = 8, 2, 4, 8, 12
    if shift:
        m = ShiftWindowAttention(C, heads, M_, 0.0, 0.5, shift, (H, W), backend="reference").to(F64)
    else:
        m = LocalAttention(C, heads, M_, 0.0, 0.5, backend="reference").to(F64)
    m.train()
    x = torch.randn(2, C, H, W, dtype=F64)
    torch.manual_seed(5)
    y, _, _ = m(x)
    torch.manual_seed(5)
    want = derived_window_attention(m, x, shift, proj_drop=0.5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert (y == 0).any()


def test_local_attention_explicit_mask_path(seed):
    """``forward(x, mask)`` (the original's signature) runs the windowed entry with that mask."""
    C, heads, M_, H, W = 8, 2, 4, 8, 8
    m = LocalAttention(C, heads, M_, 0.0, 0.0, backend="reference").to(F64)
    x = torch.randn(3, C, H, W, dtype=F64)
    mask = torch.randn(4, 16, 16, dtype=F64)
    y, _, _ = m(x, mask)
    torch.testing.assert_close(y, derived_window_attention(m, x, 0, mask), rtol=1e-12, atol=1e-12)


def natten_loops(q, k, v, rpb, K):
    """NATTEN 0.14's CPU kernel rules (get_window_start / get_pb_start, dilation 1), per pixel."""
    B, h, H, W, d = q.shape
    nh = K // 2

    def start(i, L):
        s = i - nh
        if s < 0:
            s = 0
        if i + nh >= L:
            s += L - i - nh - 1
        return s

    def pb(i, L):
        p = nh
        if i < nh:
            p += nh - i
        if i + nh >= L:
            p += L - i - 1 - nh
        return p

    out = torch.empty_like(q)
    for i in range(H):
        for j in range(W):
            ni, nj, pi, pj = start(i, H), start(j, W), pb(i, H), pb(j, W)
            logits = torch.stack([
                (q[:, :, i, j] * k[:, :, ni + a, nj + b]).sum(-1) + rpb[:, pi + a, pj + b]
                for a in range(K) for b in range(K)], -1)
            p = logits.softmax(-1)
            out[:, :, i, j] = sum(p[..., a * K + b, None] * v[:, :, ni + a, nj + b] for a in range(K) for b in range(K))
    return out


@pytest.mark.parametrize("K,H,W", [(3, 5, 7), (5, 9, 6), (7, 7, 10)])
def test_neighborhood_attention_equals_natten_rules(K, H, W, seed):
    q, k, v = (torch.randn(2, 3, H, W, 4, dtype=F64) for _ in range(3))
    rpb = torch.randn(3, 2 * K - 1, 2 * K - 1, dtype=F64)
    torch.testing.assert_close(neighborhood_attention_2d(q, k, v, rpb, K), natten_loops(q, k, v, rpb, K),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W", [(9, 8), (5, 6), (3, 9)])  # the last two are smaller than the kernel: padded
def test_neighborhood_module_pads_small_maps(H, W, seed):
    C, heads, K = 8, 2, 7
    m = NeighborhoodAttention2D(C, K, heads).to(F64)
    x = torch.randn(2, C, H, W, dtype=F64)
    y, _, _ = m(x)
    # the original: zero-pad the (B, H, W, C) map at the bottom/right up to K, attend, crop
    t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, max(0, K - W), 0, max(0, K - H)))
    Hp, Wp = t.shape[1:3]
    qkv = (t @ m.qkv.weight.T + m.qkv.bias).reshape(2, Hp, Wp, 3, heads, C // heads).permute(3, 0, 4, 1, 2, 5)
    o = natten_loops(qkv[0] * m.scale, qkv[1], qkv[2], m.rpb, K).permute(0, 2, 3, 1, 4).reshape(2, Hp, Wp, C)
    want = (o[:, :H, :W] @ m.proj.weight.T + m.proj.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_mlp_with_conv_variants(variant, seed):
    m = TransformerMLPWithConv(4, 2, 0.0, variant=variant).to(F64)
    x = torch.randn(2, 4, 5, 3, dtype=F64)
    c1 = m.linear1 if variant == "dat" else m.linear1[0]
    c2 = m.linear2 if variant == "dat" else m.linear2[0]
    h = F.conv2d(x, c1.weight, c1.bias)
    dw = F.conv2d(h, m.dwc.weight, m.dwc.bias, padding=1, groups=8)
    h = F.gelu(dw) if variant == "dat" else F.gelu(h + dw)
    torch.testing.assert_close(m(x), F.conv2d(h, c2.weight, c2.bias), rtol=1e-13, atol=1e-13)


def test_drop_path():
    x = torch.ones(4000, 3, 2, 2)
    m = DropPath(0.25)
    assert m.eval()(x) is x
    y = m.train()(x)
    kept = y[:, 0, 0, 0] != 0
    assert torch.all(y[kept] == 1 / 0.75) and torch.all(y[~kept] == 0)
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(y, y[:, :1, :1, :1].expand_as(y))  # one draw per sample


# ---- whole backbones -------------------------------------------------------------------------------

def small(variant, **kw):
    """A small backbone of each variant, every block type present (img 64: maps 16, 8, 4, 2)."""
    if variant == "dat":
        cfg = dict(M.CONFIGS["dat_tiny"], img_size=64, dim_stem=8, dims=[8, 16, 32, 64], depths=[2, 1, 2, 1],
                   heads=[2, 2, 4, 4], window_sizes=[4, 4, 2, 2], groups=[-1, -1, 2, 2],
                   stage_spec=[["L", "S"], ["L"], ["L", "D"], ["D"]], num_classes=10, drop_path_rate=0.0)
    else:
        cfg = dict(M.CONFIGS["dat_pp_tiny"], img_size=64, dim_stem=8, dims=[8, 16, 32, 64], depths=[2, 1, 2, 1],
                   heads=[2, 2, 4, 4], groups=[1, 2, 2, 2], strides=[4, 2, 1, 1], nat_ksizes=[3, 3, 3, 3],
                   stage_spec=[["N", "D"], ["D"], ["N", "D"], ["D"]], num_classes=10, drop_path_rate=0.0)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_small_backbone_forward_backward(variant, seed):
    model = M.DAT(**small(variant), backend="reference").to(F64)
    x = torch.randn(1, 3, 64, 64, dtype=F64)
    y, pos, ref = model(x)
    assert y.shape == (1, 10)
    if variant == "dat":
        assert [len(p) for p in pos] == [2, 1, 2, 1]
        assert pos[0] == [None, None] and pos[2][1].shape == (1, 2, 4, 4, 2) and ref[3][0].shape == (1, 2, 2, 2, 2)
    else:
        assert pos is None and ref is None
    y.sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.triton
@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_small_backbone_triton_equals_reference(variant, seed):
    # img 32: maps 8, 4, 2, 1 ("dat"); "dat++" needs maps of at least 2 x 2 (img 64).
    # One block per stage keeps the interpreter's time down; every fused block type is present.
    img = 32 if variant == "dat" else 64
    spec = [["S"], ["L"], ["D"], ["D"]] if variant == "dat" else [["D"], ["N"], ["D"], ["D"]]
    cfg = small(variant, img_size=img, window_sizes=[2, 2, 2, 1], depths=[1, 1, 1, 1], stage_spec=spec)
    ref_model = M.DAT(**cfg, backend="reference").to(F64)
    tri_model = M.DAT(**cfg, backend="triton").to(F64)
    tri_model.load_state_dict(ref_model.state_dict())
    x = torch.randn(1, 3, img, img, dtype=F64)
    a, b = ref_model(x)[0], tri_model(x)[0]
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(ref_model.named_parameters(), tri_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_load_pretrained_resizes_tables(seed):
    """The original's resizing loader: a 224 checkpoint into a 256 model (tables interpolated)."""
    small_model = M.DAT(**small("dat", img_size=64))
    big = M.DAT(**small("dat", img_size=128))
    msg = big.load_pretrained(small_model.state_dict())
    assert not msg.unexpected_keys
    a = big.stages[2].attns[1].rpe_table
    assert a.shape == (4, 15, 15)
    want = F.interpolate(small_model.stages[2].attns[1].rpe_table[None].detach(), (15, 15), mode="bicubic")[0]
    torch.testing.assert_close(a, want)


# ---- errors ----------------------------------------------------------------------------------------

def test_errors():
    with pytest.raises(TypeError, match="variant"):
        M.DAT()
    with pytest.raises(TypeError, match="nat_ksizes: not an argument of variant 'dat'"):
        M.DAT(variant="dat", nat_ksizes=[3, 3, 3, 3])
    with pytest.raises(ValueError, match="variant"):
        M.DAT(variant="dat+++")
    with pytest.raises(NotImplementedError, match="'Q' \\(FusedKQnA\\)"):
        M.DAT(**small("dat++", stage_spec=[["Q", "D"], ["D"], ["N", "D"], ["D"]]))
    with pytest.raises(NotImplementedError, match="'N'.*variant 'dat'"):
        M.DAT(**small("dat", stage_spec=[["N", "S"], ["L"], ["L", "D"], ["D"]]))
    with pytest.raises(ValueError, match="stage_spec: stage 1 lists 2 blocks"):
        M.DAT(**small("dat", stage_spec=[["L", "S"], ["L", "L"], ["L", "D"], ["D"]]))
    with pytest.raises(ValueError, match="depths: expected one value per stage"):
        M.DAT(**small("dat", depths=[2, 1, 2]))
    with pytest.raises(KeyError, match="dat_huge"):
        M.build("dat_huge")
    with pytest.raises(ValueError, match="backend"):
        M.dat_tiny(backend="fast")
    model = M.DAT(**small("dat"))
    with pytest.raises(ValueError, match="x: spatial size \\(8, 8\\) differs from fmap_size \\(16, 16\\)"):
        model.stages[0].attns[1](torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="multiple of window_size"):
        model.stages[0].attns[0](torch.randn(1, 8, 10, 8))
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention2D(8, 4, 2)
    with pytest.raises(NotImplementedError, match="dilation"):
        NeighborhoodAttention2D(8, 3, 2, dilation=2)
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="k: expected q's shape"):
        neighborhood_attention_2d(q, torch.randn(1, 2, 10, 10, 4), q, torch.randn(2, 5, 5), 3)
    with pytest.raises(ValueError, match=r"rpb: expected shape \(2, 5, 5\)"):
        neighborhood_attention_2d(q, q, q, torch.randn(2, 9, 9), 3)
    with pytest.raises(ValueError, match="q: expected a 5-D tensor"):
        neighborhood_attention_2d(q[0], q[0], q[0], torch.randn(2, 5, 5), 3)
    with pytest.raises(TypeError, match="lookup_22k"):
        M.DAT(**small("dat")).load_pretrained({}, lookup_22k=[0])
    pp = M.DAT(**small("dat++"))
    head = dict(pp.state_dict())
    head["cls_head.weight"] = torch.randn(20, 64)
    with pytest.raises(ValueError, match="cls_head.weight has shape \\(20, 64\\).*lookup_22k"):
        pp.load_pretrained({"cls_head.weight": head["cls_head.weight"]})
    pp.load_pretrained({"cls_head.weight": head["cls_head.weight"]}, lookup_22k=list(range(10)))
    assert torch.equal(pp.cls_head.weight, head["cls_head.weight"][:10])


# ---- GPU tier --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dat_tiny", "dat_pp_tiny"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_backbone_matches_reference(name, backend, seed):
    """Real DAT-T / DAT-T++ at 224 px, batch 2: logits and parameter gradients of the fused
    backends against the float64 reference, in fp32 (tf32 dots allowed: 1e-2 of the scale) and
    under bf16 autocast (the DESIGN error rule: at most 2x / 3x the plain-PyTorch bf16 error)."""
    ref = M.build(name, backend="reference").cuda().double()
    x = torch.randn(2, 3, 224, 224, device="cuda")

    def run(model, dtype, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = model(x.to(dtype))[0]
        y.float().square().mean().backward()
        return [y.detach().double()] + [p.grad.double() for p in model.parameters()]

    gold = run(ref, F64, False)
    fused = M.build(name, backend=backend).cuda()
    fused.load_state_dict(ref.state_dict())
    plain = M.build(name, backend="reference").cuda()
    plain.load_state_dict(ref.state_dict())
    for i, (a, g) in enumerate(zip(run(fused, torch.float32, False), gold)):
        scale = g.abs().max().item() + 1e-12
        assert (a - g).abs().max().item() <= 1e-2 * scale, f"fp32 tensor {i}"
    for i, (a, b, g) in enumerate(zip(run(fused, torch.float32, True), run(plain, torch.float32, True), gold)):
        factor = 2 if i == 0 else 3
        err, base = (a - g).abs().max().item(), (b - g).abs().max().item()
        assert err <= factor * base + 1e-5 * (g.abs().max().item() + 1e-12), f"bf16 tensor {i}: {err} vs {base}"
