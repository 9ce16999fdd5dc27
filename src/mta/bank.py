"""Stage 1b: the meta-LoRA bank on disk, built in one pass per group of anchors.

Layout of a bank directory::

    BANK/index.json                  a ``BankRecord``: anchors (user ids, embeddings,
                                     losses), embedder, base-model fingerprint, config, task
    BANK/anchors/000/                anchor 0 in PEFT format (adapter_config.json +
                                     adapter_model.safetensors)

Anchors train in groups of ``group_size`` (one pass each). After a group, its adapters
and the index are written atomically, so an interrupted build resumes with the anchors
not yet done; an index only ever lists anchors whose files are complete.

A *private* bank (``build_private``) has every given user as its own anchor: the
per-user LoRA baseline, trained with the same recipe and opened like any bank. A *task*
bank (``build_task``) has ONE anchor trained on the pooled histories of the given users:
the shared task LoRA (no personalisation), which OPPU stacks per-user LoRAs on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mta import defaults
from mta.anchors import embed_users, select_anchors
from mta.backbone import Backbone
from mta.config import BankConfig
from mta.data.schema import User
from mta.engine.engine import Row
from mta.engine.peft_io import WEIGHTS, load_adapter, load_anchor, save_adapter, save_anchor
from mta.engine.train import Job, train_jobs
from mta.errors import MtaError
from mta.examples import held_out, loo_examples, negative_pool
from mta.paths import (
    LOCK,
    atomic_path,
    check_output_dir,
    fault,
    foreign_entries,
    recover,
    sha256_file,
    write_text_atomic,
    writer,
)
from mta.records import AnchorRecord, BankRecord, dump, read_bank_record
from mta.tasks.base import Task

log = logging.getLogger(__name__)
INDEX = "index.json"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def adapter_dir(bank: Path, slot: int) -> Path:
    return Path(bank) / "anchors" / f"{slot:03d}"


BASE_DIR = "base"  # a residual bank's task LoRA: a task bank of its own inside the bank


def base_adapter(bank: Path) -> Path:
    """The task LoRA under a residual bank's anchors (``bank_base`` "task")."""
    return adapter_dir(Path(bank) / BASE_DIR, 0)


def load_base(engine, slot: int, bank: Path, rec: BankRecord) -> None:
    """Put a residual bank's task LoRA into the bank table's ``slot``, after checking it
    against the checksum its index records (a missing or changed file is one error)."""
    d = base_adapter(bank)
    if rec.base_sha256 is None or not (d / WEIGHTS).is_file() or sha256_file(d / WEIGHTS) != rec.base_sha256:
        raise MtaError(f"bank {bank}: its task LoRA ({d / WEIGHTS}) is missing or does not match its checksum "
                       "(corrupt); rebuild the bank")
    load_anchor(engine, slot, d)


def read_index(bank: Path) -> BankRecord:
    f = Path(bank) / INDEX
    if not f.exists():
        have = ", ".join(sorted(p.name for p in Path(bank).iterdir())) if Path(bank).is_dir() else "nothing"
        raise MtaError(f"{bank}: not a bank (no {INDEX}; found: {have or 'nothing'}); "
                       "build one with: mta bank build")
    return read_bank_record(f)


def training_history(user: User, cfg: BankConfig) -> User:
    """The history an anchor trains on: its latest ``cfg.max_items`` items."""
    if cfg.max_items is None or len(user.history) <= cfg.max_items:
        return user
    return user.model_copy(update={"history": user.history[-cfg.max_items:]})


def check_out(out: Path) -> None:
    """A bank is written into a new or empty directory, or resumes one that is a bank."""
    check_output_dir(out, lambda d: (d / INDEX).is_file(), "a bank")


def _bank_writer(fn):
    """Run a bank build as the bank's one writer, after repairing what a crashed build
    left; a directory this call created is removed again if it fails before the index."""

    @functools.wraps(fn)
    def wrapped(backbone, users, task, cfg, out, *args, **kwargs):
        out = Path(out)
        check_out(out)
        created = not foreign_entries(out)
        try:
            with writer(out, "bank"):
                for note in recover(out) + recover(out / "anchors"):
                    log.warning("bank %s: %s", out, note)
                return fn(backbone, users, task, cfg, out, *args, **kwargs)
        except BaseException:
            if created and not (out / INDEX).exists():  # nothing of a bank was written: leave no trace
                for name in ("anchors", LOCK):
                    p = out / name
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise

    return wrapped


def check_resume(out: Path, backbone: Backbone, task: Task, cfg: BankConfig, users: list[User] | None = None) -> None:
    """Before anything is written: an existing bank at ``out`` must be resumable with these
    settings (same base model, task and config) and, when given, these candidate users."""
    check_out(out)
    if (Path(out) / INDEX).exists():
        _check_resume(read_index(out), backbone, task, cfg, Path(out), "bank", users)


def pool_digest(users: list[User]) -> str:
    """The identity of a bank's candidate pool: every user's id and history."""
    pool = sorted([u.user_id, [it.model_dump(mode="json") for it in u.history]] for u in users)
    return hashlib.sha256(json.dumps(pool, sort_keys=True).encode()).hexdigest()


def _check_resume(rec: BankRecord, backbone: Backbone, task: Task, cfg: BankConfig, out: Path, kind: str,
                  users: list[User] | None = None) -> None:
    from mta.engine.fingerprint import check_fingerprint

    check_fingerprint(rec.fingerprint, backbone.fingerprint, f"bank {out}")
    if rec.task != task.name:
        raise MtaError(f"bank {out} was built for task {rec.task}, not {task.name}")
    if rec.kind != kind or rec.config != cfg:
        raise MtaError(f"bank {out} exists with another configuration; use a new output directory or the "
                       "same settings")
    if users is not None and rec.data_sha256 is not None and rec.data_sha256 != pool_digest(users):
        raise MtaError(f"bank {out} was built from other data ({rec.candidates} candidate users; these are "
                       f"{len(users)}, or their histories differ); use a new output directory, or the data it was "
                       "built from to resume it")


@_bank_writer
def build_bank(
    backbone: Backbone, users: list[User], task: Task, cfg: BankConfig, out: Path,
    progress: Progress | None = None, trained: Callable[[User], Path | None] | None = None,
    recipe: dict | None = None, base_cfg: BankConfig | None = None, base_from: Path | None = None,
) -> BankRecord:
    """Select anchors among ``users`` and train their meta-LoRAs into ``out`` (resumable).
    ``recipe``: AdaptConfig settings to record with the bank as defaults for adaptation.
    ``cfg.bank_base`` "task": the task LoRA is trained first (``ensure_base``, with
    ``base_cfg``'s learning rate and steps when given; copied from ``base_from`` when that
    task bank is this very one, finished) and every anchor trains as a residual over it,
    frozen.

    ``trained(user)`` may return an adapter already trained with exactly this recipe on
    exactly ``training_history(user, cfg)`` (in `mta eval`, the user's per-user LoRA):
    it is copied in instead of training the anchor again. Fields of ``cfg`` not set come
    from the model's registered recipe for ``task`` (``mta.defaults``), as in `mta bank build`.
    """
    cfg = defaults.resolve(cfg, defaults.layers(backbone.model_id, task.name))
    rec = prepare_bank(backbone, users, task, cfg, out, recipe, progress)
    ensure_base(backbone, rec, users, task, cfg, Path(out), base_cfg, progress, base_from)
    _train_missing(backbone, rec, users, task, cfg, Path(out), "anchor", progress, trained)
    return rec


def ensure_base(backbone: Backbone, rec: BankRecord, users: list[User], task: Task, cfg: BankConfig, out: Path,
                base_cfg: BankConfig | None = None, progress: Progress | None = None,
                base_from: Path | None = None) -> None:
    """``bank_base`` "task": train the task LoRA every anchor is a residual over, first, on
    the bank's whole candidate pool (``build_task`` into ``BANK/base``: resumable, and the
    same adapter as the ``task-lora`` baseline when ``base_cfg`` is its recipe), and record
    its checksum. ``base_from``: a task bank that may be that very adapter, trained already
    (the ``task-lora`` baseline's, in `mta eval` and `mta tune`): when it is finished, with
    this recipe, model, task and pool, it is copied in instead of training it again.
    Nothing for a bank without a base, or one whose base is trained."""
    if cfg.bank_base != "task" or rec.base_sha256 is not None:
        return
    base_cfg = (base_cfg or cfg).model_copy(update={"bank_base": "none"})
    dest = Path(out) / BASE_DIR
    if base_from is not None and not (dest / INDEX).exists() and finished_task(base_from, backbone, task, base_cfg,
                                                                               users):
        with atomic_path(dest) as tmp:
            shutil.copytree(base_from, tmp, ignore=shutil.ignore_patterns(LOCK))
        log.info("bank %s: its task LoRA copied from %s (trained with the same recipe on the same pool)", out,
                 base_from)
    build_task(backbone, users, task, base_cfg, Path(out) / BASE_DIR,
               (lambda st, d, t: progress(f"base {st}", d, t)) if progress else None)
    rec.base_sha256 = sha256_file(base_adapter(out) / WEIGHTS)
    write_text_atomic(Path(out) / INDEX, dump(rec))


def prepare_bank(backbone: Backbone, users: list[User], task: Task, cfg: BankConfig, out: Path,
                 recipe: dict | None = None, progress: Progress | None = None) -> BankRecord:
    """The bank's index: anchors chosen and written, none trained yet (or, when ``out``
    already holds this bank, the index as it is, for a resume). No lock: the caller is
    the bank's writer."""
    out = Path(out)
    if (out / INDEX).exists():
        rec = read_index(out)
        _check_resume(rec, backbone, task, cfg, out, "bank", users)
        log.info("resuming bank build in %s", out)
    else:
        t0 = time.perf_counter()
        if progress:
            progress("items embedded", 0, sum(len(u.history) for u in users))
        emb = embed_users(users, task, backbone.embedder,
                          progress=(lambda d, t: progress("items embedded", d, t)) if progress else None)
        sel = select_anchors(users, emb, cfg.anchors, cfg.min_history, cfg.seed)
        pos = {u.user_id: i for i, u in enumerate(users)}
        pooled = cfg.anchor_training == "cluster"

        def embedding(uid: str, members: list[str]) -> list[float]:
            # a pooled anchor stands for its cluster: retrieval compares targets with the
            # members' mean (normalised like every embedding), not with one user
            if not pooled:
                return emb[pos[uid]].tolist()
            mean = emb[[pos[m] for m in members]].mean(axis=0)
            return (mean / max(float(np.linalg.norm(mean)), 1e-12)).tolist()

        rec = BankRecord(
            task=task.name, model=backbone.model_id, embedder=backbone.embedder_id,
            fingerprint=backbone.fingerprint, config=cfg, notes=sel.notes, candidates=len(users),
            data_sha256=pool_digest(users), negatives=negative_pool(task, users, cfg.seed), recipe=recipe or {},
            embed_seconds=time.perf_counter() - t0,
            anchors=[AnchorRecord(slot=s, user_id=uid, cluster=c, embedding=embedding(uid, m),
                                  members=m if pooled else [])
                     for s, (uid, c, m) in enumerate(zip(sel.user_ids, sel.cluster_of_anchor, sel.members))])
        write_text_atomic(out / INDEX, dump(rec))
    return rec


@_bank_writer
def build_private(backbone: Backbone, users: list[User], task: Task, cfg: BankConfig, out: Path,
                  progress: Progress | None = None) -> BankRecord:
    """One LoRA per user, each on its own history, with the bank's recipe, all in ONE
    pass (``group_size`` does not apply): a bank whose anchors are ``users``."""
    out = Path(out)
    cfg_all = cfg.model_copy(update={"group_size": max(1, len(users))})
    if (out / INDEX).exists():
        rec = read_index(out)
        _check_resume(rec, backbone, task, cfg_all, out, "private")
    else:
        rec = BankRecord(kind="private", task=task.name, model=backbone.model_id, embedder=backbone.embedder_id,
                         fingerprint=backbone.fingerprint, config=cfg_all, candidates=len(users),
                         negatives=negative_pool(task, users, cfg.seed),
                         anchors=[AnchorRecord(slot=s, user_id=u.user_id, cluster=s, embedding=[])
                                  for s, u in enumerate(users)])
        write_text_atomic(out / INDEX, dump(rec))
    _train_missing(backbone, rec, users, task, cfg_all, out, "user", progress, None)
    return rec


TASK_ANCHOR = "(task)"


@_bank_writer
def build_task(backbone: Backbone, users: list[User], task: Task, cfg: BankConfig, out: Path,
               progress: Progress | None = None) -> BankRecord:
    """ONE LoRA with the bank's recipe on the pooled histories of ``users`` (each user's
    leave-one-out examples, with their own items as context): a bank of one anchor."""
    out = Path(out)
    if (out / INDEX).exists():
        rec = read_index(out)
        _check_resume(rec, backbone, task, cfg, out, "task")
        if rec.pooled != [u.user_id for u in users]:
            raise MtaError(f"task bank {out} was trained on other users; use a new output directory")
    else:
        rec = BankRecord(kind="task", task=task.name, model=backbone.model_id, embedder=backbone.embedder_id,
                         fingerprint=backbone.fingerprint, config=cfg, candidates=len(users),
                         negatives=negative_pool(task, users, cfg.seed),
                         pooled=[u.user_id for u in users],
                         anchors=[AnchorRecord(slot=0, user_id=TASK_ANCHOR, cluster=0, embedding=[])])
        write_text_atomic(out / INDEX, dump(rec))
    _train_missing(backbone, rec, users, task, cfg, out, "task", progress, None)
    return rec


def finished_task(path: Path, backbone: Backbone, task: Task, cfg: BankConfig, users: list[User]) -> bool:
    """Whether ``path`` holds a finished task bank that ``build_task`` with these arguments
    would leave: the same recipe, model, task and pool of users, its one adapter intact."""
    path = Path(path)
    if not (path / INDEX).is_file():
        return False
    try:  # what resuming it would check (build_task), then that its training is done
        rec = read_index(path)
        _check_resume(rec, backbone, task, cfg, path, "task")
    except MtaError:
        return False
    return (rec.pooled == [u.user_id for u in users] and rec.negatives == negative_pool(task, users, cfg.seed)
            and all(_intact(path, a) for a in rec.anchors))


def _intact(out: Path, a: AnchorRecord) -> bool:
    """A finished anchor whose file is there and matches its checksum; anything else is
    trained again (so rerunning a build repairs a damaged anchor, as its error advises)."""
    f = adapter_dir(out, a.slot) / WEIGHTS
    if not (a.done and f.is_file()):
        return False
    if a.sha256 is not None and sha256_file(f) != a.sha256:
        log.warning("anchor %d (%s) does not match its checksum; training it again", a.slot, a.user_id)
        return False
    return True


def _train_missing(backbone: Backbone, rec: BankRecord, users: list[User], task: Task, cfg: BankConfig, out: Path,
                   key_prefix: str, progress: Progress | None, trained) -> None:
    """Train (or copy in) every anchor of ``rec`` whose adapter is not complete, group by group."""
    by_id = {u.user_id: u for u in users}
    todo = [a for a in rec.anchors if not _intact(out, a)]
    missing = [a.user_id for a in todo if a.user_id not in by_id and rec.kind != "task"]
    if missing:
        raise MtaError(f"bank {out} needs anchor user(s) {missing[:3]} that are not in the data")
    if trained is not None:
        for a in list(todo):
            src = trained(training_history(by_id[a.user_id], cfg))
            if src is None:
                continue
            tensors, config, _ = load_adapter(src, backbone.fingerprint)
            if int(config["r"]) != cfg.rank or float(config["lora_alpha"]) != cfg.alpha:
                raise MtaError(f"{src}: rank/alpha {config['r']}/{config['lora_alpha']} differ from the bank's "
                               f"{cfg.rank}/{cfg.alpha}; it was not trained with this recipe")
            save_adapter(adapter_dir(out, a.slot), tensors, cfg.rank, cfg.alpha, backbone.fingerprint, "anchor",
                         rec.model, {"user_id": a.user_id, "task": task.name})
            a.done, a.reused_from = True, str(src)
            a.steps = _steps_of(src)
            a.sha256 = sha256_file(adapter_dir(out, a.slot) / WEIGHTS)
            todo.remove(a)
        write_text_atomic(out / INDEX, dump(rec))
    n = len(rec.anchors)
    if progress:
        progress("anchors", n - len(todo), n)
    for g in range(0, len(todo), cfg.group_size):
        group = todo[g:g + cfg.group_size]
        train_group(backbone, rec, [a.slot for a in group], users, task, cfg, out, key_prefix,
                    (lambda s, t: progress("steps", s, t)) if progress else None)
        write_text_atomic(out / INDEX, dump(rec))
        fault("bank:group-written")
        if progress:
            progress("anchors", n - len(todo) + g + len(group), n)


def _steps_of(adapter: Path) -> int | None:
    """The optimiser steps its bank recorded for ``adapter`` (BANK/anchors/NNN), if any."""
    bank = Path(adapter).parent.parent
    if not (bank / INDEX).is_file():
        return None
    return next((a.steps for a in read_index(bank).anchors if adapter_dir(bank, a.slot) == Path(adapter)), None)


def todo_groups(rec: BankRecord, out: Path, cfg: BankConfig) -> list[list[int]]:
    """The slots still to train, in the groups an unsharded build trains them in."""
    todo = [a.slot for a in rec.anchors if not (a.done and (adapter_dir(out, a.slot) / WEIGHTS).exists())]
    return [todo[g:g + cfg.group_size] for g in range(0, len(todo), cfg.group_size)]


def train_group(backbone: Backbone, rec: BankRecord, slots: list[int], users: list[User], task: Task,
                cfg: BankConfig, out: Path, key_prefix: str = "anchor", on_step=None) -> list[AnchorRecord]:
    """Train the anchors of ``slots`` in one pass and write their adapters (atomically);
    the anchors' records are updated in place and returned. The initial values depend on
    the group's first slot only, so a group trains the same alone or in a full build."""
    by_id = {u.user_id: u for u in users}
    group = [rec.anchors[s] for s in slots]

    def examples(anchor: AnchorRecord) -> list:
        if rec.kind == "task":
            pool = users
        elif anchor.members:  # a pooled anchor (anchor_training "cluster")
            pool = [by_id[m] for m in anchor.members]
        else:
            pool = [by_id[anchor.user_id]]
        return [e for u in pool for e in loo_examples(
            task, training_history(u, cfg), backbone.tokenizer, cfg.retrieve_k, cfg.max_length,
            negative_pool(task, [o for o in users if o.user_id != u.user_id], cfg.seed))]

    engine = backbone.engine
    tcfg = cfg.train_config(**backbone.train_resources(), lr_field="BankConfig.lr")
    t0 = time.perf_counter()
    engine.owner = None  # the bank table now holds this group, not an opened bank
    residual = rec.kind == "bank" and cfg.bank_base == "task"
    engine.set_bank(len(group) + residual, cfg.rank, cfg.alpha, cfg.target_modules)
    engine.init_bank(seed=cfg.seed + group[0].slot)
    if residual:  # the task LoRA in the slot after the group's: in every row, never stepped (not a job's slot)
        load_base(engine, len(group), out, rec)

    def row(j: int) -> Row:
        return Row([j, len(group)], [1.0, 1.0]) if residual else Row([j], [1.0])

    # per-user LoRAs stopped on their user's held-out last item (BankConfig.stop, set by
    # `mta eval` as MTA's stack is stopped); anchors and task LoRAs train to their last step
    stopping = rec.kind == "private" and cfg.stop != "none"
    split = [held_out(examples(a), stopping) for a in group]
    jobs = [Job(j, fit, row(j), key=f"{key_prefix}:{a.user_id}") for j, (a, (fit, _)) in enumerate(zip(group, split))]
    stats = train_jobs(engine, "bank", jobs, tcfg, pad_id=backbone.tokenizer.pad_token_id, on_step=on_step,
                       held_out=[h for _, h in split] if stopping else None, refit=stopping and cfg.stop == "refit")
    for j, a in enumerate(group):
        save_anchor(engine, j, adapter_dir(out, a.slot), base_model=rec.model,
                    extra={"user_id": a.user_id, "task": task.name})
        losses = stats["losses"][jobs[j].key]
        # (a refit kept at step 0 trained no step of its own: the losses its held-out run saw)
        seen = losses or stats.get("first_run_losses", {}).get(jobs[j].key) or [None]
        # the examples it trained on (a refit trained on the held-out ones too)
        a.examples = len(jobs[j].examples) + (len(split[j][1]) if stats.get("refit") else 0)
        a.done, a.final_loss, a.first_loss = True, seen[-1], seen[0]
        a.skipped_steps = stats["skipped_steps"].get(jobs[j].key, 0)
        a.steps = len(losses)
        a.stopped_at = stats.get("stopped_at", {}).get(jobs[j].key)
        a.held_out_losses = stats.get("held_out_losses", {}).get(jobs[j].key)
        a.sha256 = sha256_file(adapter_dir(out, a.slot) / WEIGHTS)
        a.train_seconds = (time.perf_counter() - t0) / len(group)
    return group
