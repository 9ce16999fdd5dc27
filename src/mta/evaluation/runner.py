"""`mta eval`: every method under one protocol (folds), one base model, with intervals."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from mta.anchors import embed_users
from mta.bank import build_bank, read_index, training_history
from mta.data.schema import Dataset, User
from mta.evaluation import plots
from mta.evaluation.methods import BANK_METHODS, EvalSetup, FoldResult, run_mta, run_private, run_prompt
from mta.evaluation.protocol import make_folds
from mta.evaluation.stats import bootstrap_ci, paired_diff_ci, user_stats
from mta.paths import write_json_atomic, write_text_atomic
from mta.store import UserStore, user_key

log = logging.getLogger(__name__)


def cut_history(users: list[User], n: int | None) -> list[User]:
    """Targets keep only their first ``n`` history items (chronological order as given)."""
    if not n:
        return users
    return [u.model_copy(update={"history": u.history[:n]}) for u in users]


def _item_ids(user: User) -> tuple:
    return tuple((it.id, it.model_dump_json()) for it in user.history)


def scored_users(users: list[User]) -> list[User]:
    return [u for u in users if any(q.gold is not None for q in u.queries)]


def method_stats(task, users: list[User], preds: dict[str, list]) -> np.ndarray:
    """(scored users, d): each scored user's summed query statistics for one method's
    parsed predictions (``preds[user_id]``, one per query); queries without gold skipped."""
    su = scored_users(users)
    return user_stats([[p for p, q in zip(preds[u.user_id], u.queries) if q.gold is not None] for u in su],
                      [[q.gold for q in u.queries if q.gold is not None] for u in su], task.query_stats)


def summarise(task, users: list[User], results: dict[str, FoldResult], reference: str | None,
              n_boot: int, seed: int) -> list[dict]:
    """Per method: metrics with 95% CIs, paired difference to ``reference``, costs."""
    su = scored_users(users)
    n_queries = sum(q.gold is not None for u in su for q in u.queries)
    stats = {name: method_stats(task, users, res.preds) for name, res in results.items()}
    rows = []
    for name, res in results.items():
        row = {"method": name, "users": len(su), "queries": n_queries, "metrics": {}}
        for m in task.metric_names:
            def fn(s, m=m):
                return task.metrics_from_stats(s)[m]

            v, lo, hi = bootstrap_ci(stats[name], fn, n_boot=n_boot, seed=seed)
            row["metrics"][m] = {"value": v, "ci": [lo, hi]}
            if reference and reference in results and name != reference:
                d, dlo, dhi = paired_diff_ci(stats[name], stats[reference], fn, n_boot=n_boot, seed=seed)
                row["metrics"][m]["diff_vs_" + reference] = {"value": d, "ci": [dlo, dhi],
                                                             "significant": bool(dlo > 0 or dhi < 0)}
        n = max(1, len(res.preds))
        row["seconds_per_user_adapt"] = res.adapt_seconds / n
        row["seconds_per_user_inference"] = res.infer_seconds / n
        b = list(res.bytes_per_user.values())
        row["bytes_per_user"] = float(np.mean(b)) if b else 0.0
        row["trainable_params_per_user"] = res.trainable_params_per_user
        rows.append(row)
    return rows


def merge(into: FoldResult | None, part: FoldResult) -> FoldResult:
    if into is None:
        return part
    into.preds.update(part.preds)
    into.outputs.update(part.outputs)
    into.bytes_per_user.update(part.bytes_per_user)
    into.adapt_seconds += part.adapt_seconds
    into.infer_seconds += part.infer_seconds
    into.trainable_params_per_user = part.trainable_params_per_user or into.trainable_params_per_user
    return into


def run_eval(ds: Dataset, methods: list[str], setup: EvalSetup, out: Path, folds: int, seed: int,
             model_id: str, target_history: int | None = None, n_boot: int = 1000) -> dict:
    task = setup.task
    out.mkdir(parents=True, exist_ok=True)
    fold_list = make_folds(ds.users, folds, seed)
    results: dict[str, FoldResult | None] = {m: None for m in methods}
    split = []
    t_start = time.perf_counter()
    bank_seconds = 0.0
    targets = {f.index: cut_history(list(f.targets), target_history) for f in fold_list}
    # Per-user LoRAs first: they follow the bank's recipe (rank, lr, epochs, examples), so
    # an anchor's meta-LoRA IS its per-user LoRA when it trains on the same history; the
    # banks below copy those instead of training the same adapter twice.
    own: dict[str, tuple[tuple, Path]] = {}
    if "per-user-lora" in methods:
        for fold in fold_list:
            d = out / f"fold{fold.index}" / "per-user-lora"
            results["per-user-lora"] = merge(results["per-user-lora"],
                                             run_private(setup, "per-user-lora", targets[fold.index], d))
            for u in targets[fold.index]:
                own[u.user_id] = (_item_ids(training_history(u, setup.bank_cfg)), d / user_key(u.user_id))

    def trained(user: User) -> Path | None:
        hit = own.get(user.user_id)
        return hit[1] if hit and hit[0] == _item_ids(user) else None

    for fold in fold_list:
        split.append({"fold": fold.index, "targets": [u.user_id for u in targets[fold.index]],
                      "anchor_candidates": [u.user_id for u in fold.candidates]})
        fdir = out / f"fold{fold.index}"
        bank = fdir / "bank"
        if BANK_METHODS & set(methods):
            t0 = time.perf_counter()
            build_bank(list(fold.candidates), task, setup.model, setup.tokenizer, setup.embedder, setup.embedder_id,
                       model_id, setup.bank_cfg, bank,
                       (lambda s, d, t, f=fold.index: setup.progress(f"fold {f} bank {s}", d, t))
                       if setup.progress else None, trained=trained)
            bank_seconds += time.perf_counter() - t0
        for m in methods:
            if m == "per-user-lora":
                continue
            if m == "base" or m.startswith("rag-"):
                part = run_prompt(setup, m, targets[fold.index])
            elif m == "mta-stack":
                part = run_private(setup, m, targets[fold.index], fdir / m)
            else:
                part = run_mta(setup, m, targets[fold.index], bank, fdir / m)
            results[m] = merge(results[m], part)
    reference = "rag-1" if "rag-1" in methods else None
    rows = summarise(task, ds.users, results, reference, n_boot, seed)
    write_json_atomic(out / "split.json", split)
    preds = [{"method": m, "user_id": uid, "outputs": r.outputs[uid], "parsed": r.preds[uid]}
             for m, r in results.items() for uid in r.preds]
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in preds))
    return {"rows": rows, "bank_seconds": bank_seconds, "wall_seconds": time.perf_counter() - t_start,
            "folds": split}


def anchor_map_for(ds: Dataset, setup: EvalSetup, out: Path, title: str) -> Path | None:
    """The anchor map of fold 0: all users embedded, fold 0's anchors, a few targets' links."""
    bank = out / "fold0" / "bank"
    if not (bank / "index.json").exists():
        return None
    idx = read_index(bank)
    emb = embed_users(ds.users, setup.task, setup.embedder)
    pos = {u.user_id: i for i, u in enumerate(ds.users)}
    anchors = [pos[a] for a in idx.anchor_ids if a in pos]
    links = []
    for name in ("mta", "mta-reference", "mta-fusion"):
        store = UserStore(out / "fold0" / name)
        ids = store.user_ids()
        if ids:
            for uid in ids[:8]:
                meta = store.meta(uid)
                links.append((pos[uid], [pos[a] for a in meta["anchor_users"] if a in pos]))
            break
    path = out / "anchor_map.png"
    plots.anchor_map(emb, [u.user_id for u in ds.users], anchors, links, title, path)
    return path
