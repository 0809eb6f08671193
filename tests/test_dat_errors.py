"""Bad inputs to the DAT functional entry and module raise errors that name the argument."""
import pytest
import torch

from fastswin.functional.deformable_attention import deformable_attention
from fastswin.modules.deformable_attention import DeformableAttention

COMMON = [(6, 5), (6, 5), 6, 2, 3, 0.0, 0.0, 1, 2, True, False, False, False]


def _core_inputs(dtype=torch.float32):
    # B=2, heads 4, groups 2, c 3, (H, W) = (3, 4), (Hk, Wk) = (2, 3)
    q = torch.randn(8, 3, 12, dtype=dtype)
    k = torch.randn(8, 3, 6, dtype=dtype)
    v = torch.randn(8, 3, 6, dtype=dtype)
    pos = torch.rand(4, 2, 3, 2, dtype=dtype) * 2 - 1
    table = torch.randn(4, 5, 7, dtype=dtype)
    return q, k, v, pos, table


KW = dict(query_size=(3, 4), n_heads=4, n_groups=2, variant="dat")


def call(q, k, v, pos, table=None, bias=None, **over):
    return deformable_attention(q, k, v, pos, table, bias, **{**KW, **over}, backend="reference")


# ---- functional -----------------------------------------------------------------------------------

def test_functional_ok(seed):
    assert call(*_core_inputs()).shape == (8, 3, 12)


@pytest.mark.parametrize("which,bad,match", [
    (0, lambda t: t[0], r"q: expected a 3-D tensor"),
    (1, lambda t: t[..., None], r"k: expected a 3-D tensor"),
    (2, lambda t: t[:, :2], r"v: expected size 3 in dimension 1"),
    (3, lambda t: t.reshape(4, 6, 2), r"pos: expected a 4-D tensor"),
    (3, lambda t: t[..., :1], r"pos: expected size 2 in dimension 3"),
    (3, lambda t: t[:, :1], r"pos: expected Hk\*Wk == Ns=6"),
    (3, lambda t: t[:2], r"pos: expected size 4 in dimension 0"),
    (4, lambda t: t[:3], r"rpe_table: expected size 4 in dimension 0"),
    (4, lambda t: t[0], r"rpe_table: expected a 3-D tensor"),
    (0, lambda t: t[:, :, :10], r"q: expected size H\*W=12"),
    (0, lambda t: t[:7], r"q: expected dimension 0 \(B\*heads\) to be a multiple of n_heads=4"),
])
def test_functional_shapes(which, bad, match, seed):
    args = list(_core_inputs())
    args[which] = bad(args[which])
    with pytest.raises(ValueError, match=match):
        call(*args)


def test_functional_attn_bias_shape(seed):
    q, k, v, pos, table = _core_inputs()
    with pytest.raises(ValueError, match=r"attn_bias: expected size 6 in dimension 2"):
        call(q, k, v, pos, table, torch.randn(8, 12, 5))


@pytest.mark.parametrize("which,name", [(0, "q"), (1, "k"), (3, "pos"), (4, "rpe_table")])
def test_functional_int_dtype(which, name, seed):
    args = list(_core_inputs())
    args[which] = (args[which] * 10).to(torch.int32)
    with pytest.raises(TypeError, match=rf"{name}: expected dtype in"):
        call(*args)


@pytest.mark.parametrize("which,name", [(1, "k"), (3, "pos"), (4, "rpe_table")])
def test_functional_mixed_dtypes(which, name, seed):
    args = list(_core_inputs())
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=rf"{name}: expected dtype float32 \(the dtype of q\)"):
        call(*args)


@pytest.mark.parametrize("which,name", [(1, "k"), (2, "v"), (3, "pos"), (4, "rpe_table")])
def test_functional_device_mix(which, name, seed):
    args = list(_core_inputs())
    args[which] = torch.empty(args[which].shape, device="meta")
    with pytest.raises(ValueError, match=rf"{name}: expected device cpu"):
        call(*args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(n_heads=4, n_groups=3), ValueError, r"n_heads: expected a multiple of n_groups=3"),
    (dict(n_groups=0), ValueError, r"n_groups: expected a positive int"),
    (dict(variant="dat+"), ValueError, r"variant: expected one of"),
    (dict(query_size=(3, 4, 1)), TypeError, r"query_size: expected an int or a pair"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p: expected a float in \[0, 1\]"),
    (dict(grid_dtype=torch.int64), TypeError, r"grid_dtype: expected a float dtype"),
])
def test_functional_arguments(over, exc, match, seed):
    with pytest.raises(exc, match=match):
        call(*_core_inputs(), **over)


@pytest.mark.parametrize("which,name", [(0, "q"), (2, "v"), (3, "pos"), (4, "rpe_table")])
def test_functional_nan(which, name, monkeypatch, seed):
    monkeypatch.setenv("FASTSWIN_CHECK_FINITE", "1")
    args = list(_core_inputs())
    args[which] = args[which].clone()
    args[which].view(-1)[1] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}: contains NaN or Inf"):
        call(*args)


def test_functional_unknown_backend(seed):
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        deformable_attention(*_core_inputs(), **KW, backend="fast")


# ---- module construction --------------------------------------------------------------------------

def test_module_variant_specific_arguments():
    with pytest.raises(TypeError, match=r"log_cpb: not an argument of variant 'dat'"):
        DeformableAttention(*COMMON, stage_idx=2, log_cpb=True, variant="dat")
    with pytest.raises(TypeError, match=r"ksize: not an argument of variant 'dat'"):
        DeformableAttention(*COMMON, ksize=3, variant="dat")
    with pytest.raises(TypeError, match=r"stage_idx: not an argument of variant 'dat\+\+'"):
        DeformableAttention(*COMMON, stage_idx=2, variant="dat++")
    with pytest.raises(TypeError, match=r"stage_idx belongs to variant 'dat'"):
        DeformableAttention(*COMMON, stage_idx=2, ksize=3, log_cpb=False)
    with pytest.raises(TypeError, match=r"variant 'dat' takes 14 positional arguments"):
        DeformableAttention(*COMMON, 5, True, variant="dat")
    with pytest.raises(TypeError, match=r"log_cpb: missing"):
        DeformableAttention(*COMMON, 5, variant="dat++")
    with pytest.raises(TypeError, match=r"variant: cannot tell the variant"):
        DeformableAttention(*COMMON)
    with pytest.raises(TypeError, match=r"stage_idx: given both by position and by keyword"):
        DeformableAttention(*COMMON, 2, stage_idx=2)


@pytest.mark.parametrize("idx,value,exc,match", [
    (2, 4, ValueError, r"n_heads: expected a multiple of n_groups=3"),
    (4, 0, ValueError, r"n_groups: expected a positive int"),
    (3, 2.5, TypeError, r"n_head_channels: expected an int"),
    (0, 6, TypeError, r"q_size: expected a pair of ints"),
    (1, (6,), TypeError, r"kv_size: expected a pair of ints"),
    (7, 0, ValueError, r"stride: expected a positive int"),
])
def test_module_bad_constructor_values(idx, value, exc, match):
    args = list(COMMON)
    args[idx] = value
    with pytest.raises(exc, match=match):
        DeformableAttention(*args, 2, variant="dat")


def test_module_bad_variant_backend_stage():
    with pytest.raises(ValueError, match=r"variant: expected one of"):
        DeformableAttention(*COMMON, 2, variant="dat3")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        DeformableAttention(*COMMON, 2, variant="dat", backend="fast")
    with pytest.raises(ValueError, match=r"stage_idx: expected a stage index 0..3"):
        DeformableAttention(*COMMON, 4, variant="dat")


# ---- module forward -------------------------------------------------------------------------------

@pytest.fixture
def dat():
    return DeformableAttention(*COMMON, 2, variant="dat", backend="reference")


def test_module_wrong_rank(dat, seed):
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        dat(torch.randn(12, 6, 5))


def test_module_wrong_channels(dat, seed):
    with pytest.raises(ValueError, match=r"x: expected C = n_heads \* n_head_channels = 12"):
        dat(torch.randn(1, 10, 6, 5))


def test_module_int_dtype(dat, seed):
    with pytest.raises(TypeError, match=r"x: expected dtype in"):
        dat(torch.randint(0, 5, (1, 12, 6, 5)))


def test_module_dtype_other_than_parameters(dat, seed):
    with pytest.raises(TypeError, match=r"x: expected dtype float32 \(the dtype of the module's parameters\)"):
        dat(torch.randn(1, 12, 6, 5, dtype=torch.float64))


def test_module_half_without_autocast(seed):
    # the original promotes positions to float32 and then fails in grid_sample
    m = DeformableAttention(*COMMON, 2, variant="dat", backend="reference").half()
    with pytest.raises(TypeError, match=r"x: float16 input gives float32 sample positions"):
        m(torch.randn(1, 12, 6, 5, dtype=torch.float16))


def test_module_device_mix(dat):
    with pytest.raises(ValueError, match=r"x: expected device cpu"):
        dat(torch.empty(1, 12, 6, 5, device="meta"))


def test_module_spatial_size_must_fit_dat_table(dat, seed):
    # "dat" reads its (heads, 2kv_h-1, 2kv_w-1) table as (heads, 2H-1, 2W-1)
    with pytest.raises(ValueError, match=r"x: spatial size \(7, 5\) does not fit rpe_table"):
        dat(torch.randn(1, 12, 7, 5))


def test_module_spatial_size_must_fit_fixed_pe(seed):
    m = DeformableAttention(*COMMON[:12], True, 5, False, variant="dat++", backend="reference")
    with pytest.raises(ValueError, match=r"x: spatial size \(5, 5\) with 25 samples does not fit the fixed_pe table"):
        m(torch.randn(1, 12, 5, 5))


def test_module_no_off_pool_size(seed):
    args = list(COMMON)
    args[7], args[11] = 2, True  # stride 2, no_off: a 5-wide map pools to 2 but the offset conv gives 3
    m = DeformableAttention(*args, 5, False, variant="dat++", backend="reference")
    with pytest.raises(ValueError, match=r"x: with no_off, avg_pool2d by stride=2 gives \(3, 2\)"):
        m(torch.randn(1, 12, 6, 5))


@pytest.mark.parametrize("variant,idx,match", [
    ("dat", [11], r"no_off: variant 'dat'"),
    ("dat", [12], r"fixed_pe: variant 'dat'"),
    ("dat++", [10, 11], r"dwc_pe: variant 'dat\+\+'"),
])
def test_module_configurations_the_original_cannot_run(variant, idx, match, seed):
    args = list(COMMON)
    for i in idx:
        args[i] = True
    tail = [2] if variant == "dat" else [5, False]
    m = DeformableAttention(*args, *tail, variant=variant, backend="reference")
    with pytest.raises(NotImplementedError, match=match):
        m(torch.randn(1, 12, 6, 5))


def test_module_nan(dat, monkeypatch, seed):
    monkeypatch.setenv("FASTSWIN_CHECK_FINITE", "1")
    x = torch.randn(1, 12, 6, 5)
    x[0, 3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf"):
        dat(x)


@pytest.mark.parametrize("log_cpb", [False, True])
@pytest.mark.parametrize("shape", [(1, 5), (6, 1)])
def test_module_datpp_bias_needs_two_rows_and_columns(log_cpb, shape, seed):
    """DAT++'s bias lookup puts queries at i / (H - 1): 0 / 0 on a one-pixel-high (or wide) map,
    where the original silently returns NaN everywhere. A clear error instead."""
    args = list(COMMON)
    args[0] = args[1] = shape
    args[8] = -1  # offset_range_factor < 0: no 1 / (Hk - 1) offset scaling
    m = DeformableAttention(*args, 3, log_cpb, variant="dat++", backend="reference")
    with pytest.raises(ValueError, match=r"x: variant 'dat\+\+' places the bias lookup's queries at i / \(H - 1\)"):
        m(torch.randn(1, 12, *shape))
    args[8] = 2  # with offset scaling the original already fails on the key grid (ZeroDivisionError)
    m = DeformableAttention(*args, 3, log_cpb, variant="dat++", backend="reference")
    with pytest.raises(ZeroDivisionError, match=r"offset: variant 'dat\+\+' scales offsets by 1 / \(Hk - 1\)"):
        m(torch.randn(1, 12, *shape))
