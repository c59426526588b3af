"""Fidelity against the full cache, measured through ``generate()`` itself.

Teacher forcing: the compressed model is driven along the full-cache greedy tokens by a
logits processor that records the model's own prediction, then forces the reference token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel


class TeacherForcing(LogitsProcessor):
    """Records top-1 agreement and KL(reference || model) at each step, then forces the reference token."""

    def __init__(self, reference: Tensor, reference_logits: Tensor | None = None):
        self.reference, self.reference_logits = reference, reference_logits
        self.agree: list[Tensor] = []
        self.kl: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = len(self.agree)
        target = self.reference[:, step].to(scores.device)
        self.agree.append(scores.argmax(-1) == target)
        if self.reference_logits is not None:
            log_q = torch.log_softmax(scores.float(), -1)
            log_p = torch.log_softmax(self.reference_logits[:, step].float().to(scores.device), -1)
            terms = log_p.exp() * (log_p - log_q)
            self.kl.append(torch.where(torch.isfinite(log_p), terms, 0.0).sum(-1))
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, target[:, None], 0.0)


@dataclass
class Fidelity:
    top1: float  # fraction of steps whose argmax equals the full-cache token
    kl: float  # mean KL(full || compressed) per step
    steps: int


def full_cache_reference(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                         new_tokens: int) -> tuple[Tensor, Tensor]:
    """Greedy tokens [B, T] and their scores [B, T, V] with the model's ordinary cache.

    Scores are taken after generate's own processors (``min_new_tokens`` masks EOS), exactly as
    :class:`TeacherForcing` sees them, so both sides compare the same distributions."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=model.generation_config.pad_token_id or 0)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.scores, dim=1)


def teacher_forced(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, reference: Tensor,
                   reference_logits: Tensor | None = None) -> Fidelity:
    """Drive ``model`` (patched or not) along ``reference`` and compare its predictions step by step."""
    forcing = TeacherForcing(reference, reference_logits)
    steps = reference.shape[1]
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                   do_sample=False, logits_processor=LogitsProcessorList([forcing]),
                   pad_token_id=model.generation_config.pad_token_id or 0)
    agree = torch.stack(forcing.agree, 1).float()
    kl = torch.stack(forcing.kl, 1).mean().item() if forcing.kl else float("nan")
    return Fidelity(top1=agree.mean().item(), kl=kl, steps=steps)
