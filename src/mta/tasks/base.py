"""The one small interface every task implements, and the shared parsing helpers.

A task says: which fields a history item has, how an item renders as text (for the
prompt and for retrieval), how a query becomes a prompt, how free model output is
parsed, and which metrics apply. Metrics and parsing live once, keyed by ``kind``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mta import metrics
from mta.data.schema import HistoryItem

Kind = Literal["classification", "rating", "generation"]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    kind: Kind
    item_fields: tuple[str, ...]
    labels: tuple[str, ...] = ()
    # Marker after which a query input holds the content to retrieve on ("description: ").
    content_marker: str | None = None
    # Whether training examples in the query's form need items of OTHER users (LaMP-1's
    # unrelated reference); see ``training_example``.
    needs_negatives: bool = False
    # A rating task's scores, ascending, each answered as one token (``mta.decoding.scale``)
    scale: tuple[str, ...] = ("1", "2", "3", "4", "5")

    # -- rendering -------------------------------------------------------------------
    def render_item(self, item: HistoryItem) -> str:
        """One history item as a sentence for the prompt (and the embedder)."""
        raise NotImplementedError

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        """A history item as an (input, output) training pair in the query's format."""
        raise NotImplementedError

    def training_example(self, item: HistoryItem, history: Sequence[HistoryItem],
                         negatives: Sequence[HistoryItem]) -> tuple[str, str]:
        """``item`` as an (input, output) training pair in the form of the task's queries;
        ``history`` is the user's history, ``negatives`` items of other users (used by
        tasks with ``needs_negatives``)."""
        return self.item_example(item)

    def item_label(self, item: HistoryItem) -> str | None:
        """The item's label for distributions (tag, score); None for free text."""
        return None

    def retrieval_text(self, query_input: str) -> str:
        """The part of a query that retrieval should match against history items."""
        if self.content_marker and self.content_marker in query_input:
            return query_input.split(self.content_marker, 1)[1]
        return query_input

    def prompt(self, query_input: str, retrieved: Sequence[HistoryItem] = ()) -> str:
        """The user turn: the retrieved history items (if any), then the query's input."""
        if not retrieved:
            return query_input
        lines = "\n".join(f"- {self.render_item(it)}" for it in retrieved)
        return f"Examples of this user's past choices:\n{lines}\n\n{query_input}"

    # -- parsing and scoring -------------------------------------------------------------
    def parse(self, text: str) -> Any:
        if self.kind == "classification":
            return parse_label(text, self.labels)
        if self.kind == "rating":
            return parse_score(text)
        return parse_first_line(text)

    def gold(self, text: str) -> Any:
        return float(text) if self.kind == "rating" else text.strip()

    def score(self, preds: Sequence[Any], golds: Sequence[str]) -> dict[str, float]:
        g = [self.gold(x) for x in golds]
        if self.kind == "classification":
            return metrics.classification_metrics(preds, g, self.labels)
        if self.kind == "rating":
            return metrics.rating_metrics(preds, g)
        return metrics.generation_metrics(preds, g)

    def query_stats(self, pred: Any, gold_text: str):
        """Per-query statistics whose sum over queries determines every metric
        (``metrics_from_stats``): what the user-level bootstrap resamples."""
        g = self.gold(gold_text)
        if self.kind == "classification":
            return metrics.classification_stats(pred, g, self.labels)
        if self.kind == "rating":
            return metrics.rating_stats(pred, g)
        return metrics.generation_stats(pred, g)

    def metrics_from_stats(self, summed) -> dict[str, float]:
        if self.kind == "classification":
            return metrics.classification_from_stats(summed, len(self.labels))
        if self.kind == "rating":
            return metrics.rating_from_stats(summed)
        return metrics.generation_from_stats(summed)

    @property
    def unparsed_scoring(self) -> str:
        """How an answer that cannot be parsed (or is empty) is scored, in words."""
        return {"classification": "scored as wrong", "rating": "scored as the rating furthest from the gold",
                "generation": "scored as empty text"}[self.kind]

    @property
    def max_new_tokens(self) -> int:
        """Answer length when nothing else says: a label or a score is short; free text
        (a headline, a title) is not."""
        return {"classification": 12, "rating": 8, "generation": 32}[self.kind]

    def answer_tokens(self, tokenizer, users) -> int:
        """The default answer length for ``users``: the 99th percentile, in tokens, of the
        outputs of their history items in the query format (the answers the adapters are
        trained to give; no test answer is looked at), plus 2 (end of turn, a little
        slack); ``max_new_tokens`` when the users have no history."""
        outs = [self.item_example(it)[1] for u in users for it in u.history]
        if not outs:
            return self.max_new_tokens
        lengths = sorted(len(ids) for ids in tokenizer(outs, add_special_tokens=False)["input_ids"])
        return lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))] + 2

    @property
    def metric_names(self) -> tuple[str, str]:
        return {
            "classification": ("accuracy", "f1"),
            "rating": ("mae", "rmse"),
            "generation": ("rouge1", "rougeL"),
        }[self.kind]

    def check_item(self, item: HistoryItem) -> str | None:
        """Why ``item`` does not fit this task, or None."""
        for f in self.item_fields:
            v = item.get(f)
            if v is None:
                return f"has no field '{f}' (task {self.name} needs {', '.join(self.item_fields)})"
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                return f"field '{f}' must be text or a number, got {type(v).__name__}"
        if self.kind == "classification" and self.labels:
            lab = self.item_label(item)
            if lab is not None and lab not in self.labels:
                return f"label {lab!r} is not one of the task's labels"
        return None


_QUOTES = "\"'`“”‘’*[]()."


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """A label out of free text: an exact match after trimming; else the longest label
    the answer begins with (a model that runs on past its answer: "twist endingHuman:");
    else the label whose whole-word mention comes first (longest label wins at a tie, so
    "dark comedy" beats "comedy"); None when no label is mentioned."""
    t = text.strip().lower()
    first = t.splitlines()[0].strip(_QUOTES + " ") if t else ""
    lower = {lab.lower(): lab for lab in labels}
    if first in lower:
        return lower[first]
    leading = [low for low in lower if first.startswith(low)]
    if leading:
        return lower[max(leading, key=len)]
    best: tuple[int, int, str] | None = None
    for low, lab in lower.items():
        m = re.search(r"(?<!\w)" + re.escape(low) + r"(?!\w)", t)
        if m and (best is None or (m.start(), -len(low)) < (best[0], best[1])):
            best = (m.start(), -len(low), lab)
    return best[2] if best else None


def parse_score(text: str, low: float = 1.0, high: float = 5.0) -> float | None:
    """The first number in the text, clamped to [low, high]; None when there is none."""
    m = re.search(r"-?\d+(?:\.\d+)?", text)
    if not m:
        return None
    return float(min(max(float(m.group()), low), high))


def parse_first_line(text: str) -> str:
    """The first non-empty line, without surrounding quotes and a leading 'Title:' label."""
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            line = re.sub(r"^(title|headline|tweet|paraphrase)\s*:\s*", "", line, flags=re.I)
            return line.strip("\"'“”` ")
    return ""
