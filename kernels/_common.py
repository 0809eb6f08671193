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
