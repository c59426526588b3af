"""Fidelity against the full cache, measured through ``generate()`` itself.

Teacher forcing: the compressed model is driven along reference tokens by a logits processor
that records the model's own prediction, then forces the reference token. Rows of the batch
beyond the reference run free, so one pass yields teacher-forced and free-run outputs together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel


class TeacherForcing(LogitsProcessor):
    """Per step, for the first ``len(reference)`` rows: the model's own top-1 token, its agreement with the
    reference, the reference token's log-probability and, given reference log-probabilities,
    KL(reference || model); then forces the reference token on those rows. Other rows are left to choose freely."""

    def __init__(self, reference: Tensor, reference_logprobs: Tensor | None = None):
        self.reference, self.reference_logprobs = reference, reference_logprobs
        self.predicted: list[Tensor] = []
        self.agree: list[Tensor] = []
        self.logprob: list[Tensor] = []
        self.kl: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step, rows = len(self.agree), self.reference.shape[0]
        target = self.reference[:, step].to(scores.device)
        log_q = torch.log_softmax(scores[:rows].float(), -1)
        self.predicted.append(scores[:rows].argmax(-1))
        self.agree.append(self.predicted[-1] == target)
        self.logprob.append(log_q.gather(-1, target[:, None]).squeeze(-1))
        if self.reference_logprobs is not None:
            log_p = torch.log_softmax(self.reference_logprobs[:, step].float().to(scores.device), -1)
            terms = log_p.exp() * (log_p - log_q)
            self.kl.append(torch.where(torch.isfinite(log_p), terms, 0.0).sum(-1))
        forced = torch.full_like(scores[:rows], float("-inf")).scatter_(-1, target[:, None], 0.0)
        return torch.cat([forced, scores[rows:]])


class LogprobRecorder(LogitsProcessor):
    """Keeps each step's log-probabilities (fp16, to halve the memory of a long reference)."""

    def __init__(self):
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.steps.append(torch.log_softmax(scores.float(), -1).half().cpu())
        return scores


@dataclass
class Fidelity:
    top1: float  # fraction of steps whose argmax equals the full-cache token
    kl: float  # mean KL(full || compressed) per step
    steps: int


@dataclass
class Streamed:
    predicted: Tensor  # [N, T]: the model's argmax at each step
    agree: Tensor  # bool [N, T]: the model's argmax was the reference token
    logprob: Tensor  # fp32 [N, T]: log-probability of the reference token
    kl: Tensor | None  # fp32 [N, T]: KL(reference || model), if reference log-probabilities were given
    free: Tensor | None  # [N, T]: the model's own greedy tokens from the free-running copy of each row


def _pad_id(model: PreTrainedModel) -> int:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else 0


def full_cache_reference(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                         new_tokens: int) -> tuple[Tensor, Tensor]:
    """Greedy tokens [B, T] and their log-probabilities [B, T, V] (fp16) with the model's ordinary cache.

    Log-probabilities are taken after generate's own processors (``min_new_tokens`` masks EOS),
    exactly as :class:`TeacherForcing` sees them, so both sides compare the same distributions."""
    recorder = LogprobRecorder()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([recorder]),
                         pad_token_id=_pad_id(model))
    return out[:, input_ids.shape[1]:], torch.stack(recorder.steps, dim=1)


SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.95)  # how users generate long text


def sampled_reference(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, new_tokens: int,
                      seeds: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens [B, T] sampled with the model's ordinary cache (:data:`SAMPLING`, row ``i`` from ``seeds[i]``, one row
    at a time so that a row's text does not depend on its batch); the model's log-probabilities [B, T, V]
    (fp16) at each step: the raw distribution with EOS masked, as :class:`TeacherForcing` sees it under
    ``min_new_tokens`` (temperature and top-p shape the sampling, not the distribution compared); and its most
    likely token [B, T] at each step (what top-1 agreement compares with)."""
    tokens, logprobs, top = [], [], []
    eos = model.generation_config.eos_token_id
    for row, seed in enumerate(seeds):
        keep = attention_mask[row].bool()
        ids = input_ids[row][keep][None]
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=_pad_id(model), output_logits=True,
                             return_dict_in_generate=True, **SAMPLING)
        logits = torch.stack(out.logits, 1).float()
        if eos is not None:
            logits[..., torch.tensor(eos if isinstance(eos, list) else [eos])] = float("-inf")
        tokens.append(out.sequences[:, ids.shape[1]:])
        logprobs.append(torch.log_softmax(logits, -1).half().cpu())
        top.append(logits.argmax(-1).cpu())
    return torch.cat(tokens), torch.cat(logprobs), torch.cat(top)


def sampled_free_run(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, new_tokens: int,
                     seeds: list[int]) -> list[Tensor]:
    """Each row sampled freely from its seed, as :func:`sampled_reference` sampled the reference."""
    out = []
    for row, seed in enumerate(seeds):
        ids = input_ids[row][attention_mask[row].bool()][None]
        torch.manual_seed(seed)
        out.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=_pad_id(model), **SAMPLING)[0, ids.shape[1]:])
    return out


def stream(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, reference: Tensor,
           reference_logprobs: Tensor | None = None, free_run: bool = False, mask_eos: bool = True,
           observers: Sequence[LogitsProcessor] = ()) -> Streamed:
    """Drive ``model`` (patched or not) along ``reference`` [N, T] one token at a time.

    free_run: also generate each row freely (the batch is doubled), for ROUGE-L against the reference.
    mask_eos: mask EOS as the reference generation did (``min_new_tokens``); off for perplexity, where
    the raw distribution is wanted and the reference text contains no EOS.
    observers: logits processors that watch each step (a progress bar) and return the scores unchanged."""
    rows, steps = reference.shape
    if free_run:
        input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
    forcing = TeacherForcing(reference, reference_logprobs)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                         min_new_tokens=steps if mask_eos else None, do_sample=False,
                         logits_processor=LogitsProcessorList([*observers, forcing]), pad_token_id=_pad_id(model))
    if len(forcing.agree) != steps:
        raise RuntimeError(f"generation stopped after {len(forcing.agree)} of {steps} steps (EOS in the reference?)")
    return Streamed(predicted=torch.stack(forcing.predicted, 1), agree=torch.stack(forcing.agree, 1),
                    logprob=torch.stack(forcing.logprob, 1),
                    kl=torch.stack(forcing.kl, 1) if forcing.kl else None,
                    free=out[rows:, input_ids.shape[1]:] if free_run else None)


def teacher_forced(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, reference: Tensor,
                   reference_logprobs: Tensor | None = None) -> Fidelity:
    """Mean top-1 agreement and KL of ``model`` along ``reference`` (see :func:`stream`)."""
    result = stream(model, input_ids, attention_mask, reference, reference_logprobs)
    kl = result.kl.mean().item() if result.kl is not None else float("nan")
    return Fidelity(top1=result.agree.float().mean().item(), kl=kl, steps=reference.shape[1])


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace words (longest common subsequence)."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def loop_period(tokens: Tensor, max_period: int = 400) -> tuple[int, float]:
    """The period of the loop a greedy generation's second half falls into, and the share of its tokens
    that repeat the token one period back. A small model's greedy text often loops; a cache that
    spans the period can copy the loop, one that does not cannot, whatever its eviction rule."""
    tail = tokens[tokens.shape[-1] // 2:]
    periods = range(1, min(max_period, tail.shape[-1] - 1) + 1)
    shares = [(tail[p:] == tail[:-p]).float().mean().item() for p in periods]
    best = max(range(len(shares)), key=shares.__getitem__)
    return periods[best], shares[best]
