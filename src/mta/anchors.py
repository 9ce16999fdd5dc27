"""Stage 1a: embed users, cluster them, pick one anchor user per cluster.

A user's embedding is the mean of the (L2-normalised) embeddings of their rendered
history items. k-means (scikit-learn, k-means++ with 10 restarts, seeded) clusters the
eligible users; each cluster's anchor is its most active user (most history items),
ties broken by closeness to the centroid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans

from mta.data.schema import User
from mta.errors import MtaError
from mta.tasks.base import Task

log = logging.getLogger(__name__)

# Centroid distances closer than this count as equal when choosing a cluster's anchor
# (embeddings are unit vectors, so distances are at most 2).
TIE_TOLERANCE = 1e-6


EMBED_CHUNK = 8192  # history items embedded between two progress reports (one call below it)


def embed_users(users: list[User], task: Task, embedder, batch_size: int = 64,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(n_users, dim) float32: the mean of each user's normalised item embeddings,
    itself normalised (so that a dot product is the cosine similarity). A large pool is
    embedded ``EMBED_CHUNK`` items at a time, ``progress(items done, items)`` after each."""
    texts, owner = [], []
    for i, u in enumerate(users):
        if not u.history:
            raise MtaError(f"user '{u.user_id}' has 0 history items; an embedding needs at least 1")
        for it in u.history:
            texts.append(task.render_item(it))
            owner.append(i)
    parts = []
    for start in range(0, len(texts), EMBED_CHUNK):
        parts.append(embedder.encode(texts[start:start + EMBED_CHUNK], batch_size=batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False))
        if progress:
            progress(min(start + EMBED_CHUNK, len(texts)), len(texts))
    vecs = np.concatenate(parts) if len(parts) > 1 else parts[0]
    out = np.zeros((len(users), vecs.shape[1]), dtype=np.float64)
    np.add.at(out, np.asarray(owner), vecs.astype(np.float64))
    out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
    return out.astype(np.float32)


@dataclass
class AnchorSelection:
    user_ids: list[str]
    cluster_of_anchor: list[int]
    centroids: np.ndarray
    notes: list[str] = field(default_factory=list)
    members: list[list[str]] = field(default_factory=list)  # per anchor: every user nearest its centroid


def select_anchors(users: list[User], emb: np.ndarray, k: int, min_history: int,
                   seed: int = 0) -> AnchorSelection:
    notes: list[str] = []
    eligible = [i for i, u in enumerate(users) if len(u.history) >= min_history]
    if not eligible:
        most = max(len(u.history) for u in users)
        notes.append(f"no user has at least {min_history} history items (the most is {most}); "
                     f"chose anchors among all {len(users)} users instead")
        eligible = list(range(len(users)))
    elif len(eligible) < len(users):
        notes.append(f"{len(eligible)} of {len(users)} users have at least {min_history} history "
                     "items and can be anchors")
    if k > len(eligible):
        notes.append(f"asked for {k} anchors but only {len(eligible)} users qualify; using {len(eligible)}")
        k = len(eligible)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb[eligible])
    chosen: list[int] = []
    clusters: list[int] = []
    for c in range(k):
        members = [eligible[j] for j in np.flatnonzero(km.labels_ == c)]
        if not members:
            continue
        most = max(len(users[i].history) for i in members)
        members = [i for i in members if len(users[i].history) == most]
        dist = {i: float(np.linalg.norm(emb[i] - km.cluster_centers_[c])) for i in members}
        # Distances equal in exact arithmetic (the two members of a two-user cluster sit
        # at the same distance from their midpoint) differ in the last bits from one BLAS
        # to another; without a tolerance the anchor, and everything trained on it, would
        # depend on the machine. Near-ties go to the smallest user id.
        closest = min(dist.values())
        best = min((i for i in members if dist[i] <= closest + TIE_TOLERANCE),
                   key=lambda i: users[i].user_id)
        chosen.append(best)
        clusters.append(c)
    for n in notes:
        log.warning(n)
    nearest = km.predict(emb)  # every candidate, eligible or not, joins its nearest cluster
    members = [[u.user_id for u, c2 in zip(users, nearest) if c2 == c] for c in clusters]
    return AnchorSelection([users[i].user_id for i in chosen], clusters, km.cluster_centers_, notes, members)
