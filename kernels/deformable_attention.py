"""Triton kernels for DAT / DAT++ deformable attention (the attention core), forward and backward.

Shapes (B batch, h heads, g groups, h_g = h / g heads per group, c head channels, M = H*W
queries, Ns = Hk*Wk sampled keys)::

    q            (B*h, c, M)      any strides          row b*h + i is head i of batch b
    k, v         (B*h, c, Ns)     any strides          head i belongs to group i // h_g
    pos          (B*g, Hk, Wk, 2) (y, x) sample positions, normalized to [-1, 1]
    qgrid        (M, 2)           (y, x) query positions (``reference.dat.query_grid`` of the variant)
    rpe_table    (h, Th, Tw) | None
    attn_bias    (B*h, M, Ns) | None   additive dense bias (DAT++'s fixed_pe / log_cpb output)
    out          (B*h, c, M)      contiguous, q's dtype
    lse          (B*h, M)         float32 (float64 for float64 inputs)

Math (ACC = fp32, fp64 for fp64 inputs; the bias exactly as ``grid_sample(align_corners=True,
padding_mode="zeros")`` computes it, see :mod:`fastswin.kernels.bilinear_sample`)::

    (dy, dx)[m, n] = (qgrid[m] - pos[grp, n]) * 0.5
    bias[m, n]     = bilinear(rpe_table[head], (dy, dx))       iy = ((dy+1)/2)(Th-1), ix = ((dx+1)/2)(Tw-1)
    s[m, n]        = (q[:, m] . k[:, n]) * scale + bias[m, n] + attn_bias[m, n]
    p = softmax_n(s)     out[:, m] = sum_n p[m, n] v[:, n]     lse[m] = log sum_n exp(s[m, n])

The bias is interpolated inside the kernel from the (Th, Tw) table row of the program's head
(4 gathers per logit, L1/L2 resident: 27 x 27 x 4 B = 2.9 kB for a 14 x 14 map), so nothing
M x Ns is written in the forward: not the logits, not the (B*g, M, Ns, 2) displacement, not the
(B*h, M, Ns) bias that the reference materialises (and reads back twice).

Forward: one program per (b*h, BLOCK_M queries), walking the keys in BLOCK_N blocks with an
online softmax (running max / sum / accumulator in ACC).

Backward recomputes ``p = exp(s - lse)``::

    delta = <dout, out>   dp = dout^T v   ds = p (dp - delta)
    dq = scale ds k   dk = scale ds^T q   dv = p^T dout   d attn_bias = ds
    d rpe_table[head, tap] += ds[m, n] * weight_tap(m, n)
    d pos[grp, n, y] = -0.5 * (Th-1)/2 * sum_{heads of grp} sum_m ds[m, n] * d bias/d iy   (x likewise)
    d bias/d iy = (x1-ix)(t[y1,x0]-t[y0,x0]) + (ix-x0)(t[y1,x1]-t[y0,x1])
    d bias/d ix = (y1-iy)(t[y0,x1]-t[y0,x0]) + (iy-y0)(t[y1,x1]-t[y1,x0])

* ``_bwd_kv_kernel``: one program per (b*h, BLOCK_N keys) looping over the query blocks: dk, dv,
  the per-key d pos partial (summed over queries in the program; stored per (b*h, key), summed
  over the heads of a group by torch: no atomics, deterministic), the table gradient, and dq
  when one key block covers all keys (Ns <= BLOCK_N: S is recomputed once).
* ``_bwd_q_kernel``: only when Ns > BLOCK_N: dq per query block, looping over the key blocks.

Table gradient, two modes:

* default: ``tl.atomic_add`` of ``ds * weight`` into a private fp32 (fp64) row
  ``part[b % R, head]`` of an (R, h, Th*Tw) buffer (R = B up to a 16M-element cap), then one
  ``part.sum(0)``. Atomics collide only between the key-block programs of one (batch, head).
* deterministic (``torch.are_deterministic_algorithms_enabled()``): no atomics. The kv kernel
  stores ds (B*h, M, Ns) with plain stores (the same buffer is the attn_bias gradient), and the
  launcher scatters it into the table with the deterministic backward of
  :mod:`fastswin.kernels.bilinear_sample` (index_add_). Costs an M x Ns buffer per (batch, head)
  plus 4x that in contributions -- the price of bitwise reproducibility here.

dtypes: float16, bfloat16, float32, float64 (float64 only under the interpreter). Dots take the
input dtype with an ACC accumulator; fp32 dots are IEEE unless torch allows tf32 for matmuls.
pos, qgrid and rpe_table are read in ACC whatever their dtype (autocast mixes them).
``TRITON_INTERPRET=1`` must be set before this module is imported to run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .bilinear_sample import bilinear_sample_bwd, taps
from ._common import acc_dtype, dot_precision, num_stages

MAX_BLOCK = 64
_SCRATCH_ELEMS = 1 << 24
POISON = False
_TL_ACC = {torch.float64: tl.float64}


def _alloc(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rpe(TAB_h, qy, qx, py, px, valid, TH, TW):
    """Bias tile (BLOCK_M, BLOCK_N) from the (TH, TW) table row TAB_h (ACC, contiguous) at
    (qgrid - pos) * 0.5, plus what the backward needs: (bias, d bias/d ix, d bias/d iy, flat
    north-west tap index, nw, ne, sw, se, and the four tap masks)."""
    dy = (qy[:, None] - py[None, :]) * 0.5
    dx = (qx[:, None] - px[None, :]) * 0.5
    iy, ix, y0, x0, nw, ne, sw, se, in_y0, in_y1, in_x0, in_x1, has, fin_y, fin_x = taps(dy, dx, TH, TW)
    m00 = valid & in_y0 & in_x0
    m01 = valid & in_y0 & in_x1
    m10 = valid & in_y1 & in_x0
    m11 = valid & in_y1 & in_x1
    t00 = y0 * TW + x0
    v00 = tl.load(TAB_h + t00, mask=m00, other=0.0)
    v01 = tl.load(TAB_h + t00 + 1, mask=m01, other=0.0)
    v10 = tl.load(TAB_h + t00 + TW, mask=m10, other=0.0)
    v11 = tl.load(TAB_h + t00 + TW + 1, mask=m11, other=0.0)
    bias = v00 * nw
    bias += v01 * ne
    bias += v10 * sw
    bias += v11 * se
    # no tap on the table: 0 (NaN for a non-finite displacement, as CPU grid_sample)
    bias = tl.where(has, bias, tl.where(fin_x & fin_y, 0.0, float("nan")))
    wy1 = iy - y0.to(iy.dtype)
    wy0 = 1.0 - wy1
    wx1 = ix - x0.to(ix.dtype)
    wx0 = 1.0 - wx1
    gix = wy0 * (v01 - v00) + wy1 * (v11 - v10)
    giy = wx0 * (v10 - v00) + wx1 * (v11 - v01)
    return bias, gix, giy, t00, nw, ne, sw, se, m00, m01, m10, m11


@triton.jit
def _logits(q, k, scale, TAB_h, qy, qx, py, px, BIAS_b, stride_am, stride_an, offs_m, offs_n, valid_m, valid_n,
            TH, TW, HAS_RPE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """s (BLOCK_M, BLOCK_N) in ACC, -inf at keys past Ns; and the _rpe extras (zeros without RPE)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC, out_dtype=ACC) * scale
    valid = valid_m[:, None] & valid_n[None, :]
    if HAS_RPE:
        bias, gix, giy, t00, nw, ne, sw, se, m00, m01, m10, m11 = _rpe(TAB_h, qy, qx, py, px, valid, TH, TW)
        s += bias
    else:
        z = tl.zeros_like(s)
        zi = offs_m[:, None] * 0 + offs_n[None, :] * 0
        gix, giy, t00, nw, ne, sw, se = z, z, zi, z, z, z, z
        m00, m01, m10, m11 = valid, valid, valid, valid
    if HAS_BIAS:
        s += tl.load(BIAS_b + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :] * stride_an,
                     mask=valid, other=0.0).to(ACC)
    s = tl.where(valid_n[None, :], s, float("-inf"))
    return s, valid, gix, giy, t00, nw, ne, sw, se, m00, m01, m10, m11


@triton.jit
def _load_cm(X, offs_r, valid_r, offs_d, valid_d, stride_r, stride_d):
    """(rows, BLOCK_D) tile of a (c, rows) slice: X[d, r] -> tile[r, d]."""
    return tl.load(X + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d,
                   mask=valid_r[:, None] & valid_d[None, :], other=0.0)


@triton.jit
def _store_cm(X, val, offs_r, valid_r, offs_d, valid_d, stride_r, stride_d):
    tl.store(X + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d,
             val.to(X.dtype.element_ty), mask=valid_r[:, None] & valid_d[None, :])


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_block_logits(
    K, V, P_b, BIAS_b, TAB_h, q, scale, qy, qx, bh, start_n, offs_d, valid_d, offs_m, valid_m,
    stride_kb, stride_kc, stride_kn, stride_vb, stride_vc, stride_vn, stride_pn, stride_pt,
    stride_am, stride_an, NS, TH, TW,
    BLOCK_N: tl.constexpr, HAS_RPE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One key block of a query block's loop (forward and dq kernels): load k, v and the sample
    positions of keys ``start_n + arange(BLOCK_N)``, and return ``(k, v, s, valid)`` with ``s``
    the (BLOCK_M, BLOCK_N) logits incl. the in-kernel sampled bias."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid_n = offs_n < NS
    k = _load_cm(K + bh * stride_kb, offs_n, valid_n, offs_d, valid_d, stride_kn, stride_kc)
    v = _load_cm(V + bh * stride_vb, offs_n, valid_n, offs_d, valid_d, stride_vn, stride_vc)
    py = tl.load(P_b + offs_n * stride_pn, mask=valid_n, other=0.0).to(ACC)
    px = tl.load(P_b + offs_n * stride_pn + stride_pt, mask=valid_n, other=0.0).to(ACC)
    s, valid, _, _, _, _, _, _, _, _, _, _, _ = _logits(
        q, k, scale, TAB_h, qy, qx, py, px, BIAS_b, stride_am, stride_an, offs_m, offs_n, valid_m, valid_n,
        TH, TW, HAS_RPE, HAS_BIAS, ACC, DOT_PREC)
    return k, v, s, valid


@triton.jit
def _fwd_kernel(
    Q, K, V, POS, QG, TAB, BIAS, SC, O, LSE,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_pb, stride_pn, stride_pt,
    stride_ab, stride_am, stride_an,
    n_heads, n_groups, M, NS, TH, TW,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    head = bh % n_heads
    bg = (bh // n_heads) * n_groups + head // (n_heads // n_groups)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    q = _load_cm(Q + bh * stride_qb, offs_m, valid_m, offs_d, valid_d, stride_qm, stride_qc)
    scale = tl.load(SC).to(ACC)
    qy = tl.load(QG + offs_m * 2, mask=valid_m, other=0.0).to(ACC)
    qx = tl.load(QG + offs_m * 2 + 1, mask=valid_m, other=0.0).to(ACC)
    TAB_h = TAB + head * TH * TW
    P_b = POS + bg * stride_pb
    BIAS_b = BIAS + bh * stride_ab

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, NS, BLOCK_N):
        k, v, s, valid = _key_block_logits(
            K, V, P_b, BIAS_b, TAB_h, q, scale, qy, qx, bh, start_n, offs_d, valid_d, offs_m, valid_m,
            stride_kb, stride_kc, stride_kn, stride_vb, stride_vc, stride_vn, stride_pn, stride_pt,
            stride_am, stride_an, NS, TH, TW, BLOCK_N, HAS_RPE, HAS_BIAS, ACC, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC, out_dtype=ACC)
        m_i = m_new
    out = acc / l_i[:, None]
    _store_cm(O + bh * HEAD_DIM * M, out, offs_m, valid_m, offs_d, valid_d, 1, M)
    tl.store(LSE + bh * M + offs_m, m_i + tl.log(l_i), mask=valid_m)


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, POS, QG, TAB, BIAS, SC, O, DO, LSE, DQ, DK, DV, DPOS, DTAB, DS,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_pb, stride_pn, stride_pt,
    stride_ab, stride_am, stride_an,
    stride_dob, stride_doc, stride_dom,
    n_heads, n_groups, M, NS, TH, TW, dtab_rows,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr, NEED_DPOS: tl.constexpr, DTAB_ATOMIC: tl.constexpr, STORE_DS: tl.constexpr,
):
    """dk, dv for one key block (+ dq when FUSE_DQ). NEED_DPOS: DPOS[bh, n, (y, x)] = this head's
    d pos partial. DTAB_ATOMIC: atomic adds into row ((bh // h) % dtab_rows, head) of DTAB.
    STORE_DS: ds into DS (B*h, M, Ns) contiguous ACC (plain stores, each element once)."""
    bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    head = bh % n_heads
    bg = (bh // n_heads) * n_groups + head // (n_heads // n_groups)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < NS
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    k = _load_cm(K + bh * stride_kb, offs_n, valid_n, offs_d, valid_d, stride_kn, stride_kc)
    v = _load_cm(V + bh * stride_vb, offs_n, valid_n, offs_d, valid_d, stride_vn, stride_vc)
    P_b = POS + bg * stride_pb
    py = tl.load(P_b + offs_n * stride_pn, mask=valid_n, other=0.0).to(ACC)
    px = tl.load(P_b + offs_n * stride_pn + stride_pt, mask=valid_n, other=0.0).to(ACC)
    scale = tl.load(SC).to(ACC)
    TAB_h = TAB + head * TH * TW
    BIAS_b = BIAS + bh * stride_ab
    if DTAB_ATOMIC:
        DTAB_row = DTAB + (((bh // n_heads) % dtab_rows) * n_heads + head) * TH * TW

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    gpx = tl.zeros([BLOCK_N], dtype=ACC)
    gpy = tl.zeros([BLOCK_N], dtype=ACC)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid_m = offs_m < M
        q = _load_cm(Q + bh * stride_qb, offs_m, valid_m, offs_d, valid_d, stride_qm, stride_qc)
        do = _load_cm(DO + bh * stride_dob, offs_m, valid_m, offs_d, valid_d, stride_dom, stride_doc)
        o = _load_cm(O + bh * HEAD_DIM * M, offs_m, valid_m, offs_d, valid_d, 1, M)
        delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
        lse = tl.load(LSE + bh * M + offs_m, mask=valid_m, other=0.0)
        qy = tl.load(QG + offs_m * 2, mask=valid_m, other=0.0).to(ACC)
        qx = tl.load(QG + offs_m * 2 + 1, mask=valid_m, other=0.0).to(ACC)
        s, valid, gix, giy, t00, nw, ne, sw, se, m00, m01, m10, m11 = _logits(
            q, k, scale, TAB_h, qy, qx, py, px, BIAS_b, stride_am, stride_an, offs_m, offs_n, valid_m, valid_n,
            TH, TW, HAS_RPE, HAS_BIAS, ACC, DOT_PREC)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC, out_dtype=ACC)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        ds_lo = ds.to(q.dtype)
        dk += tl.dot(tl.trans(ds_lo), q, input_precision=DOT_PREC, out_dtype=ACC)
        if FUSE_DQ:
            dq = tl.dot(ds_lo, k, input_precision=DOT_PREC, out_dtype=ACC) * scale
            _store_cm(DQ + bh * HEAD_DIM * M, dq, offs_m, valid_m, offs_d, valid_d, 1, M)
        if NEED_DPOS:
            gpx += tl.sum(ds * gix, axis=0)
            gpy += tl.sum(ds * giy, axis=0)
        if DTAB_ATOMIC:
            tl.atomic_add(DTAB_row + t00, ds * nw, mask=m00)
            tl.atomic_add(DTAB_row + t00 + 1, ds * ne, mask=m01)
            tl.atomic_add(DTAB_row + t00 + TW, ds * sw, mask=m10)
            tl.atomic_add(DTAB_row + t00 + TW + 1, ds * se, mask=m11)
        if STORE_DS:
            tl.store(DS + (bh * M + offs_m[:, None]) * NS + offs_n[None, :], ds, mask=valid)
    _store_cm(DK + bh * HEAD_DIM * NS, dk * scale, offs_n, valid_n, offs_d, valid_d, 1, NS)
    _store_cm(DV + bh * HEAD_DIM * NS, dv, offs_n, valid_n, offs_d, valid_d, 1, NS)
    if NEED_DPOS:
        # d iy/d dy = (Th-1)/2, d dy/d pos_y = -0.5
        gy = gpy * ((TH - 1) / 2.0) * -0.5
        gx = gpx * ((TW - 1) / 2.0) * -0.5
        tl.store(DPOS + (bh * NS + offs_n) * 2, gy, mask=valid_n)
        tl.store(DPOS + (bh * NS + offs_n) * 2 + 1, gx, mask=valid_n)


@triton.jit
def _bwd_q_kernel(
    Q, K, V, POS, QG, TAB, BIAS, SC, O, DO, LSE, DQ,
    stride_qb, stride_qc, stride_qm,
    stride_kb, stride_kc, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_pb, stride_pn, stride_pt,
    stride_ab, stride_am, stride_an,
    stride_dob, stride_doc, stride_dom,
    n_heads, n_groups, M, NS, TH, TW,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq for one query block, looping over the key blocks (only when Ns > BLOCK_N)."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    head = bh % n_heads
    bg = (bh // n_heads) * n_groups + head // (n_heads // n_groups)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    q = _load_cm(Q + bh * stride_qb, offs_m, valid_m, offs_d, valid_d, stride_qm, stride_qc)
    do = _load_cm(DO + bh * stride_dob, offs_m, valid_m, offs_d, valid_d, stride_dom, stride_doc)
    o = _load_cm(O + bh * HEAD_DIM * M, offs_m, valid_m, offs_d, valid_d, 1, M)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    lse = tl.load(LSE + bh * M + offs_m, mask=valid_m, other=0.0)
    qy = tl.load(QG + offs_m * 2, mask=valid_m, other=0.0).to(ACC)
    qx = tl.load(QG + offs_m * 2 + 1, mask=valid_m, other=0.0).to(ACC)
    scale = tl.load(SC).to(ACC)
    TAB_h = TAB + head * TH * TW
    P_b = POS + bg * stride_pb
    BIAS_b = BIAS + bh * stride_ab
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, NS, BLOCK_N):
        k, v, s, valid = _key_block_logits(
            K, V, P_b, BIAS_b, TAB_h, q, scale, qy, qx, bh, start_n, offs_d, valid_d, offs_m, valid_m,
            stride_kb, stride_kc, stride_kn, stride_vb, stride_vc, stride_vn, stride_pn, stride_pt,
            stride_am, stride_an, NS, TH, TW, BLOCK_N, HAS_RPE, HAS_BIAS, ACC, DOT_PREC)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC, out_dtype=ACC)
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC, out_dtype=ACC)
    _store_cm(DQ + bh * HEAD_DIM * M, dq * scale, offs_m, valid_m, offs_d, valid_d, 1, M)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _blocks(m: int, ns: int, c: int):
    bm = max(16, min(MAX_BLOCK, triton.next_power_of_2(m)))
    bn = max(16, min(MAX_BLOCK, triton.next_power_of_2(ns)))
    bd = max(16, triton.next_power_of_2(c))
    num_warps = 4 if max(bm, bn) * max(bm, bn, bd) <= 64 * 64 else 8
    return bm, bn, bd, num_warps


class _Args:
    """Pointers, strides and scalars shared by the three kernels."""

    def __init__(self, q, k, v, pos, qgrid, rpe_table, attn_bias, n_heads, n_groups, scale):
        self.acc = acc_dtype(q.dtype)
        bh, c, m = q.shape
        ns = k.shape[2]
        self.bh, self.c, self.m, self.ns = bh, c, m, ns
        self.p = pos.reshape(pos.shape[0], ns, 2)
        self.qg = qgrid.detach().reshape(m, 2).to(self.acc).contiguous()
        if rpe_table is not None:
            self.tab = rpe_table.detach().to(self.acc).contiguous()
            self.th, self.tw = rpe_table.shape[1], rpe_table.shape[2]
        else:
            self.tab, self.th, self.tw = self.qg, 1, 1
        self.bias = attn_bias if attn_bias is not None else self.qg
        self.bias_s = attn_bias.stride() if attn_bias is not None else (0, 0, 0)
        # scale read from memory: a Python float argument would be rounded to fp32 by Triton
        self.sc = torch.full((1,), float(scale), dtype=self.acc, device=q.device)
        self.n_heads, self.n_groups = n_heads, n_groups
        self.blocks = _blocks(m, ns, c)
        bm, bn, bd, nw = self.blocks
        self.meta = dict(HEAD_DIM=c, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_RPE=rpe_table is not None,
                         HAS_BIAS=attn_bias is not None, ACC=_TL_ACC.get(self.acc, tl.float32),
                         DOT_PREC=dot_precision(q.dtype), num_warps=nw)
        self.strides = (*q.stride(), *k.stride(), *v.stride(), *self.p.stride(), *self.bias_s)
        self.scalars = (n_heads, n_groups, m, ns, self.th, self.tw)


def deformable_attention_fwd(q, k, v, pos, qgrid, rpe_table=None, attn_bias=None, *, n_heads: int, n_groups: int,
                             scale: float):
    """Returns ``(out (B*h, c, M) contiguous in q's dtype, lse (B*h, M) in ACC)``. No validation
    here (the op layer validates); shapes as in the module docstring."""
    a = _Args(q, k, v, pos, qgrid, rpe_table, attn_bias, n_heads, n_groups, scale)
    out = _alloc((a.bh, a.c, a.m), q.dtype, q.device)
    lse = _alloc((a.bh, a.m), a.acc, q.device)
    if a.bh == 0 or a.m == 0:
        return out, lse
    if a.ns == 0 or a.c == 0:  # softmax over no key: NaN, as the reference; no channel: empty
        out.fill_(float("nan") if a.ns == 0 else 0.0)
        lse.fill_(float("-inf"))
        return out, lse
    bm, bn = a.blocks[0], a.blocks[1]
    with _device_ctx(q):
        _fwd_kernel[(a.bh, triton.cdiv(a.m, bm))](
            q, k, v, a.p, a.qg, a.tab, a.bias, a.sc, out, lse, *a.strides, *a.scalars, **a.meta,
            num_stages=num_stages(triton.cdiv(a.ns, bn)))  # loops over key blocks
    return out, lse


def deformable_attention_bwd(dout, q, k, v, pos, qgrid, rpe_table, attn_bias, out, lse, *, n_heads: int,
                             n_groups: int, scale: float, need_dpos: bool = True, need_dtable: bool = True,
                             need_dbias: bool = True, deterministic: Optional[bool] = None):
    """Returns ``(dq, dk, dv, dpos, dtable, dbias)``: dq (B*h, c, M), dk/dv (B*h, c, Ns) contiguous
    in q's dtype; dpos (B*g, Hk, Wk, 2) in pos's dtype, dtable (h, Th, Tw) in rpe_table's dtype,
    dbias (B*h, M, Ns) in attn_bias's dtype, each None when not needed (or without rpe_table /
    attn_bias). ``dout`` may have any strides. ``deterministic`` defaults to
    ``torch.are_deterministic_algorithms_enabled()``."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    has_rpe = rpe_table is not None
    need_dpos = need_dpos and has_rpe
    need_dtable = need_dtable and has_rpe
    need_dbias = need_dbias and attn_bias is not None
    a = _Args(q, k, v, pos, qgrid, rpe_table, attn_bias, n_heads, n_groups, scale)
    bh, c, m, ns, acc = a.bh, a.c, a.m, a.ns, a.acc
    dq = _alloc((bh, c, m), q.dtype, q.device)
    dk = _alloc((bh, c, ns), q.dtype, q.device)
    dv = _alloc((bh, c, ns), q.dtype, q.device)
    batch = bh // n_heads if n_heads else 0
    if bh == 0 or m == 0 or ns == 0 or c == 0:
        for t in (dq, dk, dv):
            t.zero_()
        z = lambda like: torch.zeros_like(like) if like is not None else None  # noqa: E731
        return (dq, dk, dv, z(pos) if need_dpos else None, z(rpe_table) if need_dtable else None,
                z(attn_bias) if need_dbias else None)
    bm, bn, bd, nw = a.blocks
    nblk_n = triton.cdiv(ns, bn)
    fuse_dq = nblk_n == 1
    store_ds = need_dbias or (need_dtable and deterministic)
    dtab_atomic = need_dtable and not deterministic
    ds_buf = _alloc((bh, m, ns), acc, q.device) if store_ds else a.sc
    dpos_part = _alloc((bh, ns, 2), acc, q.device) if need_dpos else a.sc
    rows = 1
    if dtab_atomic:
        rows = max(1, min(batch, _SCRATCH_ELEMS // max(1, n_heads * a.th * a.tw)))
        dtab_part = torch.zeros((rows, n_heads, a.th * a.tw), dtype=acc, device=q.device)
    else:
        dtab_part = a.sc
    dos = dout.stride()
    with _device_ctx(q):
        _bwd_kv_kernel[(bh, nblk_n)](
            q, k, v, a.p, a.qg, a.tab, a.bias, a.sc, out, dout, lse, dq, dk, dv, dpos_part, dtab_part, ds_buf,
            *a.strides, *dos, *a.scalars, rows,
            FUSE_DQ=fuse_dq, NEED_DPOS=need_dpos, DTAB_ATOMIC=dtab_atomic, STORE_DS=store_ds, **a.meta,
            num_stages=num_stages(triton.cdiv(m, bm)))  # loops over query blocks
        if not fuse_dq:
            _bwd_q_kernel[(bh, triton.cdiv(m, bm))](
                q, k, v, a.p, a.qg, a.tab, a.bias, a.sc, out, dout, lse, dq, *a.strides, *dos, *a.scalars,
                **a.meta, num_stages=num_stages(nblk_n))  # loops over key blocks
    dpos = dtab = dbias = None
    if need_dpos:
        hg = n_heads // n_groups
        dpos = dpos_part.view(batch, n_groups, hg, ns, 2).sum(2).view(pos.shape).to(pos.dtype)
    if dtab_atomic:
        dtab = dtab_part.sum(0).view(rpe_table.shape).to(rpe_table.dtype)
    elif need_dtable:
        # Deterministic: the ds buffer scattered into the table by the atomic-free bilinear
        # backward, at the same displacements the kernel used (same ops, same dtype).
        hg = n_heads // n_groups
        bg = batch * n_groups
        p = a.p.to(acc)
        disp = (a.qg.view(1, m, 1, 2) - p.view(bg, 1, ns, 2)).mul(0.5)  # (B*g, M, Ns, 2)
        table = a.tab.view(1, n_heads, a.th, a.tw).expand(batch, -1, -1, -1).reshape(bg, hg, a.th, a.tw)
        gtab, _ = bilinear_sample_bwd(ds_buf.view(bg, hg, m, ns), table, disp, True, False, True)
        dtab = gtab.view(batch, n_heads, a.th, a.tw).sum(0).to(rpe_table.dtype)
    if need_dbias:
        dbias = ds_buf.to(attn_bias.dtype)
    return dq, dk, dv, dpos, dtab, dbias
