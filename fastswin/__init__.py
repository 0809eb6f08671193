"""fastswin: fused attention kernels for Swin Transformer V1/V2 and DAT/DAT++.

Modules (drop-in for the originals, same parameter and buffer names):

* :class:`fastswin.WindowAttention` -- timm ``swin_transformer.WindowAttention``
* :class:`fastswin.WindowAttentionV2` -- timm ``swin_transformer_v2.WindowAttention``
* :class:`fastswin.DeformableAttention` -- LeapLabTHU/DAT ``DAttentionBaseline`` (``variant="dat"|"dat++"``)

Whole models: :func:`fastswin.patch` (timm / torchvision Swin V1 and V2, in place, state_dict
unchanged) and :func:`fastswin.unpatch`; DAT / DAT++ backbones: :mod:`fastswin.models`. FLOP
counting: ``FlopCounterMode`` counts the fused ops out of the box, fvcore with
:func:`fastswin.fvcore_handles` / :func:`fastswin.count_flops_fvcore`. Functions: :mod:`fastswin.functional`. Backend choice: :mod:`fastswin.backends`. Plain PyTorch
oracle: :mod:`fastswin.reference`.
"""
from ._lazy import lazy_exports
from .backends import BackendUnavailableError  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "WindowAttention": ".modules.window_attention",
    "WindowAttentionV2": ".modules.window_attention",
    "DeformableAttention": ".modules.deformable_attention",
    "patch": "._patch",
    "unpatch": "._patch",
    "is_patched": "._patch",
    "count_flops_fvcore": ".ops.fvcore_handles",
    "fvcore_handles": ".ops.fvcore_handles",
    "functional": ".functional",
    "reference": ".reference",
    "backends": ".backends",
    "models": ".models",
}
__all__ = sorted(_EXPORTS) + ["BackendUnavailableError", "__version__"]


def __getattr__(name):
    if name in ("functional", "reference", "backends", "models"):
        import importlib

        return importlib.import_module("." + name, __name__)
    return _getattr(name)


_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)
