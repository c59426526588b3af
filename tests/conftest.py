"""Tiny random models of every supported architecture, loaded through ``from_pretrained``."""

from __future__ import annotations

import os

# Tests run the eager reference kernels (no per-shape inductor compile); test_cpu_kernels checks the fused ones.
os.environ.setdefault("MOMENTKV_CPU_KERNEL", "reference")
# Without a GPU the Triton kernels run under the interpreter. Triton reads this once, when first used
# (torch may use it before any test does), so it is set here, before anything imports torch.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import transformers

from momentkv.evals.tiny_fidelity import BINDING_SOFT_CAP

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.2)

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # initializer ranges chosen so that greedy output depends on the cache (checked: a budget of 2 changes it)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16, "initializer_range": 0.5}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 16, "num_hidden_layers": 3, "sliding_window": 6, "initializer_range": 0.02,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    # attention-logit soft-capping at a cap that binds: decoded without the cap, greedy output differs (checked)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "num_hidden_layers": 3, "sliding_window": 6, **BINDING_SOFT_CAP,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}


def build_tiny(arch: str, folder, dtype: torch.dtype = torch.float32):
    """Build a random model from its config, save it as safetensors and load it back."""
    config_name, model_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**{**SMALL, **extra})
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(folder, safe_serialization=True)
    return getattr(transformers, model_name).from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch)`` -> a freshly loaded (unpatched) model; files are saved once per arch."""
    folders = {}

    def load(arch: str, dtype: torch.dtype = torch.float32):
        if arch not in folders:
            folders[arch] = tmp_path_factory.mktemp(arch)
            return build_tiny(arch, folders[arch], dtype)
        _, model_name, _ = ARCHITECTURES[arch]
        return getattr(transformers, model_name).from_pretrained(folders[arch], dtype=dtype).eval()

    return load


def left_padded_batch(lengths=(9, 5, 12), vocab: int = 96, seed: int = 0):
    """A batch of prompts of different lengths, left-padded with token 0."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids, mask
