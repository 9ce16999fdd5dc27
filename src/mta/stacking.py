"""Stage 3: per-user stacked adapters over the fused anchors, many users per pass.

For each target user: their mixture (stage 2) is recomputed from their history, the
bank and the mixture are frozen, and a rank-``stack_rank`` LoRA is trained on their
history (leave-one-out, BM25 context). Users whose history and settings are unchanged
since they were stored are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mta.anchors import embed_users
from mta.bank import BankIndex, load_bank
from mta.config import AdaptConfig
from mta.data.schema import User
from mta.engine import Job, Row, TrainConfig, train_jobs
from mta.engine.peft_io import save_user
from mta.errors import MtaError
from mta.examples import loo_examples
from mta.mixing import Mixture, mixtures_for
from mta.store import UserStore, history_hash
from mta.tasks.base import Task

log = logging.getLogger(__name__)
USERS_PER_PASS = 64


def bank_id(idx: BankIndex) -> str:
    payload = {"anchors": idx.anchor_ids, "fingerprint": idx.data["fingerprint"], "config": idx.data["config"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def user_mixtures(users: list[User], task: Task, embedder, idx: BankIndex, cfg: AdaptConfig) -> list[Mixture]:
    emb = embed_users(users, task, embedder)
    return mixtures_for(emb, idx.embeddings, cfg.top_k, cfg.weighting, cfg.temperature)


def stack_params_per_user(engine, rank: int, modules=None, last_layers: int | None = None) -> int:
    """Trainable parameters of one user's stack: sum over its layers of (in + out) x rank
    (computed from the layer shapes, so it is right even when no user was trained)."""
    return sum((engine.layers[n].in_features + engine.layers[n].out_features) * rank
               for n in engine.stack_selection(modules, last_layers))


def adapt_users(
    model, tokenizer, embedder, embedder_id: str, bank: Path, users: list[User], task: Task,
    cfg: AdaptConfig, store: UserStore, progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Adapt ``users`` into ``store``. Returns counts, timings and per-user costs."""
    for u in users:
        if not u.history:
            raise MtaError(f"user '{u.user_id}' has 0 history items; stacking needs at least 1")
    engine, idx = load_bank(model, bank)
    try:
        if idx.data["task"] != task.name:
            raise MtaError(f"bank {bank} was built for task {idx.data['task']}, not {task.name}")
        if idx.data["embedder"] != embedder_id:
            raise MtaError(f"bank {bank} used embedder {idx.data['embedder']!r}; pass --embedder "
                           f"{idx.data['embedder']} (got {embedder_id!r})")
        t0 = time.perf_counter()
        mixes = user_mixtures(users, task, embedder, idx, cfg)
        fuse_s = time.perf_counter() - t0
        bid = bank_id(idx)
        settings = {"bank": bid, "adapt": json.loads(cfg.model_dump_json())}
        hashes = [history_hash(u, task.name, settings) for u in users]
        todo = [i for i, u in enumerate(users)
                if not (store.has(u.user_id) and store.meta(u.user_id).get("history_hash") == hashes[i])]
        skipped = len(users) - len(todo)
        if skipped:
            log.info("%d user(s) unchanged since they were stored; skipping them", skipped)
        tcfg = TrainConfig(lr=cfg.stack_lr, epochs=max(1, cfg.stack_epochs), batch_size=cfg.batch_size,
                           warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, max_rows=cfg.max_rows)
        done = 0
        train_s = 0.0
        if progress:
            progress("users", 0, len(todo))
        for g in range(0, len(todo), USERS_PER_PASS):
            group = todo[g:g + USERS_PER_PASS]
            stats = None
            t1 = time.perf_counter()
            if cfg.stack_epochs > 0:
                engine.add_users(len(group), cfg.stack_rank, cfg.alpha_s, seed=cfg.seed + g,
                                 modules=cfg.stack_targets, last_layers=cfg.stack_layers)
                if cfg.merge == "svd":
                    engine.install_svd([(mixes[i].anchors, mixes[i].weights) for i in group], cfg.svd_rank)
                rows = [Row(fused=j, user=j) if cfg.merge == "svd" else
                        Row(mixes[i].anchors, mixes[i].weights, user=j) for j, i in enumerate(group)]
                jobs = [Job(j, loo_examples(task, users[i], tokenizer, cfg.retrieve_k, cfg.max_length),
                            rows[j], key=f"user:{users[i].user_id}") for j, i in enumerate(group)]
                stats = train_jobs(engine, "stack", jobs, tcfg, pad_id=tokenizer.pad_token_id,
                                   mode="delta" if cfg.merge == "svd" else cfg.merge,
                                   on_step=(lambda s, t: progress("steps", s, t)) if progress else None)
            train_s += time.perf_counter() - t1
            for j, i in enumerate(group):
                u, m = users[i], mixes[i]
                meta = {
                    "task": task.name, "bank": bid, "history_hash": hashes[i], "merge": cfg.merge,
                    "svd_rank": cfg.svd_rank if cfg.merge == "svd" else None,
                    "anchors": list(m.anchors), "anchor_users": [idx.anchor_ids[a] for a in m.anchors],
                    "weights": list(m.weights), "similarities": list(m.similarities),
                    "stack": None if stats is None else {
                        "rank": cfg.stack_rank, "alpha": cfg.alpha_s, "epochs": cfg.stack_epochs,
                        "targets": list(cfg.stack_targets) if cfg.stack_targets else None,
                        "layers": cfg.stack_layers,
                        "lr": cfg.stack_lr, "examples": len(u.history),
                        "losses": stats["losses"][f"user:{u.user_id}"]},
                    "history_items": len(u.history),
                }
                writer = None if stats is None else (
                    lambda d, j=j, uid=u.user_id: save_user(engine, j, d, base_model=idx.data["model"],
                                                            extra={"user_id": uid}))
                store.put(u.user_id, meta, writer)
                done += 1
            if progress:
                progress("users", done, len(todo))
        per_user = stack_params_per_user(engine, cfg.stack_rank, cfg.stack_targets,
                                         cfg.stack_layers) if cfg.stack_epochs > 0 else 0
        return {"adapted": done, "skipped": skipped, "fusion_seconds": fuse_s, "train_seconds": train_s,
                "seconds_per_user": (fuse_s + train_s) / max(1, len(users)),
                "trainable_params_per_user": per_user,
                "bytes_per_user": {u.user_id: store.bytes_of(u.user_id) for u in users}}
    finally:
        engine.remove()
