"""What the Triton kernels share about how they compute."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def dots_in_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` runs on fp32 operands (IEEE): for fp32 inputs, and for bf16 under
    ``TRITON_INTERPRET=1``, whose bf16 ``tl.dot`` is wrong in triton 3.9 (fp16 is exact).
    On a GPU, bf16 and fp16 use tensor-core dots with fp32 accumulation."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return dtype == torch.float32 or (interpreting and dtype == torch.bfloat16)


def tiles(*head_dims: int) -> bool:
    """Whether the kernels can tile these head sizes: ``tl.arange`` spans powers of two (16 and up for
    ``tl.dot``). Other sizes (Phi-3's 96, an MLA value head of 24) run the reference kernel, exact but slower."""
    return all(d >= 16 and d & (d - 1) == 0 for d in head_dims)


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)`` (the reference's ``ops.attention.soft_cap``) and its slope ``1 - tanh(x / cap)^2``;
    tanh from one exponential of a non-positive number, which neither overflows nor loses the sign."""
    e = tl.exp(-2.0 * tl.abs(x / cap))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return cap * t, 1.0 - t * t
