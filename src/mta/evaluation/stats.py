"""Confidence intervals over persons: the percentile bootstrap, resampling PERSONS (all
of a person's users and queries stay together: ``group_sum``), for a metric and for a
paired difference between two methods. Where every user is their own person, a resample
of persons is one of users.

Every metric here is a function of per-query statistics summed over queries (accuracy:
[correct, 1]; macro-F1: per-label tp/fp/fn; MAE/RMSE: |e|, e^2; ROUGE: the scores), so
the input is one row of summed statistics per user and a resample is a vector of user
counts: all resamples are one matrix product, not a re-scoring of every resample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# metric(summed statistics) -> value
Metric = Callable[[np.ndarray], float]


def user_stats(preds: Sequence[Sequence], golds: Sequence[Sequence], stats: Callable) -> np.ndarray:
    """(users, d): user i's row is the sum of ``stats(pred, gold)`` over their queries."""
    if len(preds) != len(golds) or not golds:
        raise ValueError("preds and golds must be non-empty per-user lists of equal length")
    rows = []
    for p, g in zip(preds, golds):
        if len(p) != len(g) or not g:
            raise ValueError("every user needs one prediction per gold and at least one gold")
        rows.append(np.sum([np.asarray(stats(a, b), dtype=np.float64) for a, b in zip(p, g)], axis=0))
    return np.stack(rows)


def group_sum(stats: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """(groups, d): the rows of ``stats`` summed per group (a person's users), groups in
    order of their first row. Resampling these rows resamples persons."""
    stats = np.asarray(stats, dtype=np.float64)
    if len(groups) != len(stats):
        raise ValueError("one group per row of stats")
    order = list(dict.fromkeys(groups))
    pos = {g: i for i, g in enumerate(order)}
    out = np.zeros((len(order), stats.shape[1]))
    np.add.at(out, [pos[g] for g in groups], stats)
    return out


def _counts(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, users): how often each user is drawn in each resample (with replacement)."""
    draws = np.random.default_rng(seed).integers(0, n_users, size=(n_boot, n_users))
    counts = np.zeros((n_boot, n_users))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts


def _percentiles(vals, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ci(stats: np.ndarray, metric: Metric, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high): the metric on all users and the (alpha/2, 1 - alpha/2)
    percentiles of the metric over ``n_boot`` resamples of users with replacement."""
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 2 or not len(stats):
        raise ValueError("stats must be a non-empty (users, d) array")
    sums = _counts(len(stats), n_boot, seed) @ stats
    return (float(metric(stats.sum(0))), *_percentiles([metric(s) for s in sums], alpha))


def paired_diff_ci(stats_a: np.ndarray, stats_b: np.ndarray, metric: Metric, n_boot: int = 1000,
                   alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """metric(a) - metric(b) with a paired bootstrap: both methods see the same resampled
    users. The difference is significant at level alpha when the interval excludes 0."""
    stats_a, stats_b = np.asarray(stats_a, dtype=np.float64), np.asarray(stats_b, dtype=np.float64)
    if stats_a.shape[0] != stats_b.shape[0] or not len(stats_a):
        raise ValueError("paired inputs must be non-empty and aligned per user")
    c = _counts(len(stats_a), n_boot, seed)
    vals = [metric(a) - metric(b) for a, b in zip(c @ stats_a, c @ stats_b)]
    return (float(metric(stats_a.sum(0)) - metric(stats_b.sum(0))), *_percentiles(vals, alpha))
