"""The Triton kernels compile for Hopper (sm_90) without a GPU, within its shared memory.

The interpreter checks what the kernels compute; this checks that they compile for the real
target (type errors, lowering) at the launch configurations the launchers choose, worst cases
included, and fit the 227 KB of shared memory a Hopper block may use. ``TRITON_INTERPRET``
is global to a process, so the checks run in a fresh one (see ``test_kernels_compile_for_hopper``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

SHARED_LIMIT = 227 * 1024
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("compiled ") == 25, result.stdout  # 4 x 5 attention, 3 evict, 2 prefill


def compile_for_hopper(fn, types: dict, constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    HOPPER = GPUTarget("cuda", 90, 32)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=HOPPER)
    assert compiled.metadata.shared <= SHARED_LIMIT, f"{fn.__name__}: {compiled.metadata.shared} bytes of shared"
    print("compiled", fn.__name__, constexprs, compiled.metadata.shared, "bytes of shared memory")
    return compiled


def check_decode_attention(dtype, head_dim):
    from momentkv.ops import triton_decode_attention as attention

    t = NAMES[dtype]
    worst = attention.launch_config(1, 1, 32768, head_dim, dtype)  # the most splits
    assert worst["splits"] == attention.MAX_SPLITS
    g = dict(HKV=1, G=8, BLOCK_G=16, D=head_dim, DV=head_dim)
    f32 = {name: "*fp32" for name in ("LOGITS", "PART_M", "PART_L", "PART_ACC", "N", "MU_K", "MU_V", "COM",
                                      "FINAL_M", "FINAL_L", "MEAN_LOGIT", "IMP", "NORM", "SINKS", "VRANGE")}
    types = {**f32, "Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "OUT": f"*{t}", "VALID": "*u8", "scale": "fp32",
             "softcap": "fp32", "alpha": "fp32", "moment_weight": "fp32"}
    capped = head_dim == 256  # the soft cap (Gemma 2: head_dim 256) compiled once per dtype
    compile_for_hopper(attention._split_kernel, types, {**g, "BLOCK": worst["block"], "FP32": worst["fp32"],
                                                        "CAPPED": capped})
    for moment_aware in (False, True):
        compile_for_hopper(attention._combine_kernel, types, {**g, "NS_P2": worst["ns_p2"],
                                                              "BLOCK_DV": worst["block_dv"], "CORRECTED": True,
                                                              "MOMENT_AWARE": moment_aware,
                                                              "HAS_SINKS": moment_aware,  # each variant once
                                                              "CAPPED": capped})
        compile_for_hopper(attention._momentum_kernel, types, dict(HKV=1, G=8, BLOCK_G=16,
                                                                   BLOCK=attention.MOMENTUM_BLOCK,
                                                                   MOMENT_AWARE=moment_aware))


def check_evict(score_kind, shared, cap):
    from momentkv.ops import triton_evict as evict

    f32 = {name: "*fp32" for name in ("IMP", "NORM", "N", "MU_K", "MU_V", "COM", "VRANGE")}
    types = {**f32, "K": "*bf16", "V": "*bf16", "VALID": "*u8", "EVICTABLE": "*u8", "POS": "*i64", "FREE": "*i64",
             "DECODE_LEN": "*i64", "SEEN": "*i64"}
    compile_for_hopper(evict._evict_kernel, types, dict(H=8, D=256, DV=256, BLOCK=evict.BLOCK_S, BLOCK_DV=32,
                                                        SCORE_KIND=score_kind, SHARED=shared, FOLD=True, CAP=cap))


def check_prefill_scores():
    from momentkv.ops import triton_prefill_scores as prefill

    types = {"Q": "*bf16", "K": "*bf16", "KEY_VALID": "*u8", "STAT_M": "*fp32", "STAT_L": "*fp32", "DECAY": "*fp32",
             "IMP": "*fp32", "NORM": "*fp32", "scale": "fp32", "softcap": "fp32"}
    meta = dict(HKV=8, G=4, BLOCK_G=16, D=128, BLOCK=prefill.BLOCK_L, FP32=False)
    compile_for_hopper(prefill._stats_kernel, types, {**meta, "CAPPED": False})
    compile_for_hopper(prefill._scores_kernel, types, {**meta, "CAPPED": True})


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1"
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (64, 256):
            check_decode_attention(dtype, head_dim)
    from momentkv.ops.scores import HASH, NORMALIZED, STORED

    check_evict(NORMALIZED, False, 0)
    check_evict(STORED, True, 8)
    check_evict(HASH, True, 0)
    check_prefill_scores()
