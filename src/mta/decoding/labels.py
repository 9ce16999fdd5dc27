"""A classification task's answer chosen among its labels by the model's likelihood.

Generation may answer with something that is no label (an empty answer, a fragment): the
task scores it as wrong. ``GenerateConfig.label_answer = "likeliest"`` instead answers with
the label whose whole answer (its tokens, then the end of the turn, as every adapter is
trained to answer: ``mta.engine.train.encode_example``) the model, through each row's own
adapters, finds most likely: the answer with the most probability of being right under the
model's beliefs (accuracy's rule). The scores are the training loss without the backward
(``mta.engine.train.row_losses``), so they are what training optimised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mta.engine.engine import Row
from mta.engine.train import IGNORE, encode_example, row_losses


@torch.no_grad()
def label_log_likelihoods(backbone, prompts: Sequence[str], rows: Sequence | None, labels: Sequence[str],
                          batch_size: int = 8, max_prompt_tokens: int = 1024,
                          on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """[n, len(labels)]: the log-probability of each label as the whole answer to each
    chat-formatted prompt (through ``rows[i]``, or the base model when ``rows`` is None).
    Prompts longer than ``max_prompt_tokens`` keep their end; ``batch_size`` prompts at a
    time, each with every label."""
    if rows is not None and len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    tok = backbone.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answer = max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 1
    out = torch.zeros(len(prompts), len(labels))
    for start in range(0, len(prompts), batch_size):
        idx = range(start, min(start + batch_size, len(prompts)))
        pairs = [(Row(active=False) if rows is None else rows[i],
                  encode_example(tok, prompts[i], lab, max_length=max_prompt_tokens + 2 * answer))
                 for i in idx for lab in labels]
        means = row_losses(backbone.engine, pairs, pad, max_rows=batch_size)
        counts = [sum(x != IGNORE for x in ex.labels[1:]) for _, ex in pairs]
        out[start:start + len(idx)] = -torch.tensor([m * c for m, c in zip(means, counts)]).view(len(idx), -1)
        if on_batch:
            on_batch(len(idx))
    return out
