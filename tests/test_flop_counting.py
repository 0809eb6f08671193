"""fvcore's FlopCountAnalysis on the fused ops, with :func:`fastswin.ops.fvcore_handles.fvcore_handles`.

Oracle: fvcore itself on the reference backend (plain torch ops it counts: matmul, einsum,
grid_sampler). Each case counts the same module / function on the fused backend with the handles
and checks the totals are equal, and that without the handles fvcore reports the fused op as
unsupported (so the comparison is not vacuous). The Triton ops run on CPU under
``TRITON_INTERPRET=1`` (``triton`` mark); the C++ bilinear_sample op runs on CPU as is.
"""
import logging
import warnings

import pytest
import torch

pytest.importorskip("fvcore")
from fvcore.nn import FlopCountAnalysis  # noqa: E402

import fastswin  # noqa: E402
from fastswin.functional import (  # noqa: E402
    bilinear_sample,
    shifted_window_attention,
    shifted_window_attention_v2,
)
from fastswin.ops.fvcore_handles import OP_NAMES, count_flops_fvcore, fvcore_handles  # noqa: E402

NS = "fastswin::"
# a GPU runs the Triton ops natively (the conftest runs ``triton`` tests there without the interpreter)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class _Fn(torch.nn.Module):
    """A functional entry as a module (fvcore traces modules), backend fixed."""

    def __init__(self, fn, backend, **kw):
        super().__init__()
        self.fn, self.backend, self.kw = fn, backend, kw

    def forward(self, *args):
        return self.fn(*args, backend=self.backend, **self.kw)


def _analysis(model, inputs, handles):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation warnings
        fa = count_flops_fvcore(model, inputs) if handles else FlopCountAnalysis(model, inputs)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.total()  # runs the trace inside the filter
    return fa


def _check(make, inputs, backend, op):
    """make(backend) -> module; fused total with handles == reference total; op counted > 0;
    without handles the op is unsupported."""
    inputs = tuple(t.to(DEV) for t in inputs)
    torch.manual_seed(0)
    ref = make("reference").to(DEV)
    torch.manual_seed(0)
    fused = make(backend).to(DEV)
    fused.load_state_dict(ref.state_dict())
    want = _analysis(ref, inputs, handles=True)
    got = _analysis(fused, inputs, handles=True)
    assert NS + op not in got.unsupported_ops()
    assert got.by_operator()[op] > 0
    assert got.total() == want.total(), (got.by_operator(), want.by_operator())
    bare = _analysis(fused, inputs, handles=False)
    assert bare.unsupported_ops()[NS + op] >= 1
    assert bare.total() < want.total()


def test_handles_cover_every_fastswin_forward_op():
    import fastswin.ops.bilinear_sample  # noqa: F401  (defines the ops this build has)
    import fastswin.ops.deformable_attention_triton  # noqa: F401
    import fastswin.ops.window_attention_cuda  # noqa: F401

    handles = fvcore_handles()
    assert set(handles) == set(OP_NAMES)
    ops = [n for n in dir(torch.ops.fastswin) if not n.startswith("_") and n != "name"]
    forward = [n for n in ops if not n.endswith(("_bwd", "_backward"))]
    assert forward, ops
    assert sorted(NS + n for n in forward) == sorted(n for n in handles if n[len(NS):] in ops)


def test_count_flops_fvcore_without_fvcore(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fvcore.nn", None)
    with pytest.raises(ImportError, match="pip install fvcore"):
        count_flops_fvcore(torch.nn.Linear(2, 2), torch.randn(1, 2))


@pytest.mark.triton
def test_window_attention_module():
    x = torch.randn(2, 4, 16)
    _check(lambda be: fastswin.WindowAttention(16, 2, window_size=2, backend=be).eval(), (x,), "triton",
           "window_attention_triton_fwd")


@pytest.mark.triton
def test_window_attention_v2_module():
    x = torch.randn(2, 4, 16)
    _check(lambda be: fastswin.WindowAttentionV2(16, 2, num_heads=2, backend=be).eval(), (x,), "triton",
           "window_attention_v2_triton_fwd")


@pytest.mark.triton
def test_shifted_window_attention():
    # 3x3 map, window 2: padded to 4x4, 4 windows counted per image (as the reference attends)
    qkv, table = torch.randn(1, 3, 3, 3, 2, 4), torch.randn(9, 2)
    _check(lambda be: _Fn(shifted_window_attention, be, window_size=2, shift_size=1), (qkv, table), "triton",
           "shifted_window_attention_triton_fwd")


@pytest.mark.triton
def test_shifted_window_attention_v2():
    qkv, logit_scale, table = torch.randn(1, 3, 3, 3, 2, 4), torch.randn(2), torch.randn(9, 2)
    _check(lambda be: _Fn(shifted_window_attention_v2, be, window_size=2, shift_size=1), (qkv, logit_scale, table),
           "triton", "shifted_window_attention_v2_triton_fwd")


def _dat_cfg(variant, **kw):
    cfg = dict(q_size=(4, 4), kv_size=(4, 4), n_heads=2, n_head_channels=2, n_groups=1, attn_drop=0.0,
               proj_drop=0.0, stride=1, offset_range_factor=2, use_pe=True, dwc_pe=False, no_off=False,
               fixed_pe=False)
    cfg.update(stage_idx=2) if variant == "dat" else cfg.update(ksize=3, log_cpb=False)
    cfg.update(kw)
    return cfg


@pytest.mark.triton
@pytest.mark.parametrize("variant,kw", [
    ("dat", {}),                      # rpe_table: the reference's grid_sample of the bias is counted
    ("dat", {"use_pe": False}),       # no bias
    ("dat++", {}),
    ("dat++", {"log_cpb": True}),     # bias from the cpb MLP, passed as attn_bias
])
def test_deformable_attention_module(variant, kw):
    x = torch.randn(1, 4, 4, 4)
    _check(lambda be: fastswin.DeformableAttention(**_dat_cfg(variant, **kw), variant=variant, backend=be).eval(),
           (x,), "triton", "deformable_attention_triton_fwd")


def test_bilinear_sample_cpp():
    from fastswin.ops import bilinear_sample as B

    if not B.AVAILABLE:
        pytest.skip("the C++ extension lacks bilinear_sample")
    feat, pos = torch.randn(1, 2, 4, 5), torch.rand(1, 3, 2, 2) * 3
    _check(lambda be: _Fn(bilinear_sample, be), (feat, pos), "cuda", "bilinear_sample")


@pytest.mark.triton
def test_bilinear_sample_triton():
    feat, pos = torch.randn(1, 2, 4, 5), torch.rand(1, 3, 2, 2) * 3
    _check(lambda be: _Fn(bilinear_sample, be), (feat, pos), "triton", "bilinear_sample_triton_fwd")


@pytest.mark.triton
def test_flop_counter_mode_agrees_on_patched_timm_swin():
    """FlopCounterMode (2 per multiply-add) and fvcore (1) on a patched tiny timm Swin: the same
    count for the fused op, and the same total once fvcore's extra ops (layer_norm, pooling: not
    counted by FlopCounterMode) are taken out."""
    from timm.models.swin_transformer import SwinTransformer
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    m = SwinTransformer(img_size=16, patch_size=2, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4,
                        num_classes=3).eval().to(DEV)
    fastswin.patch(m, backend="triton")
    x = torch.randn(1, 3, 16, 16, device=DEV)
    fa = _analysis(m, (x,), handles=True)
    by_op = fa.by_operator()
    assert not any(k.startswith(NS) for k in fa.unsupported_ops())
    with FlopCounterMode(display=False) as fcm, torch.no_grad():
        m(x)
    counts = fcm.get_flop_counts()["Global"]
    op = torch.ops.fastswin.shifted_window_attention_triton_fwd
    assert counts[op] == 2 * by_op["shifted_window_attention_triton_fwd"] > 0
    extra = sum(v for k, v in by_op.items() if k in ("layer_norm", "adaptive_avg_pool2d", "adaptive_avg_pool1d"))
    assert fcm.get_total_flops() == 2 * (fa.total() - extra), (dict(counts), dict(by_op))


logging.getLogger("fvcore").setLevel(logging.ERROR)
