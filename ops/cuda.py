"""CUDA kernels: the Triton implementations, registered as each op's CUDA kernel.

Imported by ``momentkv.ops`` only when Triton and a CUDA device are present; the kernel
modules themselves import on any machine (tests run them under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from .kernels import register
from .prefill import prefill_scores
from .signature import by_name
from .step import compose_step
from .triton_decode_attention import decode_attention_triton
from .triton_evict import evict_triton
from .triton_prefill_scores import prefill_scores_triton


def register_triton_kernels() -> None:
    """The write stays the reference (a few indexing kernels, which CUDA graphs replay)."""
    register("decode_attention", "cuda", by_name(decode_attention_triton))
    register("evict", "cuda", by_name(evict_triton))
    register("decode_step", "cuda", by_name(compose_step(decode_attention_triton, evict_triton)))
    prefill_scores.register_kernel("cuda")(prefill_scores_triton)
