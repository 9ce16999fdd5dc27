"""Task metrics, written once. Pure functions: inputs checked first, results finite.

- classification: accuracy and macro-F1 over the task's full label set (LaMP's
  convention); an unparseable prediction counts as wrong for every label.
- rating: MAE and RMSE; an unparseable prediction scores as the value furthest from
  the gold on the 1-5 scale (LaMP's convention), so failing to answer is never free.
- generation: ROUGE-1 and ROUGE-L F-measure (rouge-score, no stemming), averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score


def _check_lengths(preds: Sequence, golds: Sequence) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} golds")
    if not golds:
        raise ValueError("no examples to score")


def classification_metrics(
    preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """accuracy = mean(pred == gold); f1 = unweighted mean over ``labels`` of per-label F1."""
    _check_lengths(preds, golds)
    unknown = sorted({g for g in golds if g not in labels})
    if unknown:
        raise ValueError(f"gold labels not in the label set: {unknown}")
    # None (unparseable) becomes a sentinel outside the label set: wrong, never a class.
    p = [x if x is not None else "\0none" for x in preds]
    acc = float(accuracy_score(golds, p))
    f1 = float(f1_score(golds, p, labels=list(labels), average="macro", zero_division=0))
    return {"accuracy": acc, "f1": f1}


def rating_metrics(
    preds: Sequence[float | None], golds: Sequence[float], low: float = 1.0, high: float = 5.0
) -> dict[str, float]:
    """MAE = mean|p - g|; RMSE = sqrt(mean (p - g)^2); None -> furthest of low/high from g."""
    _check_lengths(preds, golds)
    out = rating_from_stats(np.sum([rating_stats(p, g, low, high) for p, g in zip(preds, golds)], axis=0))
    assert all(math.isfinite(v) for v in out.values())
    return out


_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def generation_metrics(preds: Sequence[str | None], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure of each prediction against its gold."""
    _check_lengths(preds, golds)
    return generation_from_stats(np.sum([generation_stats(p, g) for p, g in zip(preds, golds)], axis=0))


# -- the same metrics as sums of per-query statistics (for the bootstrap) ----------------
#
# Every metric is a function of per-query statistics summed over queries, so a bootstrap
# resample of users only needs each user's summed statistics: one matrix product per
# metric instead of re-scoring every resample. Rating and ROUGE are computed through
# these; classification keeps scikit-learn as its reference, and tests/test_metrics.py
# checks the statistics against it.


def classification_stats(pred: str | None, gold: str, labels: Sequence[str]) -> np.ndarray:
    """[correct, 1, tp per label, fp per label, fn per label]."""
    n = len(labels)
    pos = {lab: i for i, lab in enumerate(labels)}
    if gold not in pos:
        raise ValueError(f"gold label not in the label set: {gold!r}")
    v = np.zeros(2 + 3 * n)
    v[0], v[1] = float(pred == gold), 1.0
    if pred == gold:
        v[2 + pos[gold]] = 1.0
    else:
        if pred in pos:
            v[2 + n + pos[pred]] = 1.0
        v[2 + 2 * n + pos[gold]] = 1.0
    return v


def classification_from_stats(s: np.ndarray, n_labels: int) -> dict[str, float]:
    tp, fp, fn = s[2:2 + n_labels], s[2 + n_labels:2 + 2 * n_labels], s[2 + 2 * n_labels:]
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"accuracy": float(s[0] / s[1]), "f1": float(f1.mean())}


def rating_stats(pred: float | None, gold: float, low: float = 1.0, high: float = 5.0) -> np.ndarray:
    """[|error|, error^2, 1], an unparseable prediction scored as in ``rating_metrics``."""
    p = pred if pred is not None else (low if gold >= (low + high) / 2 else high)
    e = float(p) - float(gold)
    return np.array([abs(e), e * e, 1.0])


def rating_from_stats(s: np.ndarray) -> dict[str, float]:
    return {"mae": float(s[0] / s[2]), "rmse": float(math.sqrt(s[1] / s[2]))}


def generation_stats(pred: str | None, gold: str) -> np.ndarray:
    sc = _SCORER.score(gold, pred or "")
    return np.array([sc["rouge1"].fmeasure, sc["rougeL"].fmeasure, 1.0])


def generation_from_stats(s: np.ndarray) -> dict[str, float]:
    return {"rouge1": float(s[0] / s[2]), "rougeL": float(s[1] / s[2])}
