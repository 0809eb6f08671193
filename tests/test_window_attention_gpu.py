"""GPU tier of the Triton window attention: real Swin shapes, every dtype, the error rule.

Runs only on a CUDA machine (``gpu`` marker). The interpreter tier
(``test_window_attention_triton.py``) covers the algorithm on tiny shapes; this file covers
what only a GPU shows: real window counts and head counts, fp16/bf16 arithmetic on tensor
cores, tf32/ieee fp32, and int64 addressing past 2**31 elements.

Error rule (DESIGN.md, from flash-attention): in fp16/bf16 the kernel's max error against a
float64 reference is at most 2x (output) / 3x (gradients) the error of the plain PyTorch
reference run in the same low precision, plus 1e-4 x the magnitude (see ``compare``).
"""
import pytest
import torch

import fastswin.functional as FS
from fastswin.reference import swin as ref

from test_window_attention_triton import compare

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

# (name, H=W, heads, window, shift): Swin-T stages at 224 px, a padded size, SwinV2 windows.
V1_CASES = [
    ("swin_t_s1", 56, 3, 7, 3),
    ("swin_t_s2", 28, 6, 7, 3),
    ("swin_t_s3", 14, 12, 7, 3),
    ("swin_t_s4", 7, 24, 7, 0),
    ("padded_30", 30, 4, 7, 3),
]
V2_CASES = [("swinv2_w8", 64, 3, 8, 4), ("swinv2_w16", 64, 6, 16, 8), ("swinv2_w24", 48, 4, 24, 12)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _block_inputs(B, H, heads, window, dtype, v2):
    qkv = torch.randn(B, H, H, 3, heads, 32, device="cuda", dtype=dtype)
    table = 0.5 * torch.randn((2 * window - 1) ** 2, heads, device="cuda", dtype=dtype)
    pad = 0.1 * torch.randn(3, heads, 32, device="cuda", dtype=dtype)
    if v2:
        scale = torch.log(10 * torch.rand(heads, 1, 1, device="cuda", dtype=dtype) + 1)
        return [qkv, scale, table, (window, window)], pad
    return [qkv, table, (window, window)], pad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", V1_CASES, ids=lambda c: c[0])
def test_v1_block_real_shapes(case, dtype, seed):
    _, H, heads, window, shift = case
    args, pad = _block_inputs(2, H, heads, window, dtype, v2=False)
    qkv, table, win = args

    def triton_fn(qkv, table, pad):
        return FS.shifted_window_attention(qkv, table, win, (shift, shift), pad_qkv=pad, backend="triton")

    def ref_fn(qkv, table, pad):
        return ref.shifted_window_attention(qkv, table, win, (shift, shift), pad_qkv=pad)

    compare(triton_fn, ref_fn, [qkv, table, pad], [True, True, True])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", V2_CASES, ids=lambda c: c[0])
def test_v2_block_real_shapes(case, dtype, seed):
    _, H, heads, window, shift = case
    args, pad = _block_inputs(2, H, heads, window, dtype, v2=True)
    qkv, scale, table, win = args

    def triton_fn(qkv, scale, table, pad):
        return FS.shifted_window_attention_v2(qkv, scale, table, win, (shift, shift), pad_qkv=pad, backend="triton")

    def ref_fn(qkv, scale, table, pad):
        return ref.shifted_window_attention_v2(qkv, scale, table, win, (shift, shift), pad_qkv=pad)

    compare(triton_fn, ref_fn, [qkv, scale, table, pad], [True, True, True, True])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_v1_windowed_with_shift_mask(dtype, seed):
    """The drop-in entry as timm's block calls it: partitioned windows plus timm's mask."""
    B, H, heads, window, shift = 4, 28, 6, 7, 3
    n_win = (H // window) ** 2
    q, k, v = (torch.randn(B * n_win, heads, window * window, 32, device="cuda", dtype=dtype) for _ in range(3))
    table = 0.5 * torch.randn((2 * window - 1) ** 2, heads, device="cuda", dtype=dtype)
    mask = ref.shift_attn_mask(H, H, (window, window), (shift, shift), device="cuda", dtype=dtype)

    def triton_fn(q, k, v, table):
        return FS.window_attention(q, k, v, table, (window, window), mask, backend="triton")

    def ref_fn(q, k, v, table):
        return ref.window_attention(q, k, v, table, (window, window), mask.to(q.dtype))

    compare(triton_fn, ref_fn, [q, k, v, table], [True, True, True, True])


def test_int64_addressing_forward(seed):
    """qkv past 2**31 elements (Swin-T stage 1 at batch 2400, fp16: 4.3 GB): the first and the
    last images must equal the reference computed on them alone."""
    free, _ = torch.cuda.mem_get_info()
    B, H, heads, window, shift = 2400, 56, 3, 7, 3
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB free GPU memory, has {free / 2**30:.1f}")
    qkv = torch.randn(B, H, H, 3, heads, 32, device="cuda", dtype=torch.float16)
    assert qkv.numel() > 2**31
    table = 0.5 * torch.randn((2 * window - 1) ** 2, heads, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = FS.shifted_window_attention(qkv, table, (window, window), (shift, shift), backend="triton")
        for sl in (slice(0, 1), slice(B - 1, B)):
            want = ref.shifted_window_attention(qkv[sl].float(), table.float(), (window, window), (shift, shift))
            torch.testing.assert_close(out[sl].float(), want, rtol=2e-2, atol=2e-2)
