"""Confidence intervals over users: the percentile bootstrap, resampling USERS (a user's
queries stay together), for a metric and for a paired difference between two methods."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# metric(preds, golds) -> value; the unit of resampling is the user
Metric = Callable[[list, list], float]


def _resample(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_users, size=(n_boot, n_users))


def _flatten(groups: Sequence[Sequence], idx) -> list:
    return [x for i in idx for x in groups[i]]


def bootstrap_ci(preds: Sequence[Sequence], golds: Sequence[Sequence], metric: Metric, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high): the metric on all users and the (alpha/2, 1 - alpha/2)
    percentiles of the metric over ``n_boot`` resamples of users with replacement."""
    if len(preds) != len(golds) or not preds:
        raise ValueError("preds and golds must be non-empty per-user lists of equal length")
    point = metric(_flatten(preds, range(len(preds))), _flatten(golds, range(len(golds))))
    vals = [metric(_flatten(preds, s), _flatten(golds, s)) for s in _resample(len(preds), n_boot, seed)]
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(point), float(lo), float(hi)


def paired_diff_ci(preds_a: Sequence[Sequence], preds_b: Sequence[Sequence], golds: Sequence[Sequence],
                   metric: Metric, n_boot: int = 1000, alpha: float = 0.05,
                   seed: int = 0) -> tuple[float, float, float]:
    """metric(a) - metric(b) with a paired bootstrap: both methods see the same resampled
    users. The difference is significant at level alpha when the interval excludes 0."""
    if not (len(preds_a) == len(preds_b) == len(golds)) or not golds:
        raise ValueError("paired inputs must be non-empty and aligned per user")
    all_idx = range(len(golds))
    point = metric(_flatten(preds_a, all_idx), _flatten(golds, all_idx)) - \
        metric(_flatten(preds_b, all_idx), _flatten(golds, all_idx))
    vals = []
    for s in _resample(len(golds), n_boot, seed):
        g = _flatten(golds, s)
        vals.append(metric(_flatten(preds_a, s), g) - metric(_flatten(preds_b, s), g))
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(point), float(lo), float(hi)
