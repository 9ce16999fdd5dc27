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
    g = np.asarray(golds, dtype=np.float64)
    p = np.array(
        [x if x is not None else (low if gi >= (low + high) / 2 else high) for x, gi in zip(preds, g)],
        dtype=np.float64,
    )
    err = p - g
    out = {"mae": float(np.abs(err).mean()), "rmse": float(math.sqrt((err**2).mean()))}
    assert all(math.isfinite(v) for v in out.values())
    return out


_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def generation_metrics(preds: Sequence[str | None], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure of each prediction against its gold."""
    _check_lengths(preds, golds)
    r1, rl = [], []
    for pred, gold in zip(preds, golds):
        s = _SCORER.score(gold, pred or "")
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return {"rouge1": float(np.mean(r1)), "rougeL": float(np.mean(rl))}
