"""Input validation shared by every public entry point.

Every check raises ``ValueError`` / ``TypeError`` whose message starts with the
argument's name and says what was expected and what was given, e.g.::

    ValueError: q: expected a 4-D tensor (B*nW, heads, N, head_dim), got shape (2, 3, 49)

Checks run in Python on shapes and dtypes only (no device sync), except
:func:`check_finite`, which reads the data and is therefore opt-in
(``FASTSWIN_CHECK_FINITE=1``, on by default under pytest via ``tests/conftest.py``).
"""
from __future__ import annotations

import collections.abc
import operator
import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    layout: str = "",
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` and an allowed dtype.

    ``layout`` names the dimensions for the error message (``"(B, H, W, C)"``).
    ``shape`` may pin some sizes; ``None`` entries are free.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {_shape(t)}".replace("  ", " "))
    if dtypes and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name}: expected size {want} in dimension {i} {layout}, got shape {_shape(t)}".replace("  ", " ")
                )
    return t


def check_same(names: Sequence[str], tensors: Iterable[torch.Tensor], *, device: bool = True, dtype: bool = True) -> None:
    """All tensors on one device and (optionally) of one dtype."""
    tensors = list(tensors)
    first_name, first = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t is None:
            continue
        if device and t.device != first.device:
            raise ValueError(f"{n}: expected device {first.device} (the device of {first_name}), got {t.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(
                f"{n}: expected dtype {str(first.dtype).replace('torch.', '')} (the dtype of {first_name}), "
                f"got {str(t.dtype).replace('torch.', '')}"
            )


def autocast_on(device_type: str) -> bool:
    """Is autocast enabled for this device type? (False for types autocast does not know, e.g. meta.)"""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def finite_checks_enabled() -> bool:
    return os.environ.get("FASTSWIN_CHECK_FINITE", "0") not in ("", "0", "false", "False")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or Inf. Costs a device sync, so only runs when
    ``FASTSWIN_CHECK_FINITE=1``; under ``torch.compile`` tracing it is skipped."""
    if not finite_checks_enabled() or t is None:
        return
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf (set FASTSWIN_CHECK_FINITE=0 to skip this check)")


def _int(name: str, x, v) -> int:
    # bool (and numpy's bool_) index like 0/1 but a window of True is a bug, not a size.
    if isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_")) or (
            isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got a bool in {v!r}")
    try:
        return operator.index(x)  # int, numpy integers, 0-d integer tensors; not float
    except TypeError:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}") from None


def pair(name: str, v) -> tuple:
    """timm's ``to_2tuple`` for sizes: an integer ``x -> (x, x)``; an iterable (not a str) of two
    integers -> that pair. Integers are anything with ``__index__`` (Python and numpy integers,
    0-d integer tensors), so ``np.int64(7)`` and ``np.array([5, 5])`` work as in timm; the result
    holds Python ints. Bools, floats, strings and other lengths raise naming ``name``."""
    if isinstance(v, str) or not isinstance(v, collections.abc.Iterable) or (isinstance(v, torch.Tensor) and v.dim() == 0) or (
            getattr(v, "ndim", None) == 0):
        x = _int(name, v, v)
        return (x, x)
    items = tuple(v)
    if len(items) != 2:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r} ({len(items)} values)")
    return (_int(name, items[0], v), _int(name, items[1], v))
