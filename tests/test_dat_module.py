"""``DeformableAttention`` against the official ``DAttentionBaseline`` math, in float64.

``derived_forward`` below re-derives the official forward of each variant step by step from
LeapLabTHU/DAT ``models/dat_blocks.py`` (commit 42b489e for "dat", 2f31405 for "dat++"), in
its own code (functional ops on the module's parameters, no fastswin code), so outputs and the
gradients of every parameter can be compared. The expected state_dict keys are written out from
the original ``__init__``.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastswin.backends import BackendUnavailableError
from fastswin.modules.deformable_attention import DeformableAttention

F64 = torch.float64
COMMON = ("q_size", "kv_size", "n_heads", "n_head_channels", "n_groups", "attn_drop", "proj_drop", "stride",
          "offset_range_factor", "use_pe", "dwc_pe", "no_off", "fixed_pe")


def make_cfg(variant, **kw):
    cfg = dict(q_size=(6, 5), kv_size=(6, 5), n_heads=6, n_head_channels=2, n_groups=3, attn_drop=0.0, proj_drop=0.0,
               stride=1, offset_range_factor=2, use_pe=True, dwc_pe=False, no_off=False, fixed_pe=False)
    cfg.update(stage_idx=2) if variant == "dat" else cfg.update(ksize=5, log_cpb=False)
    cfg.update(kw)
    return cfg


def build(variant, cfg, backend="reference"):
    return DeformableAttention(**cfg, variant=variant, backend=backend)


# ---- the official forward, re-derived -------------------------------------------------------------

def derived_forward(variant, cfg, P, x, training=False):
    """P: name -> tensor (the module's own parameters, so gradients reach them)."""
    dat = variant == "dat"
    B, C, H, W = x.shape
    nh, hc, g, s = cfg["n_heads"], cfg["n_head_channels"], cfg["n_groups"], cfg["stride"]
    cg, hg, dt = C // g, nh // g, x.dtype
    f, no_off, use_pe = cfg["offset_range_factor"], cfg["no_off"], cfg["use_pe"]

    # q, then the offset network on q split into groups: depthwise conv, LayerNorm over channels, GELU, 1x1 to 2
    q = F.conv2d(x, P["proj_q.weight"], P["proj_q.bias"])
    kk = (9, 7, 5, 3)[cfg["stage_idx"]] if dat else cfg["ksize"]
    pad = kk // 2 if (dat or kk != s) else 0
    t = F.conv2d(q.reshape(B * g, cg, H, W), P["conv_offset.0.weight"], P["conv_offset.0.bias"], s, pad, groups=cg)
    t = F.layer_norm(t.permute(0, 2, 3, 1), (cg,), P["conv_offset.1.norm.weight"], P["conv_offset.1.norm.bias"])
    t = F.gelu(t.permute(0, 3, 1, 2))
    off = F.conv2d(t, P["conv_offset.3.weight"]).permute(0, 2, 3, 1)  # (B*g, Hk, Wk, 2) as (dy, dx)
    Hk, Wk = off.shape[1:3]

    def centres(n, div):  # ((i + 0.5) / div) * 2 - 1
        return (torch.arange(n, dtype=dt) + 0.5) / div * 2 - 1

    def grid(ys, xs):
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)

    if dat:
        ref = grid(centres(Hk, Hk), centres(Wk, Wk))
        qgrid = grid(centres(H, H), centres(W, W))
        span, scaled = (Hk, Wk), f > 0
    else:
        ref = grid(centres(Hk, Hk - 1), centres(Wk, Wk - 1))
        qgrid = grid(torch.arange(H, dtype=dt) / (H - 1) * 2 - 1, torch.arange(W, dtype=dt) / (W - 1) * 2 - 1)
        span, scaled = (Hk - 1, Wk - 1), f >= 0 and not no_off
    if scaled:
        # the original's range tensor has torch's default dtype (float32): 1/Hk rounded to float32
        rng = torch.tensor([1 / span[0], 1 / span[1]], dtype=torch.float32).to(dt)
        off = torch.tanh(off) * rng * f
    if no_off:
        off = off * 0
    pos = off + ref
    if f < 0:
        pos = torch.tanh(pos) if dat else torch.clamp(pos, -1, 1)
    ns = Hk * Wk

    # keys and values from features sampled at pos (grid_sample wants (x, y))
    if no_off:
        xs = F.avg_pool2d(x, s, s)
    else:
        xs = F.grid_sample(x.reshape(B * g, cg, H, W), pos.flip(-1), mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    xs = xs.reshape(B, C, ns)
    k = torch.einsum("oc,bcn->bon", P["proj_k.weight"][:, :, 0, 0], xs) + P["proj_k.bias"][:, None]
    v = torch.einsum("oc,bcn->bon", P["proj_v.weight"][:, :, 0, 0], xs) + P["proj_v.bias"][:, None]
    qh = q.reshape(B, nh, hc, H * W)
    kh, vh = k.reshape(B, nh, hc, ns), v.reshape(B, nh, hc, ns)
    logits = torch.einsum("bhcm,bhcn->bhmn", qh, kh) * hc ** -0.5

    pe = use_pe and (dat or not no_off)
    lepe = None
    pos_g = pos.reshape(B, g, 1, ns, 2)
    qg = qgrid.reshape(1, 1, H * W, 1, 2)
    if pe and cfg["dwc_pe"]:
        lepe = F.conv2d(q, P["rpe_table.weight"], P["rpe_table.bias"], padding=1, groups=C).reshape(B, nh, hc, H * W)
    elif pe and cfg["fixed_pe"]:
        logits = logits + P["rpe_table"].reshape(1, nh, H * W, ns)
    elif pe and not dat and cfg["log_cpb"]:
        d = (qg - pos_g) * 4  # (B, g, HW, Ns, 2)
        d = torch.sign(d) * torch.log2(d.abs() + 1) / math.log2(8)
        hidden = F.relu(F.linear(d, P["rpe_table.0.weight"], P["rpe_table.0.bias"]))
        b = F.linear(hidden, P["rpe_table.2.weight"])  # (B, g, HW, Ns, hg)
        logits = logits + b.permute(0, 1, 4, 2, 3).reshape(B, nh, H * W, ns)
    elif pe:
        table = P["rpe_table"].reshape(nh, 2 * H - 1, 2 * W - 1) if dat else P["rpe_table"]
        d = ((qg - pos_g) * 0.5).flip(-1)  # (B, g, HW, Ns, 2) as (x, y)
        bias = F.grid_sample(table.reshape(1, g, hg, *table.shape[1:]).expand(B, -1, -1, -1, -1).reshape(B * g, hg, *table.shape[1:]),
                             d.reshape(B * g, H * W, ns, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
        logits = logits + bias.reshape(B, nh, H * W, ns)

    attn = torch.softmax(logits, -1)
    if training and cfg["attn_drop"] > 0:
        attn = F.dropout(attn.reshape(B * nh, H * W, ns), cfg["attn_drop"], True).reshape(attn.shape)
    out = torch.einsum("bhmn,bhcn->bhcm", attn, vh)
    if lepe is not None:
        out = out + lepe
    y = F.conv2d(out.reshape(B, C, H, W), P["proj_out.weight"], P["proj_out.bias"])
    if training and cfg["proj_drop"] > 0:
        y = F.dropout(y, cfg["proj_drop"], True)
    ref_out = ref[None, None].expand(B, g, -1, -1, -1)
    return y, pos.reshape(B, g, Hk, Wk, 2), ref_out


def _perturb(m):
    """Random parameters everywhere (zero biases or a flat table would hide mistakes)."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def check_parity(variant, cfg, B=2, H=None, W=None):
    m = build(variant, cfg).double()
    _perturb(m)
    H = H or cfg["q_size"][0]
    W = W or cfg["q_size"][1]
    x = torch.randn(B, m.nc, H, W, dtype=F64, requires_grad=True)
    got = m(x)
    P = dict(m.named_parameters())
    want = derived_forward(variant, cfg, P, x)
    for a, b, name in zip(got, want, ("y", "pos", "reference")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda s: f"{name}: {s}")
    gy, gp = torch.randn_like(got[0]), torch.randn_like(got[1])
    params = [p for p in m.parameters() if p.requires_grad]
    ga = torch.autograd.grad((got[0] * gy).sum() + (got[1] * gp).sum(), [x] + params, allow_unused=True)
    gb = torch.autograd.grad((want[0] * gy).sum() + (want[1] * gp).sum(), [x] + params, allow_unused=True)
    names = ["x"] + [n for n, p in m.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, ga, gb):
        if a is None or b is None:
            assert a is None and b is None, n
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda s: f"grad {n}: {s}")


DAT_CASES = [
    dict(),
    dict(stride=2, offset_range_factor=-1, n_groups=1),
    dict(stride=2, offset_range_factor=0, q_size=(7, 5), kv_size=(7, 5), stage_idx=3),
    dict(use_pe=False, n_groups=2, stage_idx=0),
    dict(dwc_pe=True, offset_range_factor=-1),
    dict(dwc_pe=True, fixed_pe=True, stride=2, n_groups=2),  # dwc_pe wins over fixed_pe
    dict(use_pe=False, fixed_pe=True, q_size=(4, 7), kv_size=(4, 7), stage_idx=1),
    dict(q_size=(8, 8), kv_size=(4, 4), stride=2),  # kv_size sizes the table; input of 4x4
]

DATPP_CASES = [
    dict(),
    dict(stride=2, offset_range_factor=-1, n_groups=1, q_size=(6, 8), kv_size=(6, 8)),
    dict(stride=2, offset_range_factor=0, n_groups=2, ksize=3),
    dict(use_pe=False, ksize=3),
    dict(dwc_pe=True, offset_range_factor=-1),
    dict(fixed_pe=True, n_groups=2),
    dict(fixed_pe=True, stride=2, q_size=(6, 4), kv_size=None, offset_range_factor=-1),
    dict(log_cpb=True),
    dict(log_cpb=True, stride=2, offset_range_factor=-1, n_groups=1, q_size=(6, 8)),
    dict(no_off=True, stride=2, q_size=(6, 4)),
    dict(no_off=True, offset_range_factor=-1, n_groups=2),  # the pe is dropped under no_off
    dict(no_off=True, use_pe=False, stride=2, ksize=2, q_size=(6, 4)),  # ksize == stride: no padding
]


@pytest.mark.parametrize("kw", DAT_CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_dat_matches_official_math(kw, seed):
    cfg = make_cfg("dat", **kw)
    H, W = (4, 4) if cfg["q_size"] == (8, 8) else (None, None)
    check_parity("dat", cfg, H=H, W=W)


@pytest.mark.parametrize("kw", DATPP_CASES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_datpp_matches_official_math(kw, seed):
    check_parity("dat++", make_cfg("dat++", **kw))


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_input_size_other_than_q_size(variant, seed):
    # dat++ samples its table at any input size; dat reads it as (2H-1, 2W-1), so only without a table
    cfg = make_cfg(variant, use_pe=variant == "dat++")
    check_parity(variant, cfg, H=7, W=4)


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_dropout_training(variant, seed):
    cfg = make_cfg(variant, attn_drop=0.3, proj_drop=0.2)
    m = build(variant, cfg).double().train()
    _perturb(m)
    x = torch.randn(2, m.nc, 6, 5, dtype=F64, requires_grad=True)
    torch.manual_seed(11)
    y, _, _ = m(x)
    torch.manual_seed(11)
    want, _, _ = derived_forward(variant, cfg, dict(m.named_parameters()), x, training=True)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-11)
    y.sum().backward()  # trains (the original's in-place dropout on the softmax output cannot)
    assert m.rpe_table.grad is not None
    m.eval()
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)


# ---- checkpoint compatibility ---------------------------------------------------------------------

def _conv_offset_keys():
    return ["conv_offset.0.weight", "conv_offset.0.bias", "conv_offset.1.norm.weight", "conv_offset.1.norm.bias",
            "conv_offset.3.weight"]


PROJ = ["proj_q.weight", "proj_q.bias", "proj_k.weight", "proj_k.bias", "proj_v.weight", "proj_v.bias",
        "proj_out.weight", "proj_out.bias"]

# (variant, options, expected keys in order, expected shapes of the non-projection entries)
# q_size (6, 5), n_heads 6, n_head_channels 2 (nc 12), n_groups 3 (4 channels, 2 heads per group)
KEY_CASES = [
    ("dat", dict(), ["rpe_table"] + _conv_offset_keys() + PROJ,
     {"rpe_table": (6, 11, 9), "conv_offset.0.weight": (4, 1, 5, 5), "conv_offset.3.weight": (2, 4, 1, 1)}),
    ("dat", dict(kv_size=(3, 2), stride=2, stage_idx=0), ["rpe_table"] + _conv_offset_keys() + PROJ,
     {"rpe_table": (6, 5, 3), "conv_offset.0.weight": (4, 1, 9, 9)}),
    ("dat", dict(fixed_pe=True), ["rpe_table"] + _conv_offset_keys() + PROJ, {"rpe_table": (6, 30, 30)}),
    ("dat", dict(dwc_pe=True), _conv_offset_keys() + PROJ + ["rpe_table.weight", "rpe_table.bias"],
     {"rpe_table.weight": (12, 1, 3, 3)}),
    ("dat", dict(use_pe=False), _conv_offset_keys() + PROJ, {}),
    ("dat", dict(no_off=True), ["rpe_table"] + _conv_offset_keys() + PROJ, {}),
    ("dat++", dict(), ["rpe_table"] + _conv_offset_keys() + PROJ, {"rpe_table": (6, 11, 9)}),
    ("dat++", dict(stride=2, kv_size=(1, 1)), ["rpe_table"] + _conv_offset_keys() + PROJ,
     {"rpe_table": (6, 11, 9), "conv_offset.0.weight": (4, 1, 5, 5)}),
    ("dat++", dict(fixed_pe=True, stride=2), ["rpe_table"] + _conv_offset_keys() + PROJ, {"rpe_table": (6, 30, 6)}),
    ("dat++", dict(log_cpb=True), _conv_offset_keys() + PROJ + ["rpe_table.0.weight", "rpe_table.0.bias", "rpe_table.2.weight"],
     {"rpe_table.0.weight": (32, 2), "rpe_table.0.bias": (32,), "rpe_table.2.weight": (2, 32)}),
    ("dat++", dict(dwc_pe=True, ksize=3), _conv_offset_keys() + PROJ + ["rpe_table.weight", "rpe_table.bias"],
     {"conv_offset.0.weight": (4, 1, 3, 3)}),
    ("dat++", dict(no_off=True), _conv_offset_keys() + PROJ, {}),
]


@pytest.mark.parametrize("variant,kw,keys,shapes", KEY_CASES)
def test_state_dict_keys_and_round_trip(variant, kw, keys, shapes, seed):
    cfg = make_cfg(variant, **kw)
    m = build(variant, cfg)
    sd = m.state_dict()
    assert list(sd) == keys
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    for name in PROJ:
        if name.endswith("weight"):
            assert tuple(sd[name].shape) == (12, 12, 1, 1)
    other = build(variant, cfg)
    _perturb(other)
    other.load_state_dict(sd, strict=True)
    for name in sd:
        assert torch.equal(other.state_dict()[name], sd[name])
    if variant == "dat++" and cfg["no_off"]:
        assert not any(p.requires_grad for p in m.conv_offset.parameters())


@pytest.mark.parametrize("variant", ["dat", "dat++"])
@pytest.mark.parametrize("pe", ["table", "fixed", "dwc", "log_cpb"])
def test_init_matches_official(variant, pe):
    """The original builds its layers in this order and draws the tables with timm's trunc_normal_."""
    timm_init = pytest.importorskip("timm.layers").trunc_normal_
    if variant == "dat" and pe == "log_cpb":
        pytest.skip("dat has no log_cpb")
    kw = dict(fixed_pe=pe == "fixed", dwc_pe=pe == "dwc")
    if variant == "dat++":
        kw["log_cpb"] = pe == "log_cpb"
    cfg = make_cfg(variant, **kw)
    torch.manual_seed(3)
    m = build(variant, cfg)
    torch.manual_seed(3)
    nn = torch.nn
    want = {}
    c0 = nn.Conv2d(4, 4, 5, 1, 2, groups=4)
    ln = nn.LayerNorm(4)
    c3 = nn.Conv2d(4, 2, 1, 1, 0, bias=False)
    want.update({"conv_offset.0.weight": c0.weight, "conv_offset.0.bias": c0.bias, "conv_offset.1.norm.weight": ln.weight,
                 "conv_offset.1.norm.bias": ln.bias, "conv_offset.3.weight": c3.weight})
    for name in ("proj_q", "proj_k", "proj_v", "proj_out"):
        c = nn.Conv2d(12, 12, 1, 1, 0)
        want[name + ".weight"], want[name + ".bias"] = c.weight, c.bias
    if pe == "dwc":
        c = nn.Conv2d(12, 12, 3, 1, 1, groups=12)
        want["rpe_table.weight"], want["rpe_table.bias"] = c.weight, c.bias
    elif pe == "log_cpb":
        l0, l2 = nn.Linear(2, 32), nn.Linear(32, 2, bias=False)
        want.update({"rpe_table.0.weight": l0.weight, "rpe_table.0.bias": l0.bias, "rpe_table.2.weight": l2.weight})
    else:
        t = torch.zeros(6, 30, 30) if pe == "fixed" else torch.zeros(6, 11, 9)
        want["rpe_table"] = timm_init(t, std=0.01)
    got = m.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name].detach()), name


# ---- construction, backends, repr -----------------------------------------------------------------

def test_positional_arguments_tell_the_variant():
    common = [(6, 5), (6, 5), 6, 2, 3, 0.0, 0.0, 1, 2, True, False, False, False]
    a = DeformableAttention(*common, 2)
    b = DeformableAttention(*common, 5, True)
    assert a.variant == "dat" and a.stage_idx == 2
    assert b.variant == "dat++" and (b.ksize, b.log_cpb) == (5, True)
    c = DeformableAttention(*common, 2, variant="dat")
    assert list(c.state_dict()) == list(a.state_dict())


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_triton_backend_unavailable(variant, seed, monkeypatch):
    """On CPU tensors without the interpreter, an explicit backend="triton" raises with its
    reason instead of falling back."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = build(variant, make_cfg(variant), backend="triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        m(torch.randn(1, 12, 6, 5))


@pytest.mark.parametrize("variant", ["dat", "dat++"])
def test_auto_backend_close_to_reference(variant, seed):
    cfg = make_cfg(variant)
    m = build(variant, cfg, backend="auto")
    r = build(variant, cfg)
    r.load_state_dict(m.state_dict())
    x = torch.randn(2, 12, 6, 5)
    for a, b in zip(m(x), r(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_extra_repr():
    a = repr(build("dat", make_cfg("dat")))
    b = repr(build("dat++", make_cfg("dat++", log_cpb=True)))
    assert "variant='dat'" in a and "stage_idx=2" in a and "kv_size=(6, 5)" in a and "log_cpb" not in a
    assert "variant='dat++'" in b and "ksize=5" in b and "log_cpb=True" in b and "stage_idx" not in b


# ---- GPU tier -------------------------------------------------------------------------------------

@pytest.mark.gpu
class TestDeformableAttentionCuda:
    @pytest.mark.parametrize("variant", ["dat", "dat++"])
    def test_cuda_fp32_matches_cpu(self, variant, seed):
        cfg = make_cfg(variant, q_size=(14, 14), kv_size=(14, 14), n_heads=6, n_head_channels=8, stride=2,
                       offset_range_factor=-1 if variant == "dat++" else 2)
        m = build(variant, cfg)
        _perturb(m)
        x = torch.randn(2, 48, 14, 14)
        cpu = m(x)
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            gpu = m.cuda()(x.cuda())
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
