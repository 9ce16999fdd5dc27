"""Stage 2: a target user's anchor mixture, recomputable from their history alone.

similarity s_i = cos(e_user, e_anchor_i); keep the top-k; weights
- ``linear``: w_i = max(s_i, 0) / sum_j max(s_j, 0): the MOST similar anchor weighs most
  (the released code inverts this); uniform if every kept similarity is <= 0;
- ``softmax``: w_i = exp(s_i / T) / sum_j exp(s_j / T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mta.errors import MtaError


@dataclass(frozen=True)
class Mixture:
    anchors: tuple[int, ...]       # bank slots, most similar first
    weights: tuple[float, ...]
    similarities: tuple[float, ...]


def anchor_weights(sims: np.ndarray, top_k: int, weighting: str = "linear",
                   temperature: float = 0.1) -> Mixture:
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim != 1 or sims.size == 0:
        raise MtaError("the bank has no anchors to mix")
    if not np.isfinite(sims).all():
        raise MtaError("anchor similarities contain NaN or inf")
    if top_k < 1:
        raise MtaError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, sims.size)
    order = np.argsort(-sims, kind="stable")[:k]
    top = sims[order]
    if weighting == "linear":
        pos = np.clip(top, 0.0, None)
        w = pos / pos.sum() if pos.sum() > 0 else np.full(k, 1.0 / k)
    elif weighting == "softmax":
        if not temperature > 0:
            raise MtaError(f"temperature must be positive, got {temperature}")
        z = np.exp((top - top.max()) / temperature)
        w = z / z.sum()
    else:
        raise MtaError(f"weighting must be linear or softmax, got {weighting!r}")
    return Mixture(tuple(int(i) for i in order), tuple(float(x) for x in w), tuple(float(s) for s in top))


def mixtures_for(user_emb: np.ndarray, anchor_emb: np.ndarray, top_k: int, weighting: str,
                 temperature: float) -> list[Mixture]:
    """One mixture per row of ``user_emb`` (both sides L2-normalised)."""
    sims = np.asarray(user_emb, dtype=np.float64) @ np.asarray(anchor_emb, dtype=np.float64).T
    return [anchor_weights(s, top_k, weighting, temperature) for s in sims]


@dataclass(frozen=True)
class Plan:
    """How one user is served: a mixture and its merge, and/or a stack slot."""

    anchors: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    merge: str = "delta"
    svd_rank: int | None = None
    stack: int | None = None
