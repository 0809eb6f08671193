"""Host-side choices shared by every Triton kernel launcher."""
from typing import Optional

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and log-sum-exp) dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> Optional[str]:
    """``tl.dot``'s ``input_precision``. fp32: IEEE unless the user allowed tf32 for matmuls
    (torch's own rule); under the interpreter every dot is an exact numpy matmul anyway. Half
    types: Triton's default (tensor cores)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    return None


# Triton's software-pipelining depth on CUDA when a launch names none.
DEFAULT_NUM_STAGES = 3


def num_stages(iterations: int) -> int:
    """Pipelining depth of a kernel whose main loop runs ``iterations`` times, when that count is
    a runtime value (Triton cannot see it is 1 and pipelines anyway). Pipelining stages every load
    of the loop through shared memory to overlap it with the previous iteration; one iteration
    has nothing to overlap, so the buffers only cost occupancy: 1 stage then, Triton's default
    otherwise. Measured with ``scripts/triton_sm90_compile.py`` (sm_90, bf16, Ns = 49 keys, the
    rpe table sampled in the kernel): DAT's forward needs 155,648 B of shared memory at 3 stages
    (one 4-warp block per SM), 24,576 B at 1 (nine). Window attention needs no such rule: its loop
    bound is a compile-time constant and Triton drops the pipelining of a one-trip loop itself."""
    return 1 if iterations <= 1 else DEFAULT_NUM_STAGES
