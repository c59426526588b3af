"""The evaluation workloads, all generated offline and deterministically.

- long generation: chat prompts that ask for long answers, short (about 50 tokens) or long
  (a 2k-token passage to retell);
- streaming perplexity: whole books, fed one token at a time;
- long-context retrieval in the style of RULER: needles (single and multi-key) and variable
  tracking hidden in a haystack of unrelated text.
Prompts are split into an evaluation set and a held-apart set used only to choose defaults.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from .texts import books

LONG_ANSWER_REQUESTS = (
    "Write a long, detailed essay on the history of the printing press and how it changed Europe.",
    "Explain in detail how a compiler turns source code into machine code, step by step.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, in depth, how the human immune system fights a viral infection.",
    "Write a thorough guide to planting and caring for a vegetable garden through the seasons.",
    "Explain the causes, main events and consequences of the French Revolution in detail.",
    "Write a long letter from a sailor to his family describing a voyage around the world.",
    "Explain how neural networks learn, from the perceptron to modern deep learning, at length.",
    "Describe the water cycle and its role in weather and climate, in as much detail as you can.",
    "Write a detailed travel guide to a fictional city, with its history, food and sights.",
    "Explain the theory of evolution by natural selection, with many examples, at length.",
    "Write a long, step-by-step tutorial on baking bread at home, with tips for beginners.",
    "Describe the life cycle of a star, from nebula to its final state, in detail.",
    "Write a long dialogue between a teacher and a student about why the sky is blue.",
    "Explain how the internet works, from cables and routers to web pages, in depth.",
    "Write a detailed biography of an imaginary inventor who lived in the nineteenth century.",
    # held apart: used only to choose the defaults
    "Write a long essay on the importance of bees for agriculture and ecosystems.",
    "Explain in detail how a car engine works, part by part.",
    "Tell a long story about a child who discovers a hidden door in an old library.",
    "Describe the history of mathematics from ancient Babylon to the twentieth century, at length.",
    "Write a thorough guide to learning a new language as an adult.",
    "Explain how vaccines are developed and tested, step by step, in detail.",
    "Write a long description of a day in the life of a medieval village.",
    "Explain the main ideas of economics, supply and demand, markets and money, at length.",
)
EVAL_COUNT = 16  # the first 16 requests are the evaluation set, the rest are held apart

PERPLEXITY_BOOKS = ("Genesis", "Exodus", "Matthew", "Acts", "Luke", "John", "Numbers", "Deuteronomy")
PASSAGE_BOOKS = ("1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "Judges", "Joshua", "Ezekiel", "Daniel",
                 "Jeremiah", "Nehemiah", "Esther", "Ruth")
HAYSTACK_BOOKS = ("Psalms", "Proverbs", "Isaiah", "Ecclesiastes", "Job")
KEY_WORDS = ("apple", "river", "candle", "falcon", "marble", "violin", "harbor", "lantern", "meadow", "copper",
             "orchid", "glacier", "saddle", "thimble", "pepper", "anchor", "velvet", "quartz", "tunnel", "walnut")


def long_answer_requests(split: str = "eval", count: int | None = None) -> list[str]:
    """User messages asking for long answers: ``split`` is "eval" (16) or "heldout" (8)."""
    if split not in ("eval", "heldout"):
        raise ValueError(f"split must be 'eval' or 'heldout', got {split!r}")
    requests = LONG_ANSWER_REQUESTS[:EVAL_COUNT] if split == "eval" else LONG_ANSWER_REQUESTS[EVAL_COUNT:]
    if count is not None and not 1 <= count <= len(requests):
        raise ValueError(f"count must be in [1, {len(requests)}] for split {split!r}, got {count}")
    return list(requests[:count])


def _head(tokenizer: PreTrainedTokenizerBase, text: str, tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise ValueError(f"text of {len(ids)} tokens is shorter than the {tokens} tokens asked for")
    return tokenizer.decode(ids[:tokens])


def passage_requests(tokenizer: PreTrainedTokenizerBase, count: int, tokens: int = 2048) -> list[str]:
    """Long prompts: a passage of ``tokens`` tokens to retell in detail (one book each)."""
    if not 1 <= count <= len(PASSAGE_BOOKS):
        raise ValueError(f"count must be in [1, {len(PASSAGE_BOOKS)}], got {count}")
    return [f"{_head(tokenizer, books()[name], tokens)}\n\nRetell the passage above in your own words, in detail."
            for name in PASSAGE_BOOKS[:count]]


def documents(tokenizer: PreTrainedTokenizerBase, count: int, tokens: int = 4096) -> list[list[int]]:
    """Token ids of the first ``tokens`` tokens of ``count`` books (beginning with the BOS token if any)."""
    if not 1 <= count <= len(PERPLEXITY_BOOKS):
        raise ValueError(f"count must be in [1, {len(PERPLEXITY_BOOKS)}], got {count}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for name in PERPLEXITY_BOOKS[:count]:
        ids = bos + tokenizer(books()[name], add_special_tokens=False).input_ids
        if len(ids) < tokens:
            raise ValueError(f"{name} has {len(ids)} tokens, fewer than the {tokens} asked for")
        out.append(ids[:tokens])
    return out


@dataclass(frozen=True)
class RetrievalSample:
    task: str
    message: str  # the user turn: haystack with the hidden facts, then the question
    answer_prefix: str  # the start of the assistant's answer
    answers: tuple[str, ...]  # every one must appear in the output
    hidden: tuple[str, ...]  # every value hidden in the haystack (the answers and the distractors)
    facts: tuple[str, ...]  # the sentences hidden in the haystack, verbatim


RETRIEVAL_TASKS = ("niah_single", "niah_multikey", "variable_tracking")


@lru_cache(maxsize=4)
def _haystack_sentences(tokenizer: PreTrainedTokenizerBase) -> tuple[tuple[str, int], ...]:
    sentences = [s for name in HAYSTACK_BOOKS for s in re.split(r"(?<=[.;:?!])\s+", books()[name]) if s.strip()]
    lengths = tokenizer(sentences, add_special_tokens=False).input_ids
    return tuple((s, len(ids) + 1) for s, ids in zip(sentences, lengths))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def retrieval_samples(tokenizer: PreTrainedTokenizerBase, task: str, context_tokens: int, count: int,
                      seed: int = 0) -> list[RetrievalSample]:
    """``count`` samples of ``task`` with about ``context_tokens`` tokens of haystack each."""
    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"task must be one of {', '.join(RETRIEVAL_TASKS)}, got {task!r}")
    if context_tokens < 256:
        raise ValueError(f"context_tokens must be >= 256, got {context_tokens}")
    sentences = _haystack_sentences(tokenizer)
    rng = random.Random(f"{task}/{context_tokens}/{seed}")
    samples = []
    for _ in range(count):
        start = rng.randrange(len(sentences))
        hay, used = [], 0
        while used < context_tokens - 64:
            text, length = sentences[(start + len(hay)) % len(sentences)]
            hay.append(text)
            used += length
        if task == "variable_tracking":
            names = [_variable(rng) for _ in range(5)]
            value = str(rng.randint(10_000, 99_999))
            facts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            question = f"Find all variables that are assigned the value {value} in the text above."
            prefix = f"Answer: the variables assigned the value {value} are:"
            answers = hidden = tuple(names)
        else:
            keys = rng.sample(KEY_WORDS, 4 if task == "niah_multikey" else 1)
            numbers = [_number(rng) for _ in keys]
            facts = [f"One of the special magic numbers for {k} is: {n}." for k, n in zip(keys, numbers)]
            rng.shuffle(facts)
            question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
            prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
            answers, hidden = (numbers[0],), tuple(numbers)
        depths = sorted(rng.randrange(len(hay) + 1) for _ in facts)
        for offset, (depth, fact) in enumerate(zip(depths, facts)):
            hay.insert(depth + offset, fact)
        intro = ("Some special facts are hidden within the following text. Memorize them; I will quiz you "
                 "about them afterwards.")
        samples.append(RetrievalSample(task, f"{intro}\n{' '.join(hay)}\n{question}", prefix, answers, hidden,
                                       tuple(facts)))
    return samples


def retrieval_score(output: str, answers: tuple[str, ...]) -> float:
    """Fraction of the expected answers found in the output (RULER's string match)."""
    return sum(answer.lower() in output.lower() for answer in answers) / len(answers)
