"""The whole method on one dataset: split users, build the bank on the anchor
candidates, adapt the targets, answer the targets' queries, score base vs RAG vs MTA."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from mta.bank import build_bank
from mta.config import AdaptConfig, BankConfig
from mta.data.schema import Dataset, User
from mta.engine import Row
from mta.errors import MtaError
from mta.inference import generate_routed
from mta.personalize import Personalizer, Request
from mta.retrieval import retrieve
from mta.stacking import adapt_users
from mta.store import UserStore
from mta.tasks import get_task

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


def split_users(users: list[User], targets_fraction: float, seed: int) -> tuple[list[User], list[User]]:
    """(anchor candidates, targets), seeded. Targets need at least one query with a gold."""
    if not 0 < targets_fraction < 1:
        raise MtaError(f"--targets-fraction must be in (0, 1), got {targets_fraction}")
    order = list(range(len(users)))
    random.Random(seed).shuffle(order)
    n_t = max(1, round(targets_fraction * len(users)))
    if n_t >= len(users):
        raise MtaError(f"{len(users)} users cannot be split into anchor candidates and targets")
    targets = [users[i] for i in sorted(order[:n_t])]
    candidates = [users[i] for i in sorted(order[n_t:])]
    return candidates, targets


def score_method(task, name: str, users: list[User], answers: list[tuple[str, object, str | None]],
                 seconds: float) -> dict:
    scored = [(p, g) for _, p, g in answers if g is not None]
    if not scored:
        raise MtaError("the target users have no query with a gold output to score")
    return {"method": name, "queries": len(answers), "scored": len(scored),
            "seconds_per_user_inference": seconds / max(1, len(users)),
            "metrics": task.score([p for p, _ in scored], [g for _, g in scored])}


def evaluate_targets(model, tokenizer, embedder, embedder_id: str, bank: Path, store: Path,
                     targets: list[User], task, retrieve_k: int, max_new_tokens: int, batch_size: int,
                     progress: Progress | None = None) -> tuple[list[dict], list[dict]]:
    """base (no history), rag (BM25 top-k in the prompt), mta (fusion + stack, with RAG)."""
    queries = [(u, q) for u in targets for q in u.queries]
    pz = Personalizer(model, tokenizer, embedder, embedder_id, bank, task, store)
    results, preds = [], []
    try:
        for name, k in (("base", 0), (f"rag-{retrieve_k}" if retrieve_k != 1 else "rag", retrieve_k)):
            if name.startswith("rag") and k == 0:
                continue
            prompts = [task.prompt(q.input, retrieve(task, q.input, u.history, k)) for u, q in queries]
            t0 = time.perf_counter()
            texts = generate_routed(pz.engine, tokenizer, prompts, [Row(active=False)] * len(prompts),
                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    on_batch=(lambda n, m=name: progress(m, n, len(queries)))
                                    if progress else None)
            sec = time.perf_counter() - t0
            ans = [(t, task.parse(t), q.gold) for t, (u, q) in zip(texts, queries)]
            results.append(score_method(task, name, targets, ans, sec))
            preds += [{"method": name, "user_id": u.user_id, "query_id": q.id, "output": t, "parsed": p,
                       "gold": g} for (t, p, g), (u, q) in zip(ans, queries)]
        t0 = time.perf_counter()
        out = pz.answer([Request(u.user_id, q.input, u) for u, q in queries], retrieve_k, max_new_tokens,
                        batch_size, on_batch=(lambda n: progress("mta", n, len(queries))) if progress else None)
        sec = time.perf_counter() - t0
        ans = [(a.output, a.parsed, q.gold) for a, (u, q) in zip(out, queries)]
        results.append(score_method(task, "mta", targets, ans, sec))
        preds += [{"method": "mta", "user_id": u.user_id, "query_id": q.id, "output": a.output,
                   "parsed": a.parsed, "gold": q.gold, "route": a.route} for a, (u, q) in zip(out, queries)]
    finally:
        pz.close()
    return results, preds


def run_pipeline(ds: Dataset, out: Path, model, tokenizer, embedder, model_id: str, embedder_id: str,
                 bank_cfg: BankConfig, adapt_cfg: AdaptConfig, targets_fraction: float, seed: int,
                 max_new_tokens: int = 12, batch_size: int = 8, progress: Progress | None = None) -> dict:
    task = get_task(ds.task)
    out.mkdir(parents=True, exist_ok=True)
    candidates, targets = split_users(ds.users, targets_fraction, seed)
    split = {"seed": seed, "targets_fraction": targets_fraction,
             "anchor_candidates": [u.user_id for u in candidates], "targets": [u.user_id for u in targets]}
    (out / "split.json").write_text(json.dumps(split, indent=2))
    times = {}
    t0 = time.perf_counter()
    idx = build_bank(candidates, task, model, tokenizer, embedder, embedder_id, model_id, bank_cfg,
                     out / "bank", progress)
    times["bank_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = UserStore(out / "store")
    adapt = adapt_users(model, tokenizer, embedder, embedder_id, out / "bank", targets, task, adapt_cfg,
                        store, progress)
    times["adapt_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results, preds = evaluate_targets(model, tokenizer, embedder, embedder_id, out / "bank", out / "store",
                                      targets, task, adapt_cfg.retrieve_k, max_new_tokens, batch_size,
                                      progress)
    times["inference_seconds"] = time.perf_counter() - t0
    bytes_pu = list(adapt["bytes_per_user"].values())
    summary = {
        **times, "anchors": len(idx.anchor_ids), "anchor_notes": idx.data.get("notes", []),
        "targets": len(targets), "anchor_candidates": len(candidates),
        "trainable_params_per_user": adapt["trainable_params_per_user"],
        "bytes_per_user_mean": sum(bytes_pu) / max(1, len(bytes_pu)),
        "adapt_seconds_per_user": adapt["seconds_per_user"],
    }
    return {"results": results, "predictions": preds, "summary": summary, "split": split}
