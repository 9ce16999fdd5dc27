"""Answers on a rating scale read from the model's distribution instead of generated.

A rating task asks for one of a few scores ("Just answer with 1, 2, 3, 4, or 5"). Greedy
generation answers with the most likely score (the mode). The metrics are errors on a
number line, though: the answer that minimises the expected absolute error under the
model's own distribution is its median, the one that minimises the expected squared error
its mean. ``GenerateConfig.rating_answer`` chooses:

- ``text``: generated text, parsed (LaMP's protocol; every earlier table);
- ``mode``: the most likely score among the scale's tokens (constrained greedy);
- ``median``: the median of the scale's distribution (for MAE);
- ``mean``: its expected value (for RMSE), a fraction.

The distribution is the model's next-token probabilities at the answer's first position
(one forward pass over the prompt, each row through its own adapters), renormalised over
the scale's tokens: one token per score ("1" ... "5"), which the answer begins with.
``scale_distribution`` also returns how much of the probability those tokens held before
renormalising: a model that begins its answers otherwise (a space, a word) makes the rule
meaningless, and ``mta.decoding.answers`` warns when that share is low.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import torch

from mta.decoding.batch import chat_texts, in_batches
from mta.errors import MtaError

log = logging.getLogger(__name__)
RULES = ("text", "mode", "median", "mean")
LOW_MASS = 0.5  # below this mean share of the first token's probability, a run warns


def scale_tokens(tokenizer, labels: Sequence[str]) -> list[int]:
    """The one token each of ``labels`` is written with at the start of an answer."""
    ids = []
    for lab in labels:
        tok = tokenizer(lab, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise MtaError(f"the rating {lab!r} is {len(tok)} tokens for this tokenizer; a rating answer other "
                           "than 'text' needs one token per score: use --rating-answer text")
        ids.append(tok[0])
    if len(set(ids)) != len(ids):
        raise MtaError("two ratings of the scale share a token; use --rating-answer text")
    return ids


@torch.no_grad()
def scale_distribution(backbone, prompts: Sequence[str], rows: Sequence | None, labels: Sequence[str],
                       batch_size: int = 8, max_prompt_tokens: int = 1024,
                       on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each chat-formatted prompt (through ``rows[i]``, or the base model when ``rows``
    is None): the probabilities of ``labels`` as the answer's first token, renormalised
    over them ([n, len(labels)], float32 on the CPU), and the share of the whole
    distribution they held ([n]). Batches as ``generate`` forms them (longest first,
    left-padded, long prompts keep their end)."""
    if rows is not None and len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    tokenizer, engine = backbone.tokenizer, backbone.engine
    ids = torch.tensor(scale_tokens(tokenizer, labels))
    probs = torch.zeros(len(prompts), len(labels))
    mass = torch.zeros(len(prompts))
    texts, order = chat_texts(tokenizer, prompts)
    def one(idx: list[int], enc) -> None:
        mask = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions as generate() gives left-padded rows
        if rows is None:
            out = engine.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, logits_to_keep=1)
        else:
            with engine.route([rows[i] for i in idx], reuse=False):  # one forward
                out = engine.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos,
                                   logits_to_keep=1)
        logits = out.logits[:, -1].float()
        # the scale's share of the whole distribution, and the distribution over the scale alone
        # (softmax over its logits: defined even where their probabilities underflow)
        scale = logits[:, ids.to(logits.device)]
        mass[idx] = torch.exp(torch.logsumexp(scale, -1) - torch.logsumexp(logits, -1)).cpu()
        probs[idx] = torch.softmax(scale, -1).cpu()
        if on_batch:
            on_batch(len(idx))

    in_batches(engine, tokenizer, texts, order, batch_size, max_prompt_tokens, "scoring", one)
    return probs, mass


def rate(probs: Sequence[float], values: Sequence[float], rule: str) -> float:
    """The answer ``rule`` gives from a distribution over ``values`` (ascending)."""
    p = [float(x) for x in probs]
    if rule == "mode":
        return values[max(range(len(p)), key=p.__getitem__)]
    if rule == "mean":
        return sum(x * v for x, v in zip(p, values)) / sum(p)
    if rule == "median":
        half, acc = sum(p) / 2, 0.0
        for x, v in zip(p, values):
            acc += x
            if acc >= half:
                return v
        return values[-1]
    raise ValueError(f"unknown rating rule {rule!r} ({', '.join(RULES[1:])})")


def rating_text(value: float, probs: Sequence[float] | None = None) -> str:
    """A rating as answer text: a whole score as its digit, a mean to two decimals; with
    ``probs``, the distribution it was read from after it, "4 (p 0.0500 ... 0.2000)", so
    that a run's recorded outputs keep what any other rule would have answered
    (``stored_distribution``; ``scripts/rescore.py --rating-answer``). A task's parser
    takes the first number: the rating."""
    text = str(int(value)) if float(value).is_integer() else f"{value:.2f}"
    return text if probs is None else f"{text} (p {' '.join(f'{x:.4f}' for x in probs)})"


def stored_distribution(text: str) -> list[float] | None:
    """The distribution ``rating_text`` wrote after a rating, or None (a generated answer)."""
    m = _STORED.search(text)
    return [float(x) for x in m.group(1).split()] if m else None


_STORED = re.compile(r"\(p ((?:\d+\.\d+ ?)+)\)")
