"""Analytic FLOPs and bytes of each op (multiply-add = 2 FLOPs), for the benchmark table.

Window attention, per window and head, N = Mh*Mw tokens, head_dim d:
    q k^T: 2 N^2 d     softmax(P) v: 2 N^2 d     (softmax and bias adds are O(N^2), not counted,
                                                 as FlopCounterMode does not count them either)
Bytes are the *floor* a fused kernel must move: read qkv once, write the output once (plus the
small bias table), in the element size of the dtype.

Deformable attention (DAT core), per batch and head with HW queries and Ns samples:
    4 HW Ns d  (the two matmuls; the 1x1 projections are the module's, counted separately)
Bilinear sampling: 4 taps x 2 FLOPs per output element, bytes = read feat + pos, write out.
"""
import math


def swin_window_attention(batch, res, heads, head_dim, window):
    nwin = math.ceil(res / window) ** 2
    n = window * window
    return 4 * batch * nwin * heads * n * n * head_dim


def swin_window_attention_bytes(batch, res, heads, head_dim, window, elem):
    tokens = batch * res * res
    table = (2 * window - 1) ** 2 * heads
    return (4 * tokens * heads * head_dim + table) * elem


def deformable_attention(batch, hw, ns, heads, head_dim):
    return 4 * batch * heads * hw * ns * head_dim


def bilinear_sample(n, c, hk, wk):
    return 8 * n * c * hk * wk


def bilinear_sample_bytes(n, c, h, w, hk, wk, elem):
    return (n * c * h * w + n * hk * wk * 2 + n * c * hk * wk) * elem
