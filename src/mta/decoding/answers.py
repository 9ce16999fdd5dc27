"""How a batch of queries is answered: generated text, or a decision read from the model.

``GenerateConfig.rating_answer`` (a rating task: ``mta.decoding.scale``) and
``GenerateConfig.label_answer`` (a classification task: ``mta.decoding.labels``) say
whether the answer is generated and parsed, as LaMP does, or taken by a rule from the
model's distribution over the task's possible answers. Every method of an evaluation
answers by the same rules (the evaluation, `mta generate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from mta.decoding.batch import generate
from mta.decoding.labels import label_log_likelihoods
from mta.decoding.scale import LOW_MASS, rate, rating_text, scale_distribution
from mta.errors import MtaError

log = logging.getLogger(__name__)


def check_answer_rules(task, gen) -> None:
    """A rule other than ``text`` needs a task of its kind: one clear error before any work."""
    rating, label = getattr(gen, "rating_answer", "text"), getattr(gen, "label_answer", "text")
    if rating != "text" and task.kind != "rating":
        raise MtaError(f"--rating-answer {rating} reads a rating scale; task {task.name} is {task.kind}: "
                       "use --rating-answer text")
    if label != "text" and (task.kind != "classification" or not task.labels):
        raise MtaError(f"--label-answer {label} chooses among a task's labels; task {task.name} is {task.kind} "
                       "without a label set: use --label-answer text")


def rule_of(task, gen) -> str | None:
    """The rule the answers of ``task`` are read by under ``gen``, in words for a report's
    protocol line; None when they are generated."""
    rating, label = getattr(gen, "rating_answer", "text"), getattr(gen, "label_answer", "text")
    if task.kind == "rating" and rating != "text":
        what = {"mode": "most likely score", "median": "median", "mean": "expected value"}[rating]
        return (f"each answer the {what} of the model's distribution over the scores {'/'.join(task.scale)} at the "
                f"answer's first token (--rating-answer {rating})")
    if task.kind == "classification" and label != "text":
        return (f"each answer the likeliest of the task's {len(task.labels)} labels as the whole answer under the "
                f"model (--label-answer {label})")
    return None


def describe(task, gen, max_new_tokens: int) -> str:
    """How the answers were taken, for a report's protocol line."""
    return rule_of(task, gen) or f"{max_new_tokens} new tokens per answer"


def answers(backbone, task, prompts: Sequence[str], rows: Sequence | None, gen, max_new_tokens: int,
            on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The answer texts of ``prompts`` under ``gen``'s settings: generated; for a rating task
    with ``gen.rating_answer`` other than ``text``, the rating the rule reads from the
    scale's distribution, then the distribution (``rating_text``: the task parses the
    rating as usual); for a classification task with ``gen.label_answer = "likeliest"``,
    the likeliest label."""
    check_answer_rules(task, gen)
    if task.kind == "rating" and gen.rating_answer != "text":
        rule, scores = gen.rating_answer, task.scale
        probs, mass = scale_distribution(backbone, prompts, rows, scores, gen.batch_size, gen.max_prompt_tokens,
                                         on_batch)
        if len(prompts) and float(mass.mean()) < LOW_MASS:
            log.warning("the scores %s held %.0f%% of the answers' first-token probability on average: the model "
                        "begins its answers otherwise, and --rating-answer %s reads a small remainder",
                        "/".join(scores), 100 * float(mass.mean()), rule)
        values = [float(v) for v in scores]
        return [rating_text(rate(p, values, rule), p) for p in probs.tolist()]
    if task.kind == "classification" and gen.label_answer != "text":
        ll = label_log_likelihoods(backbone, prompts, rows, task.labels, gen.batch_size, gen.max_prompt_tokens,
                                   on_batch)
        return [task.labels[i] for i in ll.argmax(-1).tolist()] if len(prompts) else []
    return generate(backbone, prompts, rows, max_new_tokens, gen.batch_size, gen.max_prompt_tokens,
                    on_batch=on_batch, decoder=gen.decoder)
