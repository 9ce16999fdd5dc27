"""Stage 2, searched: each user's fusion weights chosen by the loss they give on the
user's own examples, as LoraHub and PriME do.

For a user with top-k anchors (by similarity) and leave-one-out examples E (each history
item with the others as context, the stack's training examples), the search minimises

    L(w) = mean over e in E of the mean token cross-entropy of e under
           W0 + sum_i w_i (alpha/r) B_i A_i,       w in [0, W_MAX]^k,

with CMA-ES (the ``cma`` library), started at the similarity weights with step size
``SIGMA0``, for about ``cfg.search_evals`` candidate vectors (whole generations of the
strategy: up to a generation more). The similarity weights are scored
too, and the best vector seen is kept, so a searched user's loss is never above the
similarity one on its own examples. Users search in lockstep: every candidate of every
user in one batch of the engine's per-row routing (exact delta merges; nothing merged
into a weight). The k weights are what the user stores; the stack then trains on top.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mta.engine.engine import AdapterEngine, Row
from mta.engine.train import Example, row_losses
from mta.errors import MtaError
from mta.mixing import Mixture
from mta.paths import write_json_atomic

log = logging.getLogger(__name__)
W_MAX = 2.0   # an anchor may count up to twice (LoraHub's bound is 1.5 on signed weights)
SIGMA0 = 0.3  # the initial step, in weight units


def search_weights(engine: AdapterEngine, mixes: Sequence[Mixture], examples: Sequence[Sequence[Example]],
                   evals: int, pad_id: int, seed: int = 0, max_rows: int | None = 16,
                   base_slot: int | None = None) -> tuple[list[Mixture], dict]:
    """One searched mixture per user (same anchors, new weights) and the search's record:
    {"seconds", "evals", "loss_before", "loss_after"} with per-user losses. ``base_slot``:
    a residual bank's task LoRA, in every scored row with weight 1 (not searched)."""
    import cma  # 1 s to import: only where a search runs

    if len(mixes) != len(examples):
        raise ValueError("one example list per mixture")
    for m, ex in zip(mixes, examples):
        if not m.anchors:
            raise MtaError("a searched fusion needs anchors (top_k >= 1)", ("AdaptConfig.top_k",))
        if not ex:
            raise MtaError("a searched fusion needs at least one training example per user")
    t0 = time.perf_counter()
    es = []
    for i, m in enumerate(mixes):
        x0 = np.clip(np.asarray(m.weights, dtype=np.float64), 0.0, W_MAX)
        opts = {"bounds": [0.0, W_MAX], "seed": seed + i + 1, "verbose": -9, "maxfevals": evals - 1,
                "CMA_diagonal": False}
        es.append(cma.CMAEvolutionStrategy(x0.tolist(), SIGMA0, opts))

    def score(cands: list[tuple[int, np.ndarray]]) -> list[float]:
        base = ((base_slot,), (1.0,)) if base_slot is not None else ((), ())
        pairs = [(Row((*mixes[u].anchors, *base[0]), (*(float(x) for x in w), *base[1])), e)
                 for u, w in cands for e in examples[u]]
        flat = row_losses(engine, pairs, pad_id, max_rows)
        out, pos = [], 0
        for u, _ in cands:
            n = len(examples[u])
            out.append(float(np.mean(flat[pos:pos + n])))
            pos += n
        return out

    start = [np.asarray(m.weights, dtype=np.float64) for m in mixes]
    before = score(list(enumerate(start)))
    best = [(loss, w) for loss, w in zip(before, start)]
    used = [1] * len(mixes)
    while True:  # each strategy stops after ``evals - 1`` told candidates (its maxfevals)
        asks = {u: e.ask() for u, e in enumerate(es) if not e.stop()}
        if not asks:
            break
        cands = [(u, np.asarray(x)) for u, xs in asks.items() for x in xs]
        losses = score(cands)
        pos = 0
        for u, xs in asks.items():
            vals = losses[pos:pos + len(xs)]
            pos += len(xs)
            if not all(np.isfinite(vals)):
                raise MtaError(f"the fusion search got a non-finite loss for user {u}'s candidates")
            es[u].tell(xs, vals)
            used[u] += len(xs)
            k = int(np.argmin(vals))
            if vals[k] < best[u][0]:
                best[u] = (vals[k], np.asarray(xs[k]))
    out = [Mixture(m.anchors, tuple(float(x) for x in w), m.similarities) for m, (_, w) in zip(mixes, best)]
    seconds = time.perf_counter() - t0
    log.info("searched the fusion weights of %d user(s) in %.1f s (%.2f s per user, %d evaluations each)",
             len(mixes), seconds, seconds / max(1, len(mixes)), max(used))
    return out, {"seconds": seconds, "evals": used, "loss_before": before, "loss_after": [b for b, _ in best]}


# AdaptConfig fields that only shape the stack (stage 3), trained after the search: a
# search's result does not depend on them, so runs that differ only in these share it
STACK_ONLY = frozenset({"stack_rank", "stack_targets", "stack_layers", "stack_alpha", "stack_epochs",
                        "stack_steps", "stack_lr", "batch_size", "users_per_pass", "warmup_ratio"})


SEARCHED = "searched"  # a run's (or a tune's) SearchCache directory, under its OUT


class SearchCache:
    """Searched mixtures kept on disk between runs that would search the same way, so a
    tune's trials of the stack's budget (each adapting the same users against the same bank)
    search once, and so do `mta` and `mta-fusion` in one evaluation. A key covers everything
    the search reads: the bank (its id names its anchors' trained weights), every setting
    but the stack's (``STACK_ONLY``), whether the user's last item was held out of it, the
    users in their order (their seeds follow their positions), their histories and the batch
    size of the scoring; so a hit returns what the search would have returned. Each entry
    keeps the seconds its search took, so a run that takes it can count them as its own."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def key(self, bank_id: str, cfg: dict, users: Sequence[tuple[str, str]], first_pass: int,
            max_rows: int, held_out: bool = False) -> str:
        """``cfg``: the adapt settings (``AdaptConfig.identity()``); ``users``: (user id,
        history hash) in search order; ``held_out``: the search left each user's last item
        out (``stacking.held_out_split``: a stack stopped on it trains after)."""
        payload = {"bank": bank_id, "adapt": {k: v for k, v in cfg.items() if k not in STACK_ONLY},
                   "users": [list(u) for u in users], "first_pass": first_pass, "max_rows": max_rows,
                   "held_out": held_out}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str, n: int) -> tuple[list[Mixture], float] | None:
        """The ``n`` mixtures stored under ``key`` and the seconds their search took, or None
        (none stored, or a file that is not one, such as one written before the seconds were
        kept: searched again and rewritten)."""
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            rows, seconds = raw["mixtures"], float(raw["seconds"])
            out = [Mixture(tuple(int(a) for a in r["anchors"]), tuple(float(w) for w in r["weights"]),
                           tuple(float(s) for s in r["similarities"])) for r in rows]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: not a searched-weights file (%s); searching again", path, e)
            return None
        return (out, seconds) if len(out) == n else None

    def put(self, key: str, mixes: Sequence[Mixture], seconds: float) -> None:
        write_json_atomic(self.root / f"{key}.json", {"seconds": seconds, "mixtures": [
            {"anchors": list(m.anchors), "weights": list(m.weights), "similarities": list(m.similarities)}
            for m in mixes]})
