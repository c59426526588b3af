"""CUDA kernels: the Triton implementations, registered as each op's CUDA kernel.

Imported by ``momentkv.ops`` only when Triton and a CUDA device are present; the kernel
modules themselves import on any machine (tests run them under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from .decode_step import compose_step
from .kernels import register
from .triton_decode_attention import decode_attention_triton
from .triton_evict import evict_triton
from .triton_prefill_scores import prefill_scores_triton


def register_triton_kernels() -> None:
    register("decode_attention", "cuda", decode_attention_triton)
    register("evict", "cuda", evict_triton)
    register("decode_step", "cuda", compose_step(decode_attention_triton, evict_triton))
    register("prefill_scores", "cuda", prefill_scores_triton)
