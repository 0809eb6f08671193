"""Hugging Face transformers Swin / Swinv2 support for :func:`fastswin.patch`.

The HF models partition their windows themselves (``SwinLayer`` / ``Swinv2Layer``: pad, then
roll, then partition, a ``-100`` shift mask built for the padded size) and hand the attention
module windows ``(B*nW, N, C)`` and the mask ``(nW, N, N)``. The patched ``forward`` therefore
keeps all of that (each host keeps its own pad/roll order and mask) and replaces only the
attention between the projections with fastswin's *windowed* op:

* ``transformers.models.swin.modeling_swin.SwinAttention`` (transformers 5.x: ``q_proj`` /
  ``k_proj`` / ``v_proj`` / ``o_proj``, ``relative_position_bias``, the attention-interface
  forward ``(hidden_states, attention_mask=None, **kwargs) -> (output, weights)``):
  ``q/k/v proj -> fastswin.functional.window_attention -> o_proj``. ``sdpa`` models compute as
  SDPA (``sdpa=True`` in the reference), ``eager`` ones as the explicit path (HF's eager softmax
  runs in float32 even for float64 models: the patched one runs in the model's dtype).
* ``transformers.models.swinv2.modeling_swinv2.Swinv2SelfAttention`` (forward
  ``(hidden_states, attention_mask=None, output_attentions=False) -> (context,)``):
  ``query/key/value -> fastswin.functional.window_attention_v2`` with HF's ``logit_scale``, its
  ``continuous_position_bias_mlp(relative_coords_table)`` (so ``pretrained_window_size`` is HF's
  own table) and HF's mask **added twice** (HF's forward adds ``attention_mask`` two times, so the
  masked logits get -200: the patched path passes ``mask + mask``).

Falls back to the original forward (``RuntimeWarning``) for ``output_attentions=True``, unknown
keyword arguments, an attention implementation other than ``eager``/``sdpa``, or inputs whose
shapes do not match the module's window. An unrecognised forward signature (another
transformers version) makes :func:`fastswin.patch` raise ``TypeError`` naming the class.

transformers is never imported here: the classes are looked up in ``sys.modules`` (a model that
holds them has imported them).
"""
from __future__ import annotations

import inspect
import sys
from typing import Optional

import torch
import torch.nn as nn

from ._checks import pair
from .functional.window_attention import window_attention, window_attention_v2

V1_MODULE = "transformers.models.swin.modeling_swin"
V2_MODULE = "transformers.models.swinv2.modeling_swinv2"

# parameter (name, kind) lists of the forwards this file knows
_P = inspect.Parameter
_V1_SIG = [("self", _P.POSITIONAL_OR_KEYWORD), ("hidden_states", _P.POSITIONAL_OR_KEYWORD),
           ("attention_mask", _P.POSITIONAL_OR_KEYWORD), ("kwargs", _P.VAR_KEYWORD)]
_V2_SIG = [("self", _P.POSITIONAL_OR_KEYWORD), ("hidden_states", _P.POSITIONAL_OR_KEYWORD),
           ("attention_mask", _P.POSITIONAL_OR_KEYWORD), ("output_attentions", _P.POSITIONAL_OR_KEYWORD)]
# keyword arguments SwinAttention may receive that do not change its result
_V1_IGNORED_KW = {"output_attentions", "output_hidden_states"}
SUPPORTED = ("transformers SwinAttention (models.swin) / Swinv2SelfAttention (models.swinv2)")


def _version() -> str:
    t = sys.modules.get("transformers")
    return getattr(t, "__version__", "?")


def _sig(fn):
    try:
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return None


def _unknown(cls_name: str, why: str):
    def check(m):
        return f"unrecognised {cls_name} ({why}; transformers {_version()}): only transformers 5.x is supported"
    return check


def _check_v1(m) -> Optional[str]:
    mod = sys.modules[V1_MODULE]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if type(getattr(m, name, None)) is not nn.Linear:
            return f"{name} is not an nn.Linear"
    rpb = getattr(m, "relative_position_bias", None)
    if rpb is None or type(rpb).forward is not mod.SwinRelativePositionBias.forward:
        return "relative_position_bias is not transformers' SwinRelativePositionBias"
    for name in ("head_dim", "scaling", "attention_dropout", "config"):
        if not hasattr(m, name):
            return f"has no attribute {name!r}"
    return None


def _check_v2(m) -> Optional[str]:
    for name in ("query", "key", "value"):
        if type(getattr(m, name, None)) is not nn.Linear:
            return f"{name} is not an nn.Linear"
    for name in ("logit_scale", "continuous_position_bias_mlp", "relative_coords_table", "window_size",
                 "num_attention_heads", "attention_head_size", "dropout"):
        if not hasattr(m, name):
            return f"has no attribute {name!r}"
    return None


def targets():
    """Entries for ``fastswin._patch._targets``: (kind, class, attr, original, check) where check(m)
    returns a reason the module cannot be patched, or None."""
    out = []
    v2 = sys.modules.get(V2_MODULE)
    if v2 is not None:
        cls = getattr(v2, "Swinv2SelfAttention", None)
        if cls is not None:
            sig = _sig(cls.forward)
            check = (_check_v2 if sig == _V2_SIG
                     else _unknown("Swinv2SelfAttention", f"forward{inspect.signature(cls.forward)}"))
            out.append(("hf_v2", cls, "forward", cls.forward, check))
    v1 = sys.modules.get(V1_MODULE)
    if v1 is not None:
        cls = getattr(v1, "SwinAttention", None)
        if cls is not None and _sig(cls.forward) == _V1_SIG:
            out.append(("hf_v1", cls, "forward", cls.forward, _check_v1))
        else:
            # transformers 4.x (SwinSelfAttention inside SwinAttention) or another layout
            for name in ("SwinSelfAttention", "SwinAttention"):
                c = getattr(v1, name, None)
                if c is not None:
                    out.append(("hf_v1", c, "forward", c.forward,
                                _unknown(name, f"forward{inspect.signature(c.forward)}")))
                    break
    return out


def _windows(self, hidden_states, attention_mask, window):
    """Reason to fall back, or None, for the windowed input and mask."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        return "hidden_states is not a 3-D (B*nW, N, C) tensor"
    n = window[0] * window[1]
    if hidden_states.shape[1] != n:
        return f"{hidden_states.shape[1]} tokens per window, the attention's window {window} has {n}"
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 3 \
                or tuple(attention_mask.shape[1:]) != (n, n) or hidden_states.shape[0] % attention_mask.shape[0]:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            return f"attention_mask of shape {shape} is not (nW, {n}, {n})"
    return None


def _heads(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def hf_v1(self, hidden_states, attention_mask=None, **kwargs):
    attn = self.owner
    impl = getattr(attn.config, "_attn_implementation", None)
    extra = sorted(set(kwargs) - _V1_IGNORED_KW)
    window = pair("window_size", attn.relative_position_bias.window_size)
    why = None
    if kwargs.get("output_attentions"):
        why = "output_attentions=True (the fused op does not form the attention probabilities)"
    elif extra:
        why = f"keyword arguments {extra} are not supported by the patched path"
    elif impl not in ("eager", "sdpa"):
        why = f"attention implementation {impl!r} (only 'eager' and 'sdpa' are patched)"
    else:
        why = _windows(self, hidden_states, attention_mask, window)
    if why is None and hidden_states.shape[-1] != attn.q_proj.in_features:
        why = "hidden_states' channels differ from q_proj's"
    if why is not None:
        return self.fallback(hidden_states, why, attention_mask, **kwargs)
    d = attn.head_dim
    heads = attn.q_proj.out_features // d
    q = _heads(attn.q_proj(hidden_states), heads)
    k = _heads(attn.k_proj(hidden_states), heads)
    v = _heads(attn.v_proj(hidden_states), heads)
    p = float(attn.attention_dropout) if attn.training else 0.0
    out = window_attention(q, k, v, attn.relative_position_bias.relative_position_bias_table, window, attention_mask,
                           attn.scaling, dropout_p=p, sdpa=impl == "sdpa", backend=self.backend)
    out = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
    return attn.o_proj(out), None


def hf_v2(self, hidden_states, attention_mask=None, output_attentions=False):
    attn = self.owner
    window = pair("window_size", attn.window_size)
    drop = attn.dropout
    if output_attentions:
        why = "output_attentions=True (the fused op does not form the attention probabilities)"
    elif type(drop) not in (nn.Dropout, nn.Identity):
        why = f"dropout is a {type(drop).__name__}, not an nn.Dropout"
    else:
        why = _windows(self, hidden_states, attention_mask, window)
    if why is not None:
        return self.fallback(hidden_states, why, attention_mask, output_attentions)
    heads = attn.num_attention_heads
    q = _heads(attn.query(hidden_states), heads)
    k = _heads(attn.key(hidden_states), heads)
    v = _heads(attn.value(hidden_states), heads)
    table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, heads)
    # HF's Swinv2SelfAttention adds attention_mask to the scores twice (-200 where masked)
    mask = None if attention_mask is None else attention_mask + attention_mask
    p = float(drop.p) if (type(drop) is nn.Dropout and drop.training) else 0.0
    out = window_attention_v2(q, k, v, attn.logit_scale, table, window, mask, dropout_p=p, backend=self.backend)
    out = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], heads * out.shape[-1])
    return (out,)


IMPL = {"hf_v1": hf_v1, "hf_v2": hf_v2}
