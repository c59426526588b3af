"""What the Triton kernels share about how they compute."""

from __future__ import annotations

import os

import torch


def dots_in_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` runs on fp32 operands (IEEE): for fp32 inputs, and for bf16 under
    ``TRITON_INTERPRET=1``, whose bf16 ``tl.dot`` is wrong in triton 3.9 (fp16 is exact).
    On a GPU, bf16 and fp16 use tensor-core dots with fp32 accumulation."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return dtype == torch.float32 or (interpreting and dtype == torch.bfloat16)
