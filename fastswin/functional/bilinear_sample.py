"""``fastswin.functional.bilinear_sample``: DAT's bilinear sampling, one entry for every backend.

See :mod:`fastswin.reference.bilinear` for the exact formula. Backends: ``reference``
(``F.grid_sample``), ``cuda`` (the compiled ``fastswin._C`` op: C++ on CPU tensors, CUDA on CUDA
tensors; registered in :mod:`fastswin.ops.bilinear_sample`).
"""
from __future__ import annotations

import torch

from .. import backends
from .._checks import autocast_on, check_finite, check_same, check_tensor
from ..reference import bilinear as _ref

OP = "bilinear_sample"


backends.register(OP, "reference", reasons=backends.always_able)(_ref.bilinear_sample)


def validate(feat: torch.Tensor, pos: torch.Tensor) -> None:
    check_tensor("feat", feat, ndim=4, layout="(N, C, H, W)")
    check_tensor("pos", pos, ndim=4, layout="(N, Hk, Wk, 2)", shape=(feat.shape[0], None, None, 2))
    # Under autocast grid_sample runs in float32 whatever the mix (the op registers the same
    # autocast rule), so mixed dtypes are legal there, as they are for grid_sample.
    check_same(("feat", "pos"), (feat, pos), dtype=not autocast_on(feat.device.type))
    if feat.shape[2] < 1 or feat.shape[3] < 1:
        raise ValueError(f"feat: expected H >= 1 and W >= 1, got shape {tuple(feat.shape)}")
    check_finite("pos", pos)
    check_finite("feat", feat)


def bilinear_sample(feat: torch.Tensor, pos: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sample ``feat`` (N, C, H, W) at ``pos`` (N, Hk, Wk, 2), positions in DAT's (y, x) order,
    normalized to [-1, 1] with align_corners=True, zero padding. Returns (N, C, Hk, Wk).

    Differentiable with respect to both ``feat`` and ``pos``.
    """
    validate(feat, pos)
    # Importing registers the compiled backend (only if the extension loads).
    from ..ops import bilinear_sample as _ops  # noqa: F401

    return backends.dispatch(OP, backend, feat, pos)


# The Triton backend registers itself (it imports triton only on first use).
from ..ops import bilinear_sample_triton as _triton_ops  # noqa: E402,F401  (registers the "triton" backend)
