"""Stage 1b: the meta-LoRA bank on disk, built in one pass per group of anchors.

Layout of a bank directory::

    BANK/index.json                  anchors (user ids, embeddings, losses), embedder,
                                     base-model fingerprint, resolved config, task, model
    BANK/anchors/000/                anchor 0 in PEFT format (adapter_config.json +
                                     adapter_model.safetensors)

Anchors train in groups of ``group_size`` (one pass each). After a group, its adapters
and the index are written atomically, so an interrupted build resumes with the anchors
not yet done; an index only ever lists anchors whose files are complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mta.anchors import embed_users, select_anchors
from mta.config import BankConfig
from mta.data.schema import User
from mta.engine import AdapterEngine, EngineSpec, Job, Row, TrainConfig, train_jobs
from mta.engine.fingerprint import check_fingerprint, model_fingerprint
from mta.engine.peft_io import load_adapter, load_anchor, save_adapter, save_anchor
from mta.errors import MtaError
from mta.examples import loo_examples
from mta.paths import write_json_atomic
from mta.tasks.base import Task

log = logging.getLogger(__name__)
INDEX = "index.json"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class BankIndex:
    path: Path
    data: dict

    @property
    def anchor_ids(self) -> list[str]:
        return [a["user_id"] for a in self.data["anchors"]]

    @property
    def embeddings(self) -> np.ndarray:
        return np.asarray([a["embedding"] for a in self.data["anchors"]], dtype=np.float32)

    @property
    def config(self) -> BankConfig:
        return BankConfig.make(**self.data["config"])

    @property
    def complete(self) -> bool:
        return all(a.get("done") for a in self.data["anchors"])

    def adapter_dir(self, slot: int) -> Path:
        return self.path / "anchors" / f"{slot:03d}"


def read_index(bank: Path) -> BankIndex:
    f = Path(bank) / INDEX
    if not f.exists():
        have = ", ".join(sorted(p.name for p in Path(bank).iterdir())) if Path(bank).is_dir() else "nothing"
        raise MtaError(f"{bank}: not a bank (no {INDEX}; found: {have or 'nothing'}); "
                       "build one with: mta bank build")
    try:
        return BankIndex(Path(bank), json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise MtaError(f"{f}: corrupt bank index ({e.msg})") from None


def training_history(user: User, cfg: BankConfig) -> User:
    """The history an anchor trains on: its latest ``cfg.max_items`` items."""
    if cfg.max_items is None or len(user.history) <= cfg.max_items:
        return user
    return user.model_copy(update={"history": user.history[-cfg.max_items:]})


def build_bank(
    users: list[User], task: Task, model, tokenizer, embedder, embedder_id: str, model_id: str,
    cfg: BankConfig, out: Path, progress: Progress | None = None,
    trained: Callable[[User], Path | None] | None = None,
) -> BankIndex:
    """Select anchors among ``users`` and train their meta-LoRAs into ``out`` (resumable).

    ``trained(user)`` may return an adapter already trained with exactly this recipe on
    exactly ``training_history(user, cfg)`` (in `mta eval`, the user's per-user LoRA):
    it is copied in instead of training the anchor again.
    """
    out = Path(out)
    fp = model_fingerprint(model)
    index_file = out / INDEX
    if index_file.exists():
        idx = read_index(out)
        check_fingerprint(idx.data.get("fingerprint"), fp, f"bank {out}")
        if idx.data.get("task") != task.name:
            raise MtaError(f"bank {out} was built for task {idx.data.get('task')}, not {task.name}")
        if idx.data["config"] != json.loads(cfg.model_dump_json()):
            raise MtaError(f"bank {out} exists with another config; use a new --out or the same flags")
        log.info("resuming bank build in %s", out)
    else:
        t0 = time.perf_counter()
        emb = embed_users(users, task, embedder)
        sel = select_anchors(users, emb, cfg.anchors, cfg.min_history, cfg.seed)
        pos = {u.user_id: i for i, u in enumerate(users)}
        idx = BankIndex(out, {
            "task": task.name, "model": model_id, "embedder": embedder_id, "fingerprint": fp,
            "config": json.loads(cfg.model_dump_json()), "notes": sel.notes,
            "candidates": len(users), "embed_seconds": time.perf_counter() - t0,
            "anchors": [{"slot": s, "user_id": uid, "cluster": c,
                         "embedding": emb[pos[uid]].tolist(), "done": False}
                        for s, (uid, c) in enumerate(zip(sel.user_ids, sel.cluster_of_anchor))],
        })
        write_json_atomic(index_file, idx.data)
    by_id = {u.user_id: u for u in users}
    todo = [a for a in idx.data["anchors"] if not (a.get("done") and (idx.adapter_dir(a["slot"]) /
                                                                       "adapter_model.safetensors").exists())]
    missing = [a["user_id"] for a in todo if a["user_id"] not in by_id]
    if missing:
        raise MtaError(f"bank {out} needs anchor user(s) {missing[:3]} that are not in the data")
    if trained is not None:
        for a in list(todo):
            src = trained(training_history(by_id[a["user_id"]], cfg))
            if src is None:
                continue
            tensors, config, _ = load_adapter(src, fp)
            if int(config["r"]) != cfg.rank or float(config["lora_alpha"]) != cfg.alpha:
                raise MtaError(f"{src}: rank/alpha {config['r']}/{config['lora_alpha']} differ from the bank's "
                               f"{cfg.rank}/{cfg.alpha}; it was not trained with this recipe")
            save_adapter(idx.adapter_dir(a["slot"]), tensors, cfg.rank, cfg.alpha, fp, "anchor",
                         idx.data["model"], {"user_id": a["user_id"], "task": task.name})
            a.update(done=True, reused_from=str(src))
            todo.remove(a)
        write_json_atomic(index_file, idx.data)
    n = len(idx.data["anchors"])
    if progress:
        progress("anchors", n - len(todo), n)
    tcfg = TrainConfig(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, max_rows=cfg.max_rows)
    for g in range(0, len(todo), cfg.group_size):
        group = todo[g:g + cfg.group_size]
        t0 = time.perf_counter()
        engine = AdapterEngine(model, EngineSpec(n_anchors=len(group), rank=cfg.rank, alpha=cfg.alpha,
                                                 target_modules=tuple(cfg.target_modules)))
        try:
            engine.init_bank(seed=cfg.seed + group[0]["slot"])
            jobs = [Job(j, loo_examples(task, training_history(by_id[a["user_id"]], cfg), tokenizer,
                                        cfg.retrieve_k, cfg.max_length),
                        Row([j], [1.0]), key=f"anchor:{a['user_id']}") for j, a in enumerate(group)]
            stats = train_jobs(engine, "bank", jobs, tcfg, pad_id=tokenizer.pad_token_id,
                               on_step=(lambda s, t: progress("steps", s, t)) if progress else None)
            for j, a in enumerate(group):
                save_anchor(engine, j, idx.adapter_dir(a["slot"]), base_model=idx.data["model"],
                            extra={"user_id": a["user_id"], "task": task.name})
                losses = stats["losses"][f"anchor:{a['user_id']}"]
                a.update(done=True, examples=len(jobs[j].examples), final_loss=losses[-1],
                         first_loss=losses[0], train_seconds=(time.perf_counter() - t0) / len(group))
        finally:
            engine.remove()
        write_json_atomic(index_file, idx.data)
        if progress:
            progress("anchors", n - len(todo) + g + len(group), n)
    return idx


def load_bank(model, bank: Path, extra_users: int = 0) -> tuple[AdapterEngine, BankIndex]:
    """Inject a built bank into ``model`` (fingerprint-checked); anchors occupy slots 0..N-1."""
    idx = read_index(bank)
    if not idx.complete:
        raise MtaError(f"bank {bank} is incomplete; rerun the same `mta bank build` to resume it")
    check_fingerprint(idx.data.get("fingerprint"), model_fingerprint(model), f"bank {bank}")
    cfg = idx.config
    engine = AdapterEngine(model, EngineSpec(n_anchors=len(idx.anchor_ids), rank=cfg.rank,
                                             alpha=cfg.alpha, target_modules=tuple(cfg.target_modules)))
    try:
        for slot in range(len(idx.anchor_ids)):
            load_anchor(engine, slot, idx.adapter_dir(slot))
    except Exception:
        engine.remove()
        raise
    return engine, idx
