"""Drop-in replacements for timm 1.0.31's Swin window attention modules.

* :class:`WindowAttention` -- ``timm.models.swin_transformer.WindowAttention``
* :class:`WindowAttentionV2` -- ``timm.models.swin_transformer_v2.WindowAttention``

Same constructor arguments (plus ``backend``), same parameter and buffer names, shapes,
persistence, registration order and initialisation (same RNG draws in the same order, so a
seeded construction gives the same weights as timm's): ``load_state_dict`` works both ways with
``strict=True``. ``forward(x, mask)`` takes the partitioned windows like timm's; ``forward_block``
takes the block's (B, H, W, C) map and equals the block's ``_attn`` (roll/pad/partition folded
into the attention call, the layout the fused kernels read).

Attention dropout: in training mode with ``attn_drop > 0`` the call carries ``dropout_p``. Only
the reference implements it (drawing the same random numbers as timm for ``forward``);
``backend="auto"`` therefore runs the reference for such calls and an explicit fused backend
raises :class:`fastswin.BackendUnavailableError` (no silent fallback, no silently skipped
dropout). In eval mode, or with ``attn_drop=0``, every backend can run.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from ..functional.window_attention import (shifted_window_attention, shifted_window_attention_v2,
                                           window_attention, window_attention_v2)
from .._checks import pair
from ..reference import swin as _ref
from ._common import timm_trunc_normal_

_int_or_pair = Union[int, Tuple[int, int]]


def _check_x(x: torch.Tensor, n: int, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != n or x.shape[2] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 3-D tensor (B*nW, N={n}, C={dim}), got {got}")


def _check_x_block(x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[3] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 4-D tensor (B, H, W, C={dim}), got {got}")


def _attn_dropout_p(module: nn.Module) -> float:
    """The ``dropout_p`` of a call: ``attn_drop.p`` in training, 0 in eval (timm's ``attn_drop``)."""
    return module.attn_drop.p if module.training else 0.0


def _use_fused_attn(experimental: bool = False) -> bool:
    """timm's ``use_fused_attn`` (``timm.layers.config``): the same function when timm is
    importable (so ``set_fused_attn`` and ``TIMM_FUSED_ATTN`` read at timm's import act alike);
    otherwise its logic on ``TIMM_FUSED_ATTN`` (0 off, 1 on for tested layers, 2 on for
    experimental ones too; unset means 1) without making timm a dependency."""
    try:
        from timm.layers import use_fused_attn as timm_use_fused_attn
    except ImportError:
        pass
    else:
        return bool(timm_use_fused_attn(experimental=experimental))
    if not hasattr(F, "scaled_dot_product_attention"):
        return False
    level = int(os.environ["TIMM_FUSED_ATTN"]) if "TIMM_FUSED_ATTN" in os.environ else 1
    return level > 1 if experimental else level > 0


class WindowAttention(nn.Module):
    """Swin V1 window multi-head self attention with relative position bias (W-MSA / SW-MSA).

    Args (as timm): dim, num_heads, head_dim (dim // num_heads if None), window_size,
    qkv_bias, attn_drop, proj_drop, device, dtype; plus ``backend``
    ("auto" | "reference" | "triton" | "cuda").

    ``fused_attn`` is timm's flag, set the same way (``use_fused_attn(experimental=True)``: False
    unless ``TIMM_FUSED_ATTN=2`` or timm's ``set_fused_attn(True, experimental=True)``). When True
    the reference backend computes as timm's fused branch (``F.scaled_dot_product_attention``
    with bias + mask as ``attn_mask``, SDPA's own scale, SDPA's dropout), so the result equals
    timm's with the same flag; the Triton/CUDA backends are fused kernels and ignore it.
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: Optional[int] = None,
            window_size: _int_or_pair = 7,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
            backend: str = "auto",
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.backend = backends.check_backend_name(backend)
        self.dim = dim
        self.window_size = pair("window_size", window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = _use_fused_attn(experimental=True)

        # Registration order = timm's (state_dict key order and the RNG draws of init).
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        self.register_buffer(
            "relative_position_index",
            torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
            persistent=False,
        )
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)  # unused; kept so named_modules() matches timm's
        self.reset_parameters()

    def reset_parameters(self) -> None:
        timm_trunc_normal_(self.relative_position_bias_table, std=.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        self.relative_position_index.copy_(
            _ref.relative_position_index(self.window_size, device=self.relative_position_index.device)
        )

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: _int_or_pair) -> None:
        """Change the window and resize the bias table with timm's ``resize_rel_pos_bias_table``
        (needs timm installed)."""
        window_size = pair("window_size", window_size)
        if window_size == self.window_size:
            return
        try:
            from timm.layers import resize_rel_pos_bias_table
        except ImportError as e:  # pragma: no cover - timm is a test dependency
            raise ImportError("set_window_size: resizing the bias table uses timm's resize_rel_pos_bias_table; "
                              "install timm") from e
        old = self.window_size
        self.window_size = window_size
        win_h, win_w = window_size
        self.window_area = win_h * win_w
        with torch.no_grad():
            table = self.relative_position_bias_table
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(table, new_window_size=window_size,
                                          new_bias_shape=((2 * win_h - 1) * (2 * win_w - 1), self.num_heads),
                                          old_window_size=old),
                requires_grad=table.requires_grad,
            )
            self.register_buffer("relative_position_index",
                                 _ref.relative_position_index(window_size, device=table.device), persistent=False)

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """(1, heads, N, N) gathered bias, as timm's (for inspection; forward gathers in the op)."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*nW, N, C) partitioned windows; mask: (nW, N, N) additive or None -> (B*nW, N, C)."""
        _check_x(x, self.window_area, self.dim)
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # timm's fused branch ignores self.scale (SDPA's default 1/sqrt(d), computed its own way)
        scale = None if self.fused_attn else self.scale
        out = window_attention(q, k, v, self.relative_position_bias_table, self.window_size, mask, scale,
                               dropout_p=_attn_dropout_p(self), sdpa=self.fused_attn, backend=self.backend)
        out = out.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(out))

    def forward_block(self, x: torch.Tensor, shift_size: _int_or_pair = 0) -> torch.Tensor:
        """x: (B, H, W, C), what timm's ``SwinTransformerBlock`` passes to ``_attn`` (``norm1(x)``)
        -> (B, H, W, C), equal to ``block._attn(x)`` for a block whose attention is this module.

        ``self.window_size`` and ``shift_size`` must be the block's (timm shrinks the window to the
        resolution and zeroes the shift where resolution <= window, unless always_partition).
        With ``proj_drop > 0`` in training the dropout mask is drawn over (B, H, W, C) instead of
        timm's padded windows: same distribution, different draws.
        """
        _check_x_block(x, self.dim)
        B, H, W, _ = x.shape
        qkv = self.qkv(x).view(B, H, W, 3, self.num_heads, -1)
        pad_qkv = None if self.qkv.bias is None else self.qkv.bias.view(3, self.num_heads, -1)
        scale = None if self.fused_attn else self.scale
        out = shifted_window_attention(qkv, self.relative_position_bias_table, self.window_size, shift_size,
                                       scale, pad_qkv, dropout_p=_attn_dropout_p(self), sdpa=self.fused_attn,
                                       backend=self.backend)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, backend={self.backend!r}"


class WindowAttentionV2(nn.Module):
    """Swin V2 window attention: scaled cosine attention with a continuous (log-spaced, MLP)
    relative position bias.

    Args (as timm V2): dim, window_size, num_heads, qkv_bias, qkv_bias_separate, attn_drop,
    proj_drop, pretrained_window_size, device, dtype; plus ``backend``. ``window_size`` may also
    be an int here (timm V2's module needs a pair). No ``fused_attn``: timm 1.0.31's V2 module
    has no fused path (always the explicit softmax).
    """

    def __init__(
            self,
            dim: int,
            window_size: _int_or_pair,
            num_heads: int,
            qkv_bias: bool = True,
            qkv_bias_separate: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            pretrained_window_size: _int_or_pair = (0, 0),
            device=None,
            dtype=None,
            backend: str = "auto",
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.backend = backends.check_backend_name(backend)
        self.dim = dim
        self.window_size = pair("window_size", window_size)
        self.pretrained_window_size = pair("pretrained_window_size", pretrained_window_size)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate

        # Registration order = timm's (state_dict key order and the RNG draws of init).
        self.logit_scale = nn.Parameter(torch.empty((num_heads, 1, 1), **dd))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True, **dd),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_heads, bias=False, **dd),
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim, **dd))
            self.register_buffer("k_bias", torch.empty(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.q_bias = None
            self.k_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)  # unused; kept so named_modules() matches timm's

        win_h, win_w = self.window_size
        self.register_buffer("relative_coords_table", torch.empty(1, 2 * win_h - 1, 2 * win_w - 1, 2, **dd),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()
        table, index = self._make_pair_wise_relative_positions(device=self.proj.weight.device,
                                                               dtype=self.proj.weight.dtype)
        self.relative_coords_table.copy_(table)
        self.relative_position_index.copy_(index)

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def _make_pair_wise_relative_positions(self, device=None, dtype=None):
        """(relative_coords_table (1, 2Mh-1, 2Mw-1, 2), relative_position_index (N, N))."""
        table = _ref.cpb_coords_table(self.window_size, self.pretrained_window_size, device=device,
                                      dtype=dtype or torch.float32)
        return table, _ref.relative_position_index(self.window_size, device=device)

    def set_window_size(self, window_size: _int_or_pair) -> None:
        """Change the window; the coordinate tables are recomputed (the MLP needs no resize)."""
        window_size = pair("window_size", window_size)
        if window_size != self.window_size:
            device, dtype = self.relative_coords_table.device, self.relative_coords_table.dtype
            self.window_size = window_size
            table, index = self._make_pair_wise_relative_positions(device=device, dtype=dtype)
            self.register_buffer("relative_coords_table", table, persistent=False)
            self.register_buffer("relative_position_index", index, persistent=False)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        # timm's two bias paths differ in rounding (fused addmm vs add after), so keep both.
        if self.q_bias is None:
            return self.qkv(x)
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
            return qkv
        return F.linear(x, weight=self.qkv.weight, bias=qkv_bias)

    def _rel_pos_table(self) -> torch.Tensor:
        """((2Mh-1)(2Mw-1), heads): the raw cpb_mlp output (16*sigmoid is applied in the op)."""
        return self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*nW, N, C) partitioned windows; mask: (nW, N, N) or None -> (B*nW, N, C)."""
        win_h, win_w = self.window_size
        _check_x(x, win_h * win_w, self.dim)
        B_, N, C = x.shape
        q, k, v = self._qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = window_attention_v2(q, k, v, self.logit_scale, self._rel_pos_table(), self.window_size, mask,
                                  dropout_p=_attn_dropout_p(self), backend=self.backend)
        out = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

    def forward_block(self, x: torch.Tensor, shift_size: _int_or_pair = 0) -> torch.Tensor:
        """x: (B, H, W, C), what timm's ``SwinTransformerV2Block`` passes to ``_attn`` (V2 is
        post-norm: the block's input itself) -> (B, H, W, C), equal to ``block._attn(x)``.
        Same window/shift contract and proj_drop note as :meth:`WindowAttention.forward_block`."""
        _check_x_block(x, self.dim)
        B, H, W, _ = x.shape
        qkv = self._qkv(x).view(B, H, W, 3, self.num_heads, -1)
        pad_qkv = None
        if self.q_bias is not None:
            pad_qkv = torch.cat((self.q_bias, self.k_bias, self.v_bias)).view(3, self.num_heads, -1)
        out = shifted_window_attention_v2(qkv, self.logit_scale, self._rel_pos_table(), self.window_size,
                                          shift_size, pad_qkv, dropout_p=_attn_dropout_p(self), backend=self.backend)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"pretrained_window_size={self.pretrained_window_size}, backend={self.backend!r}")
