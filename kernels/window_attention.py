"""Triton kernels for Swin V1 / V2 window attention, forward and backward, two entries each.

Windowed entry (q, k, v already partitioned; ``BW = B * nW`` windows, ``H`` heads,
``N = Mh * Mw`` tokens per window, ``D`` head dim)::

    q, k, v        (BW, H, N, D)      any strides (e.g. the timm ``qkv.permute(2, 0, 3, 1, 4)`` slices)
    mask           (nW, N, N) | None  additive; window of batch-window b is ``b % nW`` (timm's
                                      ``attn.view(-1, nW, H, N, N) + mask[None, :, None]``)
    out            (BW, H, N, D)      contiguous, q's dtype

Block-level entry (timm ``SwinTransformerBlock._attn`` between the qkv linear and proj)::

    qkv            (B, Hi, Wi, 3, H, D)   straight from the linear, any strides
    pad_qkv        (3, H, D) | None       a padded token's q, k, v (the linear's bias; None = zeros)
    out            (B, Hi, Wi, H * D)     contiguous, written un-shifted

  The kernel applies timm's roll / pad / partition in its addressing: window b = (batch, wr, wc)
  of the padded grid (Hp, Wp) = multiples of the window; its token (ih, iw) sits at padded-grid
  (r, c) = (wr Mh + ih, wc Mw + iw); if r < Hi and c < Wi it reads/writes source pixel
  ((r + sh) mod Hi, (c + sw) mod Wi) (``torch.roll(x, (-sh, -sw))`` then pad bottom/right),
  otherwise it is a padding token whose q, k, v are ``pad_qkv`` and whose output is dropped.
  With a shift, the -100 mask comes from region ids on the padded size, as timm's
  ``get_attn_mask``: rows [0, Hp-Mh), [Hp-Mh, Hp-sh), [Hp-sh, Hp) (one region when sh = 0),
  same for columns, id = 3 row_region + col_region; ``-100`` where the ids differ.

Common to both (``rel_pos_table`` (T, H), T = (2Mh-1)(2Mw-1), as timm stores it)::

    idx(i, j) = (ih - jh + Mh - 1) * (2Mw - 1) + (iw - jw + Mw - 1)       (timm's relative index)
    V1:  s[i, j] = scale * <q_i, k_j>                   + table[idx(i, j), h] + mask[i, j]
    V2:  s[i, j] = ls[h] * <q_i/|q_i|, k_j/|k_j|>       + table[idx(i, j), h] + mask[i, j]
    p = softmax_j(s)         out_i = sum_j p[i, j] v_j         lse_i = log sum_j exp(s[i, j])

For V2 the caller passes ``ls = exp(min(logit_scale, log 100))`` (H,) and the table already as
``16 * sigmoid(cpb_mlp output)``; the kernel normalises q and k in fp32 (``x / max(|x|, 1e-12)``,
``F.normalize``). The relative index and the shift mask are computed from token coordinates in
the kernel: no (N, N) index tensor, no (H, N, N) bias, no mask tensor, no (BW, H, N, N) logits.

Forward (flash style): one program per (window-head, block of BLOCK_M queries) walking the keys
in BLOCK_N blocks with an online softmax (fp32 running max / sum / accumulator), so N = 576
(24 x 24 windows) runs with the same 64 x 64 tiles as N = 49. It stores out and lse (float32;
float64 for float64 inputs). Why it pays: for a 7 x 7 window, d = 32, fp16, one window-head reads
q, k, v and writes out = 4 * 49 * 32 * 2 B = 12.5 kB (+ 196 B of lse); every (N, N) matrix the
unfused path materialises (logits, biased logits, softmax, and the expanded bias and mask) costs
another 49 * 49 * 2 B = 4.8 kB written and read again, and the block entry also saves the roll,
partition, pad and reverse copies (each a full read + write of the activations).

Backward recomputes ``p = exp(s - lse)`` (nothing N x N is kept)::

    delta_i = <dout_i, out_i>    dp = dout v^T    ds = p * (dp - delta)
    dq^ = c ds k^    dk^ = c ds^T q^    dv = p^T dout       (c = scale or ls[h]; ^ = as dotted)
    V2: dx = (dx^ - x^ <x^, dx^>) / |x| (|x| > 1e-12, else dx^ / 1e-12);  dls[h] = sum ds * <q^, k^>
    dtable[t, h] = sum over windows and (i, j) with idx(i, j) = t of ds[b, h, i, j]
    dpad_qkv[1|2] = sum of dk | dv over padding tokens (dpad_qkv[0] = 0: padded queries' outputs
                    are dropped, so their dout, hence ds, is 0)

* ``_bwd_kv_kernel``: one program per (window-head, BLOCK_N keys), looping over the query blocks:
  dk, dv, the table gradient, the padding and logit-scale partial sums. When one key block
  covers the window (N <= BLOCK_N: every Swin window up to 8 x 8) it also finishes dq, so the
  whole backward is one kernel and S is recomputed once.
* ``_bwd_q_kernel``: only for N > BLOCK_N; one program per query block, looping over the key
  blocks: dq. (S is recomputed a second time: ~40% more backward FLOPs, no atomics on dq.)

Table gradient, two modes:

* default: ``tl.atomic_add`` of the ds tile into a private fp32 row ``part[b % G, h, :]`` of a
  (G, H, T) buffer, G = BW up to a cap (16M elements). Atomics only collide inside one program's
  row (several (i, j) of a tile share a table entry; no cross-program contention while BW <= G),
  then one ``part.sum(0)``.
* deterministic (``torch.are_deterministic_algorithms_enabled()``): no atomics. Each program
  stores its ds tiles (plain stores, each element written once) into a (chunk, H, N, N) fp32
  buffer; the launcher sums it over windows in a fixed order (``sum(0)`` per chunk of windows,
  chunks in order) and scatters the (H, N, N) sum into the table with ``index_add_``, which torch
  makes deterministic in that mode. Costs the buffer (capped at 16M elements = 64 MB by chunking
  the windows) and one extra write + read of ds.

The padding and logit-scale partial sums are plain per-program stores summed by torch:
deterministic in both modes.

dtypes: float16, bfloat16, float32, float64 (float64 only under the interpreter; the backend
refuses it on CUDA). Dots take the input dtype with an fp32 accumulator (fp64 for fp64); fp32
dots are IEEE unless ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own rule for
matmuls). head_dim 1..128, padded to a power of two >= 16 with masks.

``TRITON_INTERPRET=1`` must be set before this module is imported to run on CPU tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from ._common import acc_dtype, dot_precision

# Largest query/key tile. 64 x 64 holds a 7 x 7 (49) or 8 x 8 (64) window in one tile; larger
# windows (12 x 12 = 144, 16 x 16 = 256, 24 x 24 = 576) are tiled. Tests lower it to exercise the
# tiled paths on small windows.
MAX_BLOCK = 64
# Cap (elements) on the table-gradient scratch buffers: 16M fp32 = 64 MB.
_SCRATCH_ELEMS = 1 << 24
# Tests set this to fill every buffer a kernel must write with NaN first, so an element a kernel
# forgets to write shows up instead of passing with whatever the allocator left there.
POISON = False


def _alloc(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tokens(b, offs, n_win, n_win_w, img_h, img_w, shift_h, shift_w,
            N: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, BLOCK_MODE: tl.constexpr):
    """Where tokens ``offs`` of window ``b`` live.

    Returns (batch (int64), r, c, src_r, src_c, valid, real): ``valid`` = a token of the window
    (offs < N); ``real`` = valid and stored in memory (not padding). Windowed mode: batch = b,
    the token index is the row (src_r) and src_c = 0. Block mode: (r, c) on the padded,
    shifted grid and (src_r, src_c) the source pixel.
    """
    valid = offs < N
    if BLOCK_MODE:
        w = b % n_win
        batch = b // n_win
        r = (w // n_win_w) * MH + offs // MW
        c = (w % n_win_w) * MW + offs % MW
        real = valid & (r < img_h) & (c < img_w)
        src_r = (r + shift_h) % img_h
        src_c = (c + shift_w) % img_w
    else:
        batch = b
        r = offs
        c = offs * 0
        real = valid
        src_r = offs
        src_c = c
    return batch.to(tl.int64), r, c, src_r, src_c, valid, real


@triton.jit
def _load_rows(X, batch, src_r, src_c, stride_b, stride_r, stride_c, stride_d, offs_d, valid_d,
               valid, real, PADROW, stride_pd, HAS_PAD: tl.constexpr):
    """(rows, BLOCK_D) tile of X (already offset to the head); padding tokens read PADROW (or 0)."""
    x = tl.load(X + batch * stride_b + src_r[:, None] * stride_r + src_c[:, None] * stride_c
                + offs_d[None, :] * stride_d, mask=real[:, None] & valid_d[None, :], other=0.0)
    if HAS_PAD:
        pad = tl.load(PADROW + offs_d * stride_pd, mask=valid_d, other=0.0).to(x.dtype)
        x = tl.where((valid & (real == 0))[:, None], pad[None, :], x)
    return x


@triton.jit
def _store_rows(X, val, batch, src_r, src_c, stride_b, stride_r, stride_c, stride_d, offs_d, valid_d, real):
    tl.store(X + batch * stride_b + src_r[:, None] * stride_r + src_c[:, None] * stride_c
             + offs_d[None, :] * stride_d, val.to(X.dtype.element_ty), mask=real[:, None] & valid_d[None, :])


@triton.jit
def _region(x, size, window, shift):
    """timm's region of padded-grid coordinate x: slices [0, -M), [-M, -s), [-s, None); with
    s = 0 the last slice is [0, None): one region."""
    return tl.where(shift > 0, (x >= size - window).to(tl.int32) + (x >= size - shift).to(tl.int32), 0)


@triton.jit
def _rel_index(offs_m, offs_n, MH: tl.constexpr, MW: tl.constexpr):
    """timm's relative position index of query tokens offs_m against key tokens offs_n."""
    ih = offs_m // MW
    iw = offs_m % MW
    jh = offs_n // MW
    jw = offs_n % MW
    return (ih[:, None] - jh[None, :] + (MH - 1)) * (2 * MW - 1) + (iw[:, None] - jw[None, :] + (MW - 1))


@triton.jit
def _scores(qd, kd, scale, TAB_h, MASK_w, stride_mi, stride_mj, offs_m, offs_n, valid_m, valid_n,
            r_m, c_m, r_n, c_n, hp, wp, shift_h, shift_w,
            MH: tl.constexpr, MW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHIFT: tl.constexpr,
            ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits in ACC: scale <q, k> + table[idx, h] (+ mask | shift mask).

    Returns (s, dots, idx, valid); keys outside the window get s = -inf. Rows outside the window
    stay finite (their q is 0) and are never stored.
    """
    dots = tl.dot(qd, tl.trans(kd), input_precision=DOT_PREC, out_dtype=ACC)
    s = dots * scale
    valid = valid_m[:, None] & valid_n[None, :]
    idx = _rel_index(offs_m, offs_n, MH, MW)
    s += tl.load(TAB_h + idx, mask=valid, other=0.0).to(ACC)
    if HAS_MASK:
        s += tl.load(MASK_w + offs_m[:, None] * stride_mi + offs_n[None, :] * stride_mj,
                     mask=valid, other=0.0).to(ACC)
    if HAS_SHIFT:
        id_m = _region(r_m, hp, MH, shift_h) * 3 + _region(c_m, wp, MW, shift_w)
        id_n = _region(r_n, hp, MH, shift_h) * 3 + _region(c_n, wp, MW, shift_w)
        s += tl.where(id_m[:, None] != id_n[None, :], -100.0, 0.0).to(ACC)  # timm's get_attn_mask value
    s = tl.where(valid_n[None, :], s, float("-inf"))
    return s, dots, idx, valid


@triton.jit
def _normalize(x, ACC: tl.constexpr):
    """F.normalize in ACC: (x^ in ACC, 1 / max(|x|, eps), |x|)."""
    xf = x.to(ACC)
    nrm = tl.sqrt(tl.sum(xf * xf, axis=1))
    inv = 1.0 / tl.maximum(nrm, 1e-12)  # F.normalize's eps
    return xf * inv[:, None], inv, nrm


@triton.jit
def _normalize_bwd(dxh, xh, inv, nrm):
    """Gradient through x^ = x / max(|x|, eps)."""
    proj = tl.sum(dxh * xh, axis=1)
    return tl.where((nrm > 1e-12)[:, None], dxh - xh * proj[:, None], dxh) * inv[:, None]


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_block_scores(
    K, V, PAD, qd, c_scale, TAB_h, MASK_w, b, h, bt, offs_n, offs_d, valid_d, offs_m, valid_m, r_m, c_m,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kd,
    stride_vb, stride_vr, stride_vc, stride_vh, stride_vd,
    stride_pw, stride_ph, stride_pd, stride_mi, stride_mj,
    n_win, n_win_w, img_h, img_w, hp, wp, shift_h, shift_w,
    N: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, BLOCK_MODE: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr, ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One key block of a query block's loop (forward and dq kernels): load k and v of tokens
    ``offs_n`` (pad tokens from PAD), normalise k for V2, and return ``(v, kd, s, valid)`` with
    ``kd`` the k used in the dot and ``s`` the (BLOCK_M, BLOCK_N) logits incl. bias and mask."""
    _, r_n, c_n, sr_n, sc_n, valid_n, real_n = _tokens(
        b, offs_n, n_win, n_win_w, img_h, img_w, shift_h, shift_w, N, MH, MW, BLOCK_MODE)
    k = _load_rows(K + h * stride_kh, bt, sr_n, sc_n, stride_kb, stride_kr, stride_kc, stride_kd, offs_d,
                   valid_d, valid_n, real_n, PAD + stride_pw + h * stride_ph, stride_pd, HAS_PAD)
    v = _load_rows(V + h * stride_vh, bt, sr_n, sc_n, stride_vb, stride_vr, stride_vc, stride_vd, offs_d,
                   valid_d, valid_n, real_n, PAD + 2 * stride_pw + h * stride_ph, stride_pd, HAS_PAD)
    if COSINE:
        k_hat, k_inv, k_nrm = _normalize(k, ACC)
        kd = k_hat.to(k.dtype)
    else:
        kd = k
    s, dots, idx, valid = _scores(qd, kd, c_scale, TAB_h, MASK_w, stride_mi, stride_mj, offs_m, offs_n,
                                  valid_m, valid_n, r_m, c_m, r_n, c_n, hp, wp, shift_h, shift_w,
                                  MH, MW, HAS_MASK, HAS_SHIFT, ACC, DOT_PREC)
    return v, kd, s, valid


# A shift of 1 must stay a runtime int: Triton would otherwise specialise it into a constexpr.
_RUNTIME = ["shift_h", "shift_w"]


@triton.jit(do_not_specialize=_RUNTIME)
def _fwd_kernel(
    Q, K, V, PAD, TAB, MASK, LS, O, LSE,
    stride_qb, stride_qr, stride_qc, stride_qh, stride_qd,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kd,
    stride_vb, stride_vr, stride_vc, stride_vh, stride_vd,
    stride_ob, stride_or, stride_oc, stride_oh, stride_od,
    stride_pw, stride_ph, stride_pd,
    stride_mw, stride_mi, stride_mj,
    n_heads, n_win, n_win_w, img_h, img_w, hp, wp, shift_h, shift_w,
    N: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_MODE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # window-heads on axis 0: its limit is 2^31 - 1, axis 1's is 65535
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    bt, r_m, c_m, sr_m, sc_m, valid_m, real_m = _tokens(
        b, offs_m, n_win, n_win_w, img_h, img_w, shift_h, shift_w, N, MH, MW, BLOCK_MODE)

    q = _load_rows(Q + h * stride_qh, bt, sr_m, sc_m, stride_qb, stride_qr, stride_qc, stride_qd, offs_d, valid_d,
                   valid_m, real_m, PAD + h * stride_ph, stride_pd, HAS_PAD)
    if COSINE:
        q_hat, q_inv, q_nrm = _normalize(q, ACC)
        qd = q_hat.to(q.dtype)
    else:
        qd = q
    c_scale = tl.load(LS + h).to(ACC)
    TAB_h = TAB + h * ((2 * MH - 1) * (2 * MW - 1))
    MASK_w = MASK + (b % n_win) * stride_mw

    # Finite start for the running max: a row whose first key block is all -inf (a user mask of
    # -inf) then gives alpha = exp(-1e30 - m) = 0 later instead of exp(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        v, kd, s, valid = _key_block_scores(
            K, V, PAD, qd, c_scale, TAB_h, MASK_w, b, h, bt, offs_n, offs_d, valid_d, offs_m, valid_m, r_m, c_m,
            stride_kb, stride_kr, stride_kc, stride_kh, stride_kd,
            stride_vb, stride_vr, stride_vc, stride_vh, stride_vd,
            stride_pw, stride_ph, stride_pd, stride_mi, stride_mj,
            n_win, n_win_w, img_h, img_w, hp, wp, shift_h, shift_w,
            N, MH, MW, BLOCK_MODE, HAS_PAD, HAS_SHIFT, HAS_MASK, COSINE, ACC, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC, out_dtype=ACC)
        m_i = m_new

    out = acc / l_i[:, None]
    _store_rows(O + h * stride_oh, out, bt, sr_m, sc_m, stride_ob, stride_or, stride_oc, stride_od,
                offs_d, valid_d, real_m)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log(l_i), mask=valid_m)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

# b_start / dtab_rows vary between launches of the deterministic chunks: no recompile per value.
@triton.jit(do_not_specialize=_RUNTIME + ["b_start", "dtab_rows"])
def _bwd_kv_kernel(
    Q, K, V, PAD, TAB, MASK, LS, O, DO, LSE, DQ, DK, DV, DTAB, DPAD, DLS,
    stride_qb, stride_qr, stride_qc, stride_qh, stride_qd,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kd,
    stride_vb, stride_vr, stride_vc, stride_vh, stride_vd,
    stride_ob, stride_or, stride_oc, stride_oh, stride_od,
    stride_dob, stride_dor, stride_doc, stride_doh, stride_dod,
    stride_dqb, stride_dqr, stride_dqc, stride_dqh, stride_dqd,
    stride_dkb, stride_dkr, stride_dkc, stride_dkh, stride_dkd,
    stride_dvb, stride_dvr, stride_dvc, stride_dvh, stride_dvd,
    stride_pw, stride_ph, stride_pd,
    stride_mw, stride_mi, stride_mj,
    n_heads, n_win, n_win_w, img_h, img_w, hp, wp, shift_h, shift_w,
    b_start, dtab_rows,
    N: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_MODE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr, DTAB_MODE: tl.constexpr, NEED_DPAD: tl.constexpr,
):
    """dk, dv for one key block (+ dq when FUSE_DQ), the table gradient, and partial sums.

    DTAB_MODE 0: no table gradient; 1: atomic adds into row ``b % dtab_rows`` of DTAB (rows, H, T);
    2: plain stores of ds into DTAB (chunk, H, N, N) at window ``b - b_start`` (deterministic).
    NEED_DPAD: DPAD[(b H + h) nblk + pid_n] = (sum of dk, sum of dv) over this block's padding
    tokens, (2, HEAD_DIM). COSINE: DLS[(b H + h) nblk + pid_n] = sum of ds * <q^, k^>.
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = b_start + pid_bh // n_heads
    h = pid_bh % n_heads
    T = (2 * MH - 1) * (2 * MW - 1)
    prog = (b.to(tl.int64) * n_heads + h) * tl.num_programs(1) + pid_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    bt, r_n, c_n, sr_n, sc_n, valid_n, real_n = _tokens(
        b, offs_n, n_win, n_win_w, img_h, img_w, shift_h, shift_w, N, MH, MW, BLOCK_MODE)

    k = _load_rows(K + h * stride_kh, bt, sr_n, sc_n, stride_kb, stride_kr, stride_kc, stride_kd, offs_d,
                   valid_d, valid_n, real_n, PAD + stride_pw + h * stride_ph, stride_pd, HAS_PAD)
    v = _load_rows(V + h * stride_vh, bt, sr_n, sc_n, stride_vb, stride_vr, stride_vc, stride_vd, offs_d,
                   valid_d, valid_n, real_n, PAD + 2 * stride_pw + h * stride_ph, stride_pd, HAS_PAD)
    if COSINE:
        k_hat, k_inv, k_nrm = _normalize(k, ACC)
        kd = k_hat.to(k.dtype)
        dls = tl.zeros([BLOCK_N], dtype=ACC)
    else:
        kd = k
    c_scale = tl.load(LS + h).to(ACC)
    LSE_bh = LSE + (b.to(tl.int64) * n_heads + h) * N
    TAB_h = TAB + h * T
    MASK_w = MASK + (b % n_win) * stride_mw
    if DTAB_MODE == 1:
        DTAB_row = DTAB + ((b % dtab_rows).to(tl.int64) * n_heads + h) * T
    if DTAB_MODE == 2:
        DTAB_row = DTAB + ((b - b_start).to(tl.int64) * n_heads + h) * (N * N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + offs_m0
        _, r_m, c_m, sr_m, sc_m, valid_m, real_m = _tokens(
            b, offs_m, n_win, n_win_w, img_h, img_w, shift_h, shift_w, N, MH, MW, BLOCK_MODE)
        q = _load_rows(Q + h * stride_qh, bt, sr_m, sc_m, stride_qb, stride_qr, stride_qc, stride_qd, offs_d,
                       valid_d, valid_m, real_m, PAD + h * stride_ph, stride_pd, HAS_PAD)
        # Padding queries' outputs are dropped: dout and out read as 0 there (HAS_PAD=False).
        do = _load_rows(DO + h * stride_doh, bt, sr_m, sc_m, stride_dob, stride_dor, stride_doc, stride_dod,
                        offs_d, valid_d, valid_m, real_m, PAD, stride_pd, False)
        o = _load_rows(O + h * stride_oh, bt, sr_m, sc_m, stride_ob, stride_or, stride_oc, stride_od,
                       offs_d, valid_d, valid_m, real_m, PAD, stride_pd, False)
        # delta recomputed per tile instead of by a pre-pass kernel: one extra (BM, D) load per
        # tile, and with one key block (N <= BLOCK_N) each row is read exactly once anyway.
        delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
        lse = tl.load(LSE_bh + offs_m, mask=valid_m, other=0.0)
        if COSINE:
            q_hat, q_inv, q_nrm = _normalize(q, ACC)
            qd = q_hat.to(q.dtype)
        else:
            qd = q
        s, dots, idx, valid = _scores(qd, kd, c_scale, TAB_h, MASK_w, stride_mi, stride_mj, offs_m, offs_n,
                                      valid_m, valid_n, r_m, c_m, r_n, c_n, hp, wp, shift_h, shift_w,
                                      MH, MW, HAS_MASK, HAS_SHIFT, ACC, DOT_PREC)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        ds_lo = ds.to(qd.dtype)
        dk += tl.dot(tl.trans(ds_lo), qd, input_precision=DOT_PREC, out_dtype=ACC)
        if FUSE_DQ:
            dq = tl.dot(ds_lo, kd, input_precision=DOT_PREC, out_dtype=ACC) * c_scale
            if COSINE:
                dq = _normalize_bwd(dq, q_hat, q_inv, q_nrm)
            _store_rows(DQ + h * stride_dqh, dq, bt, sr_m, sc_m, stride_dqb, stride_dqr, stride_dqc, stride_dqd,
                        offs_d, valid_d, real_m)
        if COSINE:
            dls += tl.sum(ds * dots, axis=0)
        if DTAB_MODE == 1:
            tl.atomic_add(DTAB_row + idx, ds.to(DTAB.dtype.element_ty), mask=valid)
        if DTAB_MODE == 2:
            tl.store(DTAB_row + offs_m[:, None] * N + offs_n[None, :], ds.to(DTAB.dtype.element_ty), mask=valid)

    dk = dk * c_scale
    if COSINE:
        dk = _normalize_bwd(dk, k_hat, k_inv, k_nrm)
        tl.store(DLS + prog, tl.sum(dls, axis=0))
    _store_rows(DK + h * stride_dkh, dk, bt, sr_n, sc_n, stride_dkb, stride_dkr, stride_dkc, stride_dkd,
                offs_d, valid_d, real_n)
    _store_rows(DV + h * stride_dvh, dv, bt, sr_n, sc_n, stride_dvb, stride_dvr, stride_dvc, stride_dvd,
                offs_d, valid_d, real_n)
    if NEED_DPAD:
        is_pad = (valid_n & (real_n == 0))[:, None]
        DPAD_p = DPAD + prog * (2 * HEAD_DIM)
        tl.store(DPAD_p + offs_d, tl.sum(tl.where(is_pad, dk, 0.0), axis=0), mask=valid_d)
        tl.store(DPAD_p + HEAD_DIM + offs_d, tl.sum(tl.where(is_pad, dv, 0.0), axis=0), mask=valid_d)


@triton.jit(do_not_specialize=_RUNTIME)
def _bwd_q_kernel(
    Q, K, V, PAD, TAB, MASK, LS, O, DO, LSE, DQ,
    stride_qb, stride_qr, stride_qc, stride_qh, stride_qd,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kd,
    stride_vb, stride_vr, stride_vc, stride_vh, stride_vd,
    stride_ob, stride_or, stride_oc, stride_oh, stride_od,
    stride_dob, stride_dor, stride_doc, stride_doh, stride_dod,
    stride_dqb, stride_dqr, stride_dqc, stride_dqh, stride_dqd,
    stride_pw, stride_ph, stride_pd,
    stride_mw, stride_mi, stride_mj,
    n_heads, n_win, n_win_w, img_h, img_w, hp, wp, shift_h, shift_w,
    N: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_MODE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_MASK: tl.constexpr,
    COSINE: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq for one query block, looping over the key blocks (used only when N > BLOCK_N)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    bt, r_m, c_m, sr_m, sc_m, valid_m, real_m = _tokens(
        b, offs_m, n_win, n_win_w, img_h, img_w, shift_h, shift_w, N, MH, MW, BLOCK_MODE)
    q = _load_rows(Q + h * stride_qh, bt, sr_m, sc_m, stride_qb, stride_qr, stride_qc, stride_qd, offs_d, valid_d,
                   valid_m, real_m, PAD + h * stride_ph, stride_pd, HAS_PAD)
    do = _load_rows(DO + h * stride_doh, bt, sr_m, sc_m, stride_dob, stride_dor, stride_doc, stride_dod,
                    offs_d, valid_d, valid_m, real_m, PAD, stride_pd, False)
    o = _load_rows(O + h * stride_oh, bt, sr_m, sc_m, stride_ob, stride_or, stride_oc, stride_od,
                   offs_d, valid_d, valid_m, real_m, PAD, stride_pd, False)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    lse = tl.load(LSE + (b.to(tl.int64) * n_heads + h) * N + offs_m, mask=valid_m, other=0.0)
    if COSINE:
        q_hat, q_inv, q_nrm = _normalize(q, ACC)
        qd = q_hat.to(q.dtype)
    else:
        qd = q
    c_scale = tl.load(LS + h).to(ACC)
    TAB_h = TAB + h * ((2 * MH - 1) * (2 * MW - 1))
    MASK_w = MASK + (b % n_win) * stride_mw

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        v, kd, s, valid = _key_block_scores(
            K, V, PAD, qd, c_scale, TAB_h, MASK_w, b, h, bt, offs_n, offs_d, valid_d, offs_m, valid_m, r_m, c_m,
            stride_kb, stride_kr, stride_kc, stride_kh, stride_kd,
            stride_vb, stride_vr, stride_vc, stride_vh, stride_vd,
            stride_pw, stride_ph, stride_pd, stride_mi, stride_mj,
            n_win, n_win_w, img_h, img_w, hp, wp, shift_h, shift_w,
            N, MH, MW, BLOCK_MODE, HAS_PAD, HAS_SHIFT, HAS_MASK, COSINE, ACC, DOT_PREC)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kd.dtype), kd, input_precision=DOT_PREC, out_dtype=ACC)
    dq = dq * c_scale
    if COSINE:
        dq = _normalize_bwd(dq, q_hat, q_inv, q_nrm)
    _store_rows(DQ + h * stride_dqh, dq, bt, sr_m, sc_m, stride_dqb, stride_dqr, stride_dqc, stride_dqd,
                offs_d, valid_d, real_m)


# ---------------------------------------------------------------------------------------------
# Launch plumbing shared by the four entries
# ---------------------------------------------------------------------------------------------

_TL_ACC = {torch.float64: tl.float64}


def _blocks(n: int, d: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). tl.dot needs every dim >= 16."""
    bmn = max(16, min(MAX_BLOCK, triton.next_power_of_2(n)))
    bd = max(16, triton.next_power_of_2(d))
    # 64 x 64 fp32 logits + a 64 x 128 accumulator over 4 warps = ~96 registers/thread for the
    # tiles; 8 warps only when the tile grows past that.
    num_warps = 4 if bmn * max(bmn, bd) <= 64 * 64 else 8
    return bmn, bmn, bd, num_warps


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


@dataclass
class _Geom:
    """Everything the kernels need besides pointers: window, heads, and (block mode) the image."""

    bw: int  # windows (B * nW)
    heads: int
    d: int
    mh: int
    mw: int
    n_win: int = 1  # windows per image (block mode) or the mask's nW (windowed)
    n_win_w: int = 1
    img_h: int = 1
    img_w: int = 1
    hp: int = 0
    wp: int = 0
    shift_h: int = 0
    shift_w: int = 0
    block_mode: bool = False

    @property
    def n(self) -> int:
        return self.mh * self.mw

    @property
    def t(self) -> int:
        return (2 * self.mh - 1) * (2 * self.mw - 1)

    def scalars(self):
        return (self.heads, self.n_win, self.n_win_w, self.img_h, self.img_w, self.hp, self.wp,
                self.shift_h, self.shift_w)


def _win_strides(t: torch.Tensor):
    """(b, r, c, h, d) strides of a windowed (BW, H, N, D) tensor: the token is the row."""
    return (t.stride(0), t.stride(2), 0, t.stride(1), t.stride(3))


def _img_strides(t: torch.Tensor, d: int):
    """(b, r, c, h, d) strides of a (B, Hi, Wi, H*D) image tensor (any strides, stride 0 too)."""
    return (t.stride(0), t.stride(1), t.stride(2), d * t.stride(3), t.stride(3))


def _qkv_strides(qkv: torch.Tensor):
    """(b, r, c, h, d) strides of one of q/k/v inside a (B, Hi, Wi, 3, H, D) tensor."""
    return (qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(4), qkv.stride(5))


def _table_rows(rel_pos_table: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(T, H) -> (H, T) contiguous in the accumulation dtype: each head gathers from one
    contiguous 4*T-byte row (676 B for 7 x 7 windows, L1/L2 resident) instead of a stride-H column."""
    return rel_pos_table.detach().t().to(acc).contiguous()


def _launch_fwd(g: _Geom, q, k, v, qs, ks, vs, pad, table, mask, ls, scale, out, os_):
    acc = acc_dtype(q.dtype)
    lse = _alloc((g.bw, g.heads, g.n), acc, q.device)
    if g.bw == 0 or g.heads == 0:
        return lse
    tab = _table_rows(table, acc)
    pad_t, pad_s = (pad, pad.stride()) if pad is not None else (tab, (0, 0, 0))
    mask_t, mask_s = (mask, mask.stride()) if mask is not None else (tab, (0, 0, 0))
    # Per-head logit multiplier, read by the kernel from memory: V2's exp(min(logit_scale, log 100)),
    # or V1's scale repeated (a Python float argument would be rounded to fp32 by Triton).
    ls_t = ls if ls is not None else torch.full((g.heads,), scale, dtype=acc, device=q.device)
    bm, bn, bd, nw = _blocks(g.n, g.d)
    with _device_ctx(q):
        _fwd_kernel[(g.bw * g.heads, triton.cdiv(g.n, bm))](
            q, k, v, pad_t, tab, mask_t, ls_t, out, lse,
            *qs, *ks, *vs, *os_, *pad_s, *mask_s,
            *g.scalars(),
            N=g.n, MH=g.mh, MW=g.mw, HEAD_DIM=g.d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            BLOCK_MODE=g.block_mode, HAS_PAD=pad is not None, HAS_SHIFT=g.block_mode and (g.shift_h > 0 or g.shift_w > 0),
            HAS_MASK=mask is not None, COSINE=ls is not None,
            ACC=_TL_ACC.get(acc, tl.float32), DOT_PREC=dot_precision(q.dtype), num_warps=nw,
        )
    return lse


_REL_INDEX_CACHE: dict = {}


def relative_position_index(mh: int, mw: int, device) -> torch.Tensor:
    """timm's (N*N,) relative position index (int64), cached per window size and device."""
    key = (mh, mw, str(device))
    idx = _REL_INDEX_CACHE.get(key)
    if idx is None:
        ih = torch.arange(mh, device=device).repeat_interleave(mw)
        iw = torch.arange(mw, device=device).repeat(mh)
        idx = ((ih[:, None] - ih[None, :] + mh - 1) * (2 * mw - 1) + (iw[:, None] - iw[None, :] + mw - 1)).reshape(-1)
        _REL_INDEX_CACHE[key] = idx
    return idx


def _launch_bwd(g: _Geom, q, k, v, qs, ks, vs, pad, table, mask, ls, scale, out, os_, dout, dos,
                dq, dk, dv, dqs, dks, dvs, lse, need_dtable: bool, need_dpad: bool, deterministic: bool):
    """Runs the backward kernels into dq/dk/dv (preallocated views). Returns
    (dtable (H, T) in acc dtype or None, dpad (2, H, D) for k and v or None, dls (H,) or None)."""
    acc = acc_dtype(q.dtype)
    n, nh, t_size = g.n, g.heads, g.t
    if g.bw == 0 or nh == 0:
        z = lambda *s: torch.zeros(s, dtype=acc, device=q.device)  # noqa: E731
        return (z(nh, t_size) if need_dtable else None, z(2, nh, g.d) if need_dpad else None,
                z(nh) if ls is not None else None)
    tab = _table_rows(table, acc)
    pad_t, pad_s = (pad, pad.stride()) if pad is not None else (tab, (0, 0, 0))
    mask_t, mask_s = (mask, mask.stride()) if mask is not None else (tab, (0, 0, 0))
    # Per-head logit multiplier, read by the kernel from memory: V2's exp(min(logit_scale, log 100)),
    # or V1's scale repeated (a Python float argument would be rounded to fp32 by Triton).
    ls_t = ls if ls is not None else torch.full((g.heads,), scale, dtype=acc, device=q.device)
    bm, bn, bd, nw = _blocks(n, g.d)
    nblk_n = triton.cdiv(n, bn)
    fuse_dq = nblk_n == 1
    cosine = ls is not None
    need_dpad = need_dpad and pad is not None
    dpad_part = _alloc((g.bw, nh, nblk_n, 2, g.d), acc, q.device) if need_dpad else tab
    dls_part = _alloc((g.bw, nh, nblk_n), acc, q.device) if cosine else tab
    common = dict(N=n, MH=g.mh, MW=g.mw, HEAD_DIM=g.d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                  BLOCK_MODE=g.block_mode, HAS_PAD=pad is not None,
                  HAS_SHIFT=g.block_mode and (g.shift_h > 0 or g.shift_w > 0), HAS_MASK=mask is not None,
                  COSINE=cosine, ACC=_TL_ACC.get(acc, tl.float32), DOT_PREC=dot_precision(q.dtype), num_warps=nw)

    def launch_kv(b_start, b_count, dtab_buf, mode, rows):
        _bwd_kv_kernel[(b_count * nh, nblk_n)](
            q, k, v, pad_t, tab, mask_t, ls_t, out, dout, lse, dq, dk, dv, dtab_buf, dpad_part, dls_part,
            *qs, *ks, *vs, *os_, *dos, *dqs, *dks, *dvs, *pad_s, *mask_s,
            *g.scalars(), b_start, rows,
            FUSE_DQ=fuse_dq, DTAB_MODE=mode, NEED_DPAD=need_dpad, **common,
        )

    dtab = None
    with _device_ctx(q):
        if not need_dtable:
            launch_kv(0, g.bw, tab, 0, 1)
        elif not deterministic:
            rows = max(1, min(g.bw, _SCRATCH_ELEMS // (nh * t_size)))
            part = torch.zeros((rows, nh, t_size), dtype=acc, device=q.device)
            launch_kv(0, g.bw, part, 1, rows)
            dtab = part.sum(0)  # (H, T)
        else:
            chunk = max(1, min(g.bw, _SCRATCH_ELEMS // (nh * n * n)))
            ds_buf = _alloc((chunk, nh, n, n), acc, q.device)
            dbias = torch.zeros((nh, n * n), dtype=acc, device=q.device)
            for b0 in range(0, g.bw, chunk):
                cnt = min(chunk, g.bw - b0)
                launch_kv(b0, cnt, ds_buf, 2, 1)
                dbias += ds_buf[:cnt].sum(0).view(nh, n * n)  # fixed order: chunk by chunk
            # (H, N*N) -> (H, T): index_add_ is deterministic on CUDA under
            # torch.use_deterministic_algorithms(True) (and always on CPU).
            dtab = torch.zeros((nh, t_size), dtype=acc, device=q.device)
            dtab.index_add_(1, relative_position_index(g.mh, g.mw, q.device), dbias)
        if not fuse_dq:
            _bwd_q_kernel[(g.bw * nh, triton.cdiv(n, bm))](
                q, k, v, pad_t, tab, mask_t, ls_t, out, dout, lse, dq,
                *qs, *ks, *vs, *os_, *dos, *dqs, *pad_s, *mask_s,
                *g.scalars(),
                **common,
            )
    dpad = dpad_part.sum((0, 2)).permute(1, 0, 2) if need_dpad else None  # (2, H, D): k, v
    dls = dls_part.sum((0, 2)) if cosine else None
    return dtab, dpad, dls


# ---------------------------------------------------------------------------------------------
# Entry launchers
# ---------------------------------------------------------------------------------------------

def window_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_table: torch.Tensor,
    window_size: Tuple[int, int], mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    logit_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windowed forward. Returns ``(out (BW, H, N, D) contiguous, lse (BW, H, N) fp32|fp64)``.

    V1 with ``logit_scale=None`` (``scale`` defaults to D**-0.5); V2 (cosine) when
    ``logit_scale`` is given: the per-head multiplier ``exp(min(logit_scale, log 100))``, shape
    (H,), and ``rel_pos_table`` is then ``16 * sigmoid(cpb)``. No validation here (the op layer
    validates); ``window_size = (Mh, Mw)`` with ``Mh*Mw == N``.
    """
    mh, mw = int(window_size[0]), int(window_size[1])
    bw, nh, n, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    g = _Geom(bw, nh, d, mh, mw, n_win=mask.shape[0] if mask is not None else 1)
    out = _alloc((bw, nh, n, d), q.dtype, q.device)
    ls = None if logit_scale is None else logit_scale.detach().reshape(nh).to(acc_dtype(q.dtype)).contiguous()
    lse = _launch_fwd(g, q, k, v, _win_strides(q), _win_strides(k), _win_strides(v), None, rel_pos_table, mask,
                      ls, scale, out, _win_strides(out))
    return out, lse


def window_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_table: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, window_size: Tuple[int, int], mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None, need_dtable: bool = True, deterministic: Optional[bool] = None,
    logit_scale: Optional[torch.Tensor] = None,
):
    """Windowed backward. Returns ``(dq, dk, dv, dtable)`` (V1) or ``(dq, dk, dv, dtable, dls)``
    (V2, ``logit_scale`` given): dq/dk/dv contiguous (BW, H, N, D) in q's dtype, dtable (T, H) in
    rel_pos_table's dtype (None when ``need_dtable`` is False), dls (H,) the gradient of the
    per-head multiplier, in the accumulation dtype.

    ``dout`` may have any strides (stride 0 included). ``deterministic`` defaults to
    ``torch.are_deterministic_algorithms_enabled()``.
    """
    mh, mw = int(window_size[0]), int(window_size[1])
    bw, nh, n, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    g = _Geom(bw, nh, d, mh, mw, n_win=mask.shape[0] if mask is not None else 1)
    dq = _alloc((bw, nh, n, d), q.dtype, q.device)
    dk = _alloc((bw, nh, n, d), q.dtype, q.device)
    dv = _alloc((bw, nh, n, d), q.dtype, q.device)
    ls = None if logit_scale is None else logit_scale.detach().reshape(nh).to(acc_dtype(q.dtype)).contiguous()
    dtab, _, dls = _launch_bwd(
        g, q, k, v, _win_strides(q), _win_strides(k), _win_strides(v), None, rel_pos_table, mask, ls, scale,
        out, _win_strides(out), dout, _win_strides(dout), dq, dk, dv, _win_strides(dq), _win_strides(dk),
        _win_strides(dv), lse, need_dtable, False, deterministic)
    if dtab is not None:
        dtab = dtab.t().to(rel_pos_table.dtype).contiguous()
    if logit_scale is None:
        return dq, dk, dv, dtab
    return dq, dk, dv, dtab, dls


def _block_geom(qkv: torch.Tensor, window_size, shift_size) -> _Geom:
    b, hi, wi, _, nh, d = qkv.shape
    mh, mw = int(window_size[0]), int(window_size[1])
    sh, sw = int(shift_size[0]), int(shift_size[1])
    hp, wp = -(-hi // mh) * mh, -(-wi // mw) * mw
    n_win_w = wp // mw
    n_win = (hp // mh) * n_win_w
    return _Geom(b * n_win, nh, d, mh, mw, n_win=n_win, n_win_w=n_win_w, img_h=hi, img_w=wi, hp=hp, wp=wp,
                 shift_h=sh, shift_w=sw, block_mode=True)


def shifted_window_attention_fwd(
    qkv: torch.Tensor, rel_pos_table: torch.Tensor, window_size: Tuple[int, int], shift_size: Tuple[int, int],
    scale: Optional[float] = None, pad_qkv: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-level forward: qkv (B, Hi, Wi, 3, H, D) -> ``(out (B, Hi, Wi, H*D) contiguous,
    lse (B*nW, H, N))``; nW = (Hp/Mh)(Wp/Mw) windows of the padded grid. V2 when
    ``logit_scale`` (the (H,) multiplier) is given, as in :func:`window_attention_fwd`."""
    g = _block_geom(qkv, window_size, shift_size)
    b, hi, wi = qkv.shape[:3]
    scale = g.d ** -0.5 if scale is None else float(scale)
    if g.hp == hi and g.wp == wi:
        pad_qkv = None  # no padding token: never read
    out = _alloc((b, hi, wi, g.heads * g.d), qkv.dtype, qkv.device)
    qs = _qkv_strides(qkv)
    ls = None if logit_scale is None else logit_scale.detach().reshape(g.heads).to(acc_dtype(qkv.dtype)).contiguous()
    lse = _launch_fwd(g, qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], qs, qs, qs, pad_qkv, rel_pos_table,
                      None, ls, scale, out, _img_strides(out, g.d))
    return out, lse


def shifted_window_attention_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, rel_pos_table: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    window_size: Tuple[int, int], shift_size: Tuple[int, int], scale: Optional[float] = None,
    pad_qkv: Optional[torch.Tensor] = None, need_dtable: bool = True, need_dpad: bool = True,
    deterministic: Optional[bool] = None, logit_scale: Optional[torch.Tensor] = None,
):
    """Block-level backward. Returns ``(dqkv (B, Hi, Wi, 3, H, D) contiguous, dtable (T, H) | None,
    dpad (3, H, D) | None[, dls (H,)])``; dpad is None when ``pad_qkv`` is None or not needed."""
    g = _block_geom(qkv, window_size, shift_size)
    scale = g.d ** -0.5 if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    pad_used = pad_qkv if (g.hp, g.wp) != tuple(qkv.shape[1:3]) else None  # no padding token: never read
    qs = _qkv_strides(qkv)
    ds_ = _qkv_strides(dqkv)
    ls = None if logit_scale is None else logit_scale.detach().reshape(g.heads).to(acc_dtype(qkv.dtype)).contiguous()
    dtab, dpad, dls = _launch_bwd(
        g, qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], qs, qs, qs, pad_used, rel_pos_table, None, ls, scale,
        out, _img_strides(out, g.d), dout, _img_strides(dout, g.d),
        dqkv[:, :, :, 0], dqkv[:, :, :, 1], dqkv[:, :, :, 2], ds_, ds_, ds_, lse,
        need_dtable, need_dpad, deterministic)
    if dtab is not None:
        dtab = dtab.t().to(rel_pos_table.dtype).contiguous()
    if dpad is not None:
        # padded queries' outputs are dropped, so their dq (and d pad_qkv[0]) is exactly 0
        dpad = torch.cat([torch.zeros_like(dpad[:1]), dpad], 0).to(pad_qkv.dtype)
    elif need_dpad and pad_qkv is not None:
        dpad = torch.zeros_like(pad_qkv)
    if logit_scale is None:
        return dqkv, dtab, dpad
    return dqkv, dtab, dpad, dls
