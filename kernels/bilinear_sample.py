"""Triton kernels for DAT's bilinear sampling, forward and backward.

Shapes: ``feat`` (N, C, H, W) any strides, ``pos`` (N, Hk, Wk, 2) in DAT's (y, x) order,
normalized to [-1, 1] with ``align_corners=True``, zero padding; ``out`` (N, C, Hk, Wk)::

    out = F.grid_sample(feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True)

Per sample (K = Hk * Wk samples per batch row), in the accumulation dtype ACC (fp32; fp64 for
fp64 inputs), written as ``csrc/bilinear_sample/bilinear_sample.h`` (and ATen) writes it::

    ix = ((x + 1) / 2) * (W - 1)             iy = ((y + 1) / 2) * (H - 1)
    x0 = floor(ix), y0 = floor(iy), x1 = x0 + 1, y1 = y0 + 1
    nw = (x1 - ix) (y1 - iy)   ne = (ix - x0) (y1 - iy)   sw = (x1 - ix) (iy - y0)   se = (ix - x0) (iy - y0)
    out = nw f[y0,x0] + ne f[y0,x1] + sw f[y1,x0] + se f[y1,x1]            (taps off the map read 0)
    d out/d ix = (y1-iy)(f[y0,x1]-f[y0,x0]) + (iy-y0)(f[y1,x1]-f[y1,x0])
    d out/d iy = (x1-ix)(f[y1,x0]-f[y0,x0]) + (ix-x0)(f[y1,x1]-f[y0,x1])
    grad_pos = (sum_c g * d out/d iy * (H-1)/2,  sum_c g * d out/d ix * (W-1)/2)
    grad_feat[n, c, tap] += g[n, c, k] * weight(tap)

Non-finite positions follow the CPU float32/float64 ``grid_sample`` (the rule in the C++ header):
a sample with ix outside [-1, W) or iy outside [-1, H) (NaN/Inf included) has no tap; it reads 0
if ix and iy are finite, NaN otherwise; its grad_feat contribution is nothing; its grad_pos is 0
except d/dx = NaN if iy is not finite and d/dy = NaN if ix is not finite (when C >= 1). The range
test runs before the float -> int conversion, with the coordinate replaced by 0 where it fails,
so no NaN/Inf/huge value is ever converted to an integer.

Kernels:

* ``_fwd_kernel``: one program per (n, BLOCK_K samples); the taps are computed once per sample and
  reused for every channel (loop over BLOCK_C channel chunks, a (BLOCK_C, BLOCK_K) gather per tap).
* ``_bwd_kernel``: same grid. grad_pos: per sample, summed over the channel loop inside the program
  (no atomics, deterministic in both modes). grad_feat, two modes:

  - default (``FEAT_MODE=1``): ``tl.atomic_add`` of ``g * weight`` into a zeroed fp32 (fp64)
    (N, C, H, W) buffer, then one cast. Fast; the order of the adds (hence the last bits) varies.
  - deterministic (``FEAT_MODE=2``, ``torch.are_deterministic_algorithms_enabled()``): no atomics.
    The kernel stores every contribution ``g * weight`` (N, K, 4, C) and its flat tap index
    (N, K, 4) (off-map taps point at a dummy slot H*W) with plain stores; the launcher sums them
    with ``index_add_``, which torch makes deterministic in that mode (and is on CPU). Costs 4x the
    output in scratch memory and one extra write + read of it.

dtypes: float16, bfloat16, float32, float64 (all math in ACC; outputs in the input dtypes).
``TRITON_INTERPRET=1`` must be set before this module is imported to run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from ._common import acc_dtype

# Tests set this to fill every buffer a kernel must write with NaN first.
POISON = False
MAX_BLOCK_K = 128
MAX_BLOCK_C = 32


def _alloc(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


_TL_ACC = {torch.float64: tl.float64}


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


@triton.jit
def taps(y, x, H, W):
    """Bilinear taps of (y, x) positions (any shape, in ACC) on an H x W map, align_corners=True.

    Returns (iy, ix, y0, x0 (int32), nw, ne, sw, se, in_y0, in_y1, in_x0, in_x1, has, finite_y,
    finite_x). ``has``: some tap lies on the map; where it is False the weights are meaningless but
    finite, and every ``in_*`` is False.
    """
    ix = ((x + 1.0) / 2.0) * (W - 1)
    iy = ((y + 1.0) / 2.0) * (H - 1)
    finite_x = tl.abs(ix) < float("inf")  # False for NaN too
    finite_y = tl.abs(iy) < float("inf")
    # floor(ix) in [-1, W-1] <=> -1 <= ix < W; written so that NaN fails.
    has = (ix >= -1.0) & (ix < W) & (iy >= -1.0) & (iy < H)
    ixs = tl.where(has, ix, 0.0)
    iys = tl.where(has, iy, 0.0)
    fx0 = tl.floor(ixs)
    fy0 = tl.floor(iys)
    x0 = fx0.to(tl.int32)
    y0 = fy0.to(tl.int32)
    fx1 = fx0 + 1.0
    fy1 = fy0 + 1.0
    nw = (fx1 - ixs) * (fy1 - iys)
    ne = (ixs - fx0) * (fy1 - iys)
    sw = (fx1 - ixs) * (iys - fy0)
    se = (ixs - fx0) * (iys - fy0)
    in_x0 = has & (x0 >= 0)
    in_x1 = has & (x0 + 1 < W)
    in_y0 = has & (y0 >= 0)
    in_y1 = has & (y0 + 1 < H)
    return iys, ixs, y0, x0, nw, ne, sw, se, in_y0, in_y1, in_x0, in_x1, has, finite_y, finite_x


@triton.jit
def _fwd_kernel(
    FEAT, POS, OUT,
    stride_fn, stride_fc, stride_fh, stride_fw,
    stride_pn, stride_pk, stride_pt,
    C, H, W, K,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid_k = offs_k < K
    p = POS + n * stride_pn + offs_k * stride_pk
    y = tl.load(p, mask=valid_k, other=0.0).to(ACC)
    x = tl.load(p + stride_pt, mask=valid_k, other=0.0).to(ACC)
    iy, ix, y0, x0, nw, ne, sw, se, in_y0, in_y1, in_x0, in_x1, has, fin_y, fin_x = taps(y, x, H, W)
    outside = tl.where(fin_x & fin_y, 0.0, float("nan")).to(ACC)
    o00 = y0 * stride_fh + x0 * stride_fw
    o01 = o00 + stride_fw
    o10 = o00 + stride_fh
    o11 = o10 + stride_fw
    F_n = FEAT + n * stride_fn
    O_n = OUT + n * C * K
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        valid_c = (offs_c < C)[:, None]
        F_c = F_n + offs_c[:, None].to(tl.int64) * stride_fc
        v00 = tl.load(F_c + o00[None, :], mask=valid_c & (in_y0 & in_x0)[None, :], other=0.0).to(ACC)
        v01 = tl.load(F_c + o01[None, :], mask=valid_c & (in_y0 & in_x1)[None, :], other=0.0).to(ACC)
        v10 = tl.load(F_c + o10[None, :], mask=valid_c & (in_y1 & in_x0)[None, :], other=0.0).to(ACC)
        v11 = tl.load(F_c + o11[None, :], mask=valid_c & (in_y1 & in_x1)[None, :], other=0.0).to(ACC)
        # grid_sample's order: nw, ne, sw, se
        acc = v00 * nw[None, :]
        acc += v01 * ne[None, :]
        acc += v10 * sw[None, :]
        acc += v11 * se[None, :]
        acc = tl.where(has[None, :], acc, outside[None, :])
        tl.store(O_n + offs_c[:, None].to(tl.int64) * K + offs_k[None, :], acc.to(OUT.dtype.element_ty),
                 mask=valid_c & valid_k[None, :])


@triton.jit
def _bwd_kernel(
    GO, FEAT, POS, GFEAT, GIDX, GPOS,
    stride_gn, stride_gc, stride_gk,
    stride_fn, stride_fc, stride_fh, stride_fw,
    stride_pn, stride_pk, stride_pt,
    C, H, W, K,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
    NEED_POS: tl.constexpr, FEAT_MODE: tl.constexpr,
):
    """FEAT_MODE 0: no grad_feat; 1: atomic adds into GFEAT (N, C, H, W) contiguous ACC;
    2: plain stores of contributions into GFEAT (N, K, 4, C) and tap indices into GIDX (N, K, 4)."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid_k = offs_k < K
    p = POS + n * stride_pn + offs_k * stride_pk
    y = tl.load(p, mask=valid_k, other=0.0).to(ACC)
    x = tl.load(p + stride_pt, mask=valid_k, other=0.0).to(ACC)
    iy, ix, y0, x0, nw, ne, sw, se, in_y0, in_y1, in_x0, in_x1, has, fin_y, fin_x = taps(y, x, H, W)
    m00 = in_y0 & in_x0
    m01 = in_y0 & in_x1
    m10 = in_y1 & in_x0
    m11 = in_y1 & in_x1
    fy1 = y0.to(ACC) + 1.0
    fx1 = x0.to(ACC) + 1.0
    wy1 = iy - y0.to(ACC)  # (iy - y0)
    wy0 = fy1 - iy          # (y1 - iy)
    wx1 = ix - x0.to(ACC)
    wx0 = fx1 - ix
    o00 = y0 * stride_fh + x0 * stride_fw
    o01 = o00 + stride_fw
    o10 = o00 + stride_fh
    o11 = o10 + stride_fw
    t00 = y0 * W + x0  # flat tap index in a contiguous (H, W) plane
    F_n = FEAT + n * stride_fn
    G_n = GO + n * stride_gn
    gix = tl.zeros([BLOCK_K], dtype=ACC)
    giy = tl.zeros([BLOCK_K], dtype=ACC)
    if FEAT_MODE == 2:
        # off-map taps go to the dummy slot H*W, whose sum the launcher drops
        hw = H * W
        I_k = GIDX + (n * K + offs_k) * 4
        tl.store(I_k, tl.where(m00, t00, hw).to(tl.int64), mask=valid_k)
        tl.store(I_k + 1, tl.where(m01, t00 + 1, hw).to(tl.int64), mask=valid_k)
        tl.store(I_k + 2, tl.where(m10, t00 + W, hw).to(tl.int64), mask=valid_k)
        tl.store(I_k + 3, tl.where(m11, t00 + W + 1, hw).to(tl.int64), mask=valid_k)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        vc = (offs_c < C)[:, None]
        vck = vc & valid_k[None, :]
        g = tl.load(G_n + offs_c[:, None].to(tl.int64) * stride_gc + offs_k[None, :] * stride_gk,
                    mask=vck, other=0.0).to(ACC)
        if NEED_POS:
            F_c = F_n + offs_c[:, None].to(tl.int64) * stride_fc
            v00 = tl.load(F_c + o00[None, :], mask=vc & m00[None, :], other=0.0).to(ACC)
            v01 = tl.load(F_c + o01[None, :], mask=vc & m01[None, :], other=0.0).to(ACC)
            v10 = tl.load(F_c + o10[None, :], mask=vc & m10[None, :], other=0.0).to(ACC)
            v11 = tl.load(F_c + o11[None, :], mask=vc & m11[None, :], other=0.0).to(ACC)
            dix = wy0[None, :] * (v01 - v00) + wy1[None, :] * (v11 - v10)
            diy = wx0[None, :] * (v10 - v00) + wx1[None, :] * (v11 - v01)
            gix += tl.sum(tl.where(has[None, :], dix * g, 0.0), axis=0)
            giy += tl.sum(tl.where(has[None, :], diy * g, 0.0), axis=0)
        if FEAT_MODE == 1:
            GF_c = GFEAT + (n * C + offs_c[:, None].to(tl.int64)) * (H * W)
            tl.atomic_add(GF_c + t00[None, :], g * nw[None, :], mask=vck & m00[None, :])
            tl.atomic_add(GF_c + (t00 + 1)[None, :], g * ne[None, :], mask=vck & m01[None, :])
            tl.atomic_add(GF_c + (t00 + W)[None, :], g * sw[None, :], mask=vck & m10[None, :])
            tl.atomic_add(GF_c + (t00 + W + 1)[None, :], g * se[None, :], mask=vck & m11[None, :])
        if FEAT_MODE == 2:
            GF_k = GFEAT + ((n * K + offs_k[None, :]) * 4) * C + offs_c[:, None]
            tl.store(GF_k, g * nw[None, :], mask=vck)
            tl.store(GF_k + C, g * ne[None, :], mask=vck)
            tl.store(GF_k + 2 * C, g * sw[None, :], mask=vck)
            tl.store(GF_k + 3 * C, g * se[None, :], mask=vck)
    if NEED_POS:
        # no-tap samples: 0, or NaN in the other coordinate's gradient (C >= 1), as CPU grid_sample
        nan_x = (has == 0) & (fin_y == 0) & (C > 0)
        nan_y = (has == 0) & (fin_x == 0) & (C > 0)
        gix = tl.where(nan_x, float("nan"), gix)
        giy = tl.where(nan_y, float("nan"), giy)
        gx = gix * ((W - 1) / 2.0)
        gy = giy * ((H - 1) / 2.0)
        GP = GPOS + (n * K + offs_k) * 2
        tl.store(GP, gy.to(GPOS.dtype.element_ty), mask=valid_k)
        tl.store(GP + 1, gx.to(GPOS.dtype.element_ty), mask=valid_k)


def _blocks(c: int, k: int):
    return (max(2, min(MAX_BLOCK_C, triton.next_power_of_2(max(c, 1)))),
            max(16, min(MAX_BLOCK_K, triton.next_power_of_2(max(k, 1)))))


def _pos_view(pos: torch.Tensor) -> torch.Tensor:
    """(N, Hk, Wk, 2) -> (N, K, 2); a copy only if (Hk, Wk) cannot be merged."""
    return pos.reshape(pos.shape[0], pos.shape[1] * pos.shape[2], 2)


def bilinear_sample_fwd(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """feat (N, C, H, W), pos (N, Hk, Wk, 2) (y, x) -> out (N, C, Hk, Wk) contiguous, feat's dtype.
    No validation here (the op layer validates)."""
    n, c, h, w = feat.shape
    hk, wk = pos.shape[1], pos.shape[2]
    k = hk * wk
    out = _alloc((n, c, hk, wk), feat.dtype, feat.device)
    if n == 0 or c == 0 or k == 0:
        return out
    p = _pos_view(pos)
    acc = acc_dtype(feat.dtype if feat.dtype == pos.dtype else torch.float32)
    bc, bk = _blocks(c, k)
    with _device_ctx(feat):
        _fwd_kernel[(n, triton.cdiv(k, bk))](
            feat, p, out, *feat.stride(), *p.stride(), c, h, w, k,
            BLOCK_C=bc, BLOCK_K=bk, ACC=_TL_ACC.get(acc, tl.float32),
        )
    return out


def bilinear_sample_bwd(
    grad_out: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor, need_feat: bool = True, need_pos: bool = True,
    deterministic: Optional[bool] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns (grad_feat (N, C, H, W) contiguous in feat's dtype | None, grad_pos (N, Hk, Wk, 2)
    contiguous in pos's dtype | None). ``grad_out`` (N, C, Hk, Wk) may have any strides.
    ``deterministic`` defaults to ``torch.are_deterministic_algorithms_enabled()``."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    n, c, h, w = feat.shape
    hk, wk = pos.shape[1], pos.shape[2]
    k = hk * wk
    acc = acc_dtype(feat.dtype if feat.dtype == pos.dtype else torch.float32)
    gpos = _alloc((n, hk, wk, 2), pos.dtype, pos.device) if need_pos else None
    if n == 0 or k == 0 or (c == 0 and not need_pos):
        gf = torch.zeros(feat.shape, dtype=feat.dtype, device=feat.device) if need_feat else None
        return gf, (gpos.zero_() if need_pos else None)
    if c == 0:
        gpos.zero_()  # an empty sum over channels (ATen gives 0 too)
        return (torch.zeros(feat.shape, dtype=feat.dtype, device=feat.device) if need_feat else None), gpos
    p = _pos_view(pos)
    g = grad_out.reshape(n, c, k)
    mode = 0 if not need_feat else (2 if deterministic else 1)
    if mode == 1:
        gbuf = torch.zeros((n, c, h, w), dtype=acc, device=feat.device)
        gidx = gbuf
    elif mode == 2:
        gbuf = _alloc((n, k, 4, c), acc, feat.device)
        gidx = torch.empty((n, k, 4), dtype=torch.int64, device=feat.device)
    else:
        gbuf = gidx = feat
    bc, bk = _blocks(c, k)
    with _device_ctx(feat):
        _bwd_kernel[(n, triton.cdiv(k, bk))](
            g, feat, p, gbuf, gidx, gpos if need_pos else feat,
            *g.stride(), *feat.stride(), *p.stride(), c, h, w, k,
            BLOCK_C=bc, BLOCK_K=bk, ACC=_TL_ACC.get(acc, tl.float32), NEED_POS=need_pos, FEAT_MODE=mode,
        )
    gfeat = None
    if mode == 1:
        gfeat = gbuf.to(feat.dtype)
    elif mode == 2:
        hw = h * w
        flat = torch.zeros((n * (hw + 1), c), dtype=acc, device=feat.device)
        idx = (gidx + (torch.arange(n, device=feat.device) * (hw + 1)).view(n, 1, 1)).reshape(-1)
        # index_add_ is deterministic under torch.use_deterministic_algorithms(True) (and on CPU)
        flat.index_add_(0, idx, gbuf.reshape(n * k * 4, c))
        gfeat = flat.view(n, hw + 1, c)[:, :hw].permute(0, 2, 1).reshape(n, c, h, w).to(feat.dtype).contiguous()
    return gfeat, gpos
