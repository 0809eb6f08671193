"""``torch.ops.fastswin.bilinear_sample``: fake kernels, autograd, and the ``"cuda"`` backend.

The op and its C++ kernels live in the compiled extension ``fastswin._C`` (schemas in
``csrc/ops.cpp``, kernels in ``csrc/bilinear_sample/``: C++ with ``at::parallel_for`` for CPU
tensors, CUDA for CUDA tensors). This module adds what the dispatcher needs from Python:

* fake (meta) kernels for ``bilinear_sample`` and ``bilinear_sample_backward``, so
  ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work;
* autograd: ``d/dfeat`` and ``d/dpos`` through ``bilinear_sample_backward``, with
  ``deterministic=torch.are_deterministic_algorithms_enabled()`` (read when the backward runs, or,
  under ``torch.compile``, when it is traced). On CUDA the default backward scatters into
  ``grad_feat`` with atomics (fast, order-dependent in the last bits); deterministic mode uses
  no atomics and is bitwise reproducible. The CPU backward is always deterministic.
* the ``"cuda"`` backend of :func:`fastswin.functional.bilinear_sample`.

Shapes: ``feat`` (N, C, H, W), ``pos`` (N, Hk, Wk, 2) in DAT's (y, x) order, normalized to
[-1, 1] with ``align_corners=True``, zero padding; output (N, C, Hk, Wk)::

    out = F.grid_sample(feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros", align_corners=True)

Under ``torch.autocast`` (CPU or CUDA) it runs in float32, as ``F.grid_sample`` does.

NaN / Inf positions give what the CPU ``grid_sample`` (float32/float64) gives: NaN outputs, no
``grad_feat`` contribution, NaN in the other coordinate's ``grad_pos`` (``csrc/bilinear_sample/
bilinear_sample.h`` has the rule; the CUDA ``grid_sample`` may differ).

Double backward is not supported: differentiating the gradients (``create_graph=True`` and a
second ``backward``) raises ``RuntimeError``.

Without the extension this module still imports; it registers nothing with ``torch.library``,
and the ``"cuda"`` backend's reasons say why it cannot run.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .. import _extension, backends

OP = "bilinear_sample"
QUALNAME = "fastswin::bilinear_sample"
BACKWARD_QUALNAME = "fastswin::bilinear_sample_backward"


def _reasons(feat, pos) -> List[str]:
    return backends.compiled_extension_reasons(feat, pos, op=OP)


AVAILABLE = _extension.has_op(OP) and _extension.has_op(OP + "_backward")

if AVAILABLE:

    def _check_fake(feat: torch.Tensor, pos: torch.Tensor) -> None:
        # Mirrors check_bilinear_sample_inputs in csrc (same checks, same order, same argument
        # names in the messages); torch._check keeps symbolic sizes symbolic under torch.compile.
        torch._check(feat.dim() == 4, lambda: f"fastswin::bilinear_sample: feat: expected a 4-D tensor (N, C, H, W), got shape {tuple(feat.shape)}")
        torch._check(pos.dim() == 4, lambda: f"fastswin::bilinear_sample: pos: expected a 4-D tensor (N, Hk, Wk, 2), got shape {tuple(pos.shape)}")
        torch._check(pos.shape[3] == 2, lambda: f"fastswin::bilinear_sample: pos: expected size 2 in the last dimension ((y, x)), got shape {tuple(pos.shape)}")
        torch._check(pos.shape[0] == feat.shape[0], lambda: f"fastswin::bilinear_sample: pos: expected batch size {feat.shape[0]} (the N of feat), got shape {tuple(pos.shape)}")
        torch._check(feat.dtype.is_floating_point, lambda: f"fastswin::bilinear_sample: feat: expected a floating dtype (float64, float32, float16, bfloat16), got {feat.dtype}")
        torch._check(pos.dtype == feat.dtype, lambda: f"fastswin::bilinear_sample: pos: expected dtype {feat.dtype} (the dtype of feat), got {pos.dtype}")
        torch._check(pos.device == feat.device, lambda: f"fastswin::bilinear_sample: pos: expected device {feat.device} (the device of feat), got {pos.device}")
        torch._check(feat.shape[2] >= 1, lambda: f"fastswin::bilinear_sample: feat: expected H >= 1 and W >= 1, got shape {tuple(feat.shape)}")
        torch._check(feat.shape[3] >= 1, lambda: f"fastswin::bilinear_sample: feat: expected H >= 1 and W >= 1, got shape {tuple(feat.shape)}")

    def _check_fake_grad(grad_out: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor) -> None:
        # Mirrors check_bilinear_sample_grad in csrc.
        _check_fake(feat, pos)
        want = (feat.shape[0], feat.shape[1], pos.shape[1], pos.shape[2])
        msg = lambda: f"fastswin::bilinear_sample_backward: grad_out: expected shape {tuple(want)} (N, C, Hk, Wk), got shape {tuple(grad_out.shape)}"  # noqa: E731
        torch._check(grad_out.dim() == 4, msg)
        for got, expected in zip(grad_out.shape, want):  # one check per size: symbolic sizes stay symbolic
            torch._check(got == expected, msg)
        torch._check(grad_out.dtype == feat.dtype, lambda: f"fastswin::bilinear_sample_backward: grad_out: expected dtype {feat.dtype} (the dtype of feat), got {grad_out.dtype}")
        torch._check(grad_out.device == feat.device, lambda: f"fastswin::bilinear_sample_backward: grad_out: expected device {feat.device} (the device of feat), got {grad_out.device}")

    @torch.library.register_fake(QUALNAME)
    def _bilinear_sample_fake(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        _check_fake(feat, pos)
        return feat.new_empty((feat.shape[0], feat.shape[1], pos.shape[1], pos.shape[2]))

    @torch.library.register_fake(BACKWARD_QUALNAME)
    def _bilinear_sample_backward_fake(grad_out, feat, pos, feat_requires_grad, pos_requires_grad, deterministic):
        _check_fake_grad(grad_out, feat, pos)
        # Gradients not asked for come back as empty (0,) tensors (see csrc/ops.cpp).
        grad_feat = feat.new_empty(feat.shape if feat_requires_grad else (0,))
        grad_pos = pos.new_empty(pos.shape if pos_requires_grad else (0,))
        return grad_feat, grad_pos

    def _setup_context(ctx, inputs, output) -> None:
        feat, pos = inputs
        ctx.save_for_backward(feat, pos)

    def _backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feat, pos = ctx.saved_tensors
        need_feat, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_feat, grad_pos = torch.ops.fastswin.bilinear_sample_backward(
            grad_out, feat, pos, need_feat, need_pos, torch.are_deterministic_algorithms_enabled()
        )
        return (grad_feat if need_feat else None), (grad_pos if need_pos else None)

    torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)

    # The backward op gets an autograd formula only to fail clearly on double backward (without
    # one, PyTorch would warn and return wrong/None second derivatives).
    def _double_backward(ctx, grad_grad_feat, grad_grad_pos):
        raise RuntimeError(
            "fastswin::bilinear_sample: double backward (differentiating its gradients, "
            "create_graph=True) is not supported; use backend='reference' (F.grid_sample) for it"
        )

    def _setup_context_backward(ctx, inputs, output) -> None:
        pass

    torch.library.register_autograd(BACKWARD_QUALNAME, _double_backward, setup_context=_setup_context_backward)

    # Autocast: like ATen's grid_sampler (on autocast's fp32 list for CPU and CUDA), the op runs in
    # float32 under torch.autocast: float16/bfloat16 inputs on the autocast device are cast to
    # float32 (float64 ones are left alone), and the output is float32. Gradients flow back
    # through the casts to the low-precision inputs. (torch >= 2.7 has register_autocast; older
    # versions cast in bilinear_sample() below, which covers the functional entry only.)
    _AUTOCAST_DEVICES = ("cpu", "cuda")
    _HAS_REGISTER_AUTOCAST = hasattr(torch.library, "register_autocast")
    if _HAS_REGISTER_AUTOCAST:
        for _device_type in _AUTOCAST_DEVICES:
            torch.library.register_autocast(QUALNAME, _device_type, torch.float32)

    def _autocast_fp32(t: torch.Tensor) -> torch.Tensor:
        dev = t.device.type
        if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev) and t.dtype in (torch.float16, torch.bfloat16):
            return t.float()
        return t

    def bilinear_sample(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """feat (N, C, H, W), pos (N, Hk, Wk, 2) in (y, x) order -> (N, C, Hk, Wk), via the compiled op."""
        if not _HAS_REGISTER_AUTOCAST:
            feat, pos = _autocast_fp32(feat), _autocast_fp32(pos)
        return torch.ops.fastswin.bilinear_sample(feat, pos)

else:

    def bilinear_sample(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Placeholder: the compiled extension is missing (``backends.select`` never calls it, its
        reasons are not empty)."""
        raise backends.BackendUnavailableError(
            "backend 'cuda' cannot run bilinear_sample: " + "; ".join(_reasons(feat, pos) or ["fastswin._C has no bilinear_sample op"])
        )


def _auto_reasons(feat, pos) -> List[str]:
    # On CPU tensors auto keeps ATen's grid_sample (the reference backend): since the chunked CPU
    # forward (taps computed once per sample, channels inner) the C++ forward is on par with it, but
    # its backward is still slower (python -m benchmarks.run --op bilinear_sample, fp32, loaded 2-core
    # x86: dat_t_s3 at batch 4 forward 0.65 vs 0.66 ms, fwd+bwd 15 vs 9 ms), so auto leaves the C++
    # kernel to backend="cuda" by name.
    if feat.device.type == "cpu":
        return ["on CPU tensors ATen's grid_sample (reference) is faster than the C++ kernel (its backward)"]
    return []


backends.register(OP, "cuda", reasons=_reasons, auto_reasons=_auto_reasons)(bilinear_sample)
