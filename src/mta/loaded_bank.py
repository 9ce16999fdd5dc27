"""A bank opened on a backbone: the one object through which users are adapted,
answered and exported.

``LoadedBank`` checks the bank once (schema, completeness, base-model fingerprint,
embedder, task) and loads its anchors into the backbone's engine. It is the ONLY code
that turns a user's plan (anchor mixture and merge mode, stacked adapter) into routing
rows (``rows``); it adapts users (``adapt``: stage 2 here, stage 3 in mta.stacking), keeps users'
stacks resident on the device with least-recently-used eviction (``mta.resident``),
answers mixed-user batches (``answer``) and exports a user as one PEFT LoRA
(``export``).

Stage 2 of the method lives here: the mixture of a user is recomputed from their history
(cosine similarity to the anchors, top-k, weights; searched weights by mta.weight_search).
Stage 3, the stack trained over the frozen fused anchors, is mta.stacking.

A path of None opens an *empty* bank (no anchors): stacks over the bare base model.
A *private* bank (``bank.build_private``) answers each user through their own anchor.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mta import defaults
from mta.anchors import embed_users
from mta.backbone import Backbone
from mta.bank import adapter_dir, load_base, read_index
from mta.config import AdaptConfig, GenerateConfig
from mta.data.schema import User
from mta.decoding.answers import answers
from mta.engine.engine import Row
from mta.engine.fingerprint import check_fingerprint
from mta.engine.peft_io import WEIGHTS, export_user, load_anchor, save_user
from mta.errors import MtaError
from mta.examples import loo_examples
from mta.mixing import Mixture, Plan, mixtures_for
from mta.paths import sha256_file, shared_modes
from mta.records import BankRecord, UserRecord
from mta.resident import ResidentStacks
from mta.retrieval import retrieve
from mta.stacking import held_out_split, holds_out, stack_params_per_user, stack_passes, stack_record
from mta.store import UserStore, history_hash
from mta.tasks import get_task
from mta.tasks.base import Task
from mta.weight_search import SearchCache, search_weights

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
LOADS = {"count": 0}  # times a bank's anchors were read into an engine (tests check one per use)


@dataclass(frozen=True)
class Request:
    user_id: str
    input: str
    user: User | None = None  # history for retrieval and on-the-fly fusion


@dataclass(frozen=True)
class Answer:
    user_id: str
    input: str
    output: str
    parsed: object
    route: str  # "mta" (fusion + stack), "stack" (stack only), "fusion", "base", "private" (own LoRA),
    # "task" (the task LoRA alone)
    notice: str | None = None


class LoadedBank:
    """A bank on a backbone: adapt, answer and export users (see the module doc)."""

    def __init__(self, backbone: Backbone, path: Path | None, task: Task | None = None,
                 resident: int = 256):
        self.backbone, self.path = backbone, (Path(path) if path is not None else None)
        if self.path is None:
            if task is None:
                raise ValueError("an empty bank needs its task")
            self.record: BankRecord | None = None
            self.task, self.bank_id, self.kind = task, "none", "none"
        else:
            rec = read_index(self.path)
            if not rec.complete:
                raise MtaError(f"bank {self.path} is incomplete; rerun the same bank build to resume it")
            check_fingerprint(rec.fingerprint, backbone.fingerprint, f"bank {self.path}")
            if rec.embedder != backbone.embedder_id:
                raise MtaError(f"bank {self.path} was built with embedder {rec.embedder!r}, not "
                               f"{backbone.embedder_id!r}", ("BackboneConfig.embedder",))
            if task is not None and rec.task != task.name:
                raise MtaError(f"bank {self.path} was built for task {rec.task}, not {task.name}")
            self.record, self.task, self.bank_id, self.kind = rec, get_task(rec.task), rec.bank_id, rec.kind
        self.stacks = ResidentStacks(self, resident)
        self._activate()

    # -- the engine's bank table -----------------------------------------------------------------
    @property
    def n_anchors(self) -> int:
        return len(self.record.anchors) if self.record else 0

    @property
    def base_slot(self) -> int | None:
        """A residual bank's task LoRA: the table slot after the anchors, in every adapted
        row with weight 1 (``bank_base`` "task"); None for any other bank."""
        if self.record is None or self.record.kind != "bank" or self.record.base_sha256 is None:
            return None
        return self.n_anchors

    def with_base(self, anchors: Sequence[int], weights: Sequence[float]) -> tuple[tuple, tuple]:
        """The anchors and weights a row or an export uses: a residual bank adds its task LoRA."""
        if self.base_slot is None:
            return tuple(anchors), tuple(weights)
        return (*anchors, self.base_slot), (*weights, 1.0)

    def _check_merge(self, merge: str) -> None:
        if self.base_slot is not None and merge != "delta":
            raise MtaError(f"bank {self.path} is residual (a task LoRA under its anchors): it takes the exact delta "
                           f"merge only, not {merge!r}", ("AdaptConfig.merge",))

    def _activate(self) -> None:
        """Put this bank's anchors into the engine unless they are there already."""
        engine = self.backbone.engine
        if getattr(engine, "owner", None) is self:
            return
        cfg = self.record.config if self.record else None
        if cfg is None:
            engine.set_bank(0, 1, 1.0)
        else:
            engine.set_bank(self.n_anchors + (self.base_slot is not None), cfg.rank, cfg.alpha, cfg.target_modules)
            for a in self.record.anchors:
                d = adapter_dir(self.path, a.slot)
                if a.sha256 and sha256_file(d / WEIGHTS) != a.sha256:
                    raise MtaError(f"bank {self.path}: anchor {a.slot} ({d / WEIGHTS}) does not match its checksum "
                                   "(corrupt); rebuild the bank")
                load_anchor(engine, a.slot, d)
            if self.base_slot is not None:
                load_base(engine, self.base_slot, self.path, self.record)
            LOADS["count"] += 1
        engine.clear_fused()
        self.stacks.invalidate()
        engine.owner = self

    # -- stage 2: mixtures ------------------------------------------------------------------------
    def mixtures(self, users: Sequence[User], cfg: AdaptConfig) -> list[Mixture]:
        """Each user's top-k anchors and weights, from their history alone."""
        if self.kind == "task":  # everyone gets the one task anchor
            return [Mixture((0,), (1.0,), (1.0,)) for _ in users]
        if self.kind == "private":
            slot = {a.user_id: a.slot for a in self.record.anchors}
            missing = [u.user_id for u in users if u.user_id not in slot]
            if missing:
                raise MtaError(f"private bank {self.path} has no adapter for user(s) {missing[:3]}")
            return [Mixture((slot[u.user_id],), (1.0,), (1.0,)) for u in users]
        if cfg.top_k == 0 or not self.n_anchors:
            return [Mixture((), (), ()) for _ in users]
        emb = embed_users(list(users), self.task, self.backbone.embedder)
        anchor_emb = np.asarray([a.embedding for a in self.record.anchors], dtype=np.float32)
        return mixtures_for(emb, anchor_emb, cfg.top_k, cfg.weighting, cfg.temperature)

    # -- the only place plans become routing rows ---------------------------------------------------
    def rows(self, plans: Sequence[Plan]) -> list[Row]:
        """Routing rows for ``plans``: exact merges route through the bank; factor and svd
        merges through a fused table built here for this batch's mixtures."""
        fused: dict[tuple, int] = {}
        for p in plans:
            if p.anchors and p.merge != "delta":
                fused.setdefault(self._fused_key(p), len(fused))
        if fused:
            self.backbone.engine.install_fused(list(fused))
        rows = []
        for p in plans:
            if p.anchors and p.merge != "delta":
                self._check_merge(p.merge)
                rows.append(Row(fused=fused[self._fused_key(p)], user=p.stack))
            elif p.anchors or p.stack is not None:
                rows.append(Row(*self.with_base(p.anchors, p.weights), user=p.stack))
            else:
                rows.append(Row(active=False))
        return rows

    @staticmethod
    def _fused_key(p: Plan) -> tuple:
        return (p.anchors, p.weights, p.merge, p.svd_rank if p.merge == "svd" else None)

    # -- stage 3: stacks for many users ---------------------------------------------------------------
    def settings(self, cfg: AdaptConfig | None = None) -> AdaptConfig:
        """``cfg`` (default: nothing set) resolved on this bank as `mta adapt` resolves it
        (``mta.defaults``): what the caller set, else the bank's recorded recipe, else the
        model's registered recipe for the bank's task, else the field's default."""
        if cfg is not None and defaults.is_resolved(cfg):
            return cfg
        under = defaults.layers(self.backbone.model_id, self.task.name if self.task else None,
                                bank_recipe=self.record.recipe if self.record else None)
        return defaults.resolve(cfg if cfg is not None else AdaptConfig(), under)

    def adapt(self, users: Sequence[User], cfg: AdaptConfig | None, store: UserStore,
              progress: Progress | None = None, *, locked: bool = True, first_pass: int = 0,
              force: bool = False, search_cache: SearchCache | None = None) -> dict:
        """Fuse and stack ``users`` into ``store``; users unchanged since they were stored
        are skipped (unless ``force``). Returns counts, timings and per-user costs. Fields
        of ``cfg`` not set are resolved by ``settings``.

        ``locked=False``: the caller already is the store's one writer (a sharded run's
        driver, whose workers call this). ``first_pass``: the index in the whole run of
        this call's first user, so that a shard's stacks start from the values the same
        users get in one unsharded run (passes of ``cfg.users_per_pass``). ``search_cache``:
        searched fusion weights are read from it when the same search ran before, and kept
        in it otherwise (``weight_search.SearchCache``; a tune's trials share one)."""
        cfg = self.settings(cfg)
        self.check(users, cfg)
        if not locked:
            return self._adapt(users, cfg, store, progress, first_pass, force, search_cache)
        with store.writing():
            return self._adapt(users, cfg, store, progress, first_pass, force, search_cache)

    def check(self, users: Sequence[User], cfg: AdaptConfig) -> None:
        """Everything ``adapt`` would refuse, checked before anything is written."""
        for u in users:
            if not u.history:
                raise MtaError(f"user '{u.user_id}' has 0 history items; stacking needs at least 1")
        if not users:
            raise MtaError("no users to adapt")
        self._check_merge(cfg.merge)
        if self.kind == "bank" and cfg.top_k > self.n_anchors:
            raise MtaError(f"top_k {cfg.top_k} is more than the {self.n_anchors} anchors of bank {self.path}",
                           ("AdaptConfig.top_k",))
        if cfg.stacks:
            self.backbone.engine.stack_selection(cfg.stack_targets, cfg.stack_layers)  # unknown modules refused

    def _adapt(self, users: Sequence[User], cfg: AdaptConfig, store: UserStore, progress: Progress | None,
               first_pass: int = 0, force: bool = False, search_cache: SearchCache | None = None) -> dict:
        self._activate()
        engine, tok = self.backbone.engine, self.backbone.tokenizer
        t0 = time.perf_counter()
        mixes = self.mixtures(users, cfg)
        fuse_s = time.perf_counter() - t0
        settings = {"bank": self.bank_id, "adapt": cfg.identity()}
        hashes = [history_hash(u, self.task.name, settings) for u in users]
        todo = [i for i, u in enumerate(users) if force or not store.unchanged(u.user_id, hashes[i])]
        skipped = len(users) - len(todo)
        if skipped:
            log.info("%d user(s) unchanged since they were stored; skipping them", skipped)
        negatives = self.record.negatives if self.record else []
        examples: dict[int, list] = {}  # user index -> its leave-one-out examples (search and stack share them)
        reused_s = 0.0  # the seconds of a search taken from ``search_cache`` (counted in fuse_s)

        def examples_of(i: int) -> list:
            if i not in examples:
                examples[i] = loo_examples(self.task, users[i], tok, cfg.retrieve_k, cfg.max_length, negatives)
            return examples[i]

        if cfg.fusion_weights == "searched" and cfg.top_k > 0 and todo:
            t0 = time.perf_counter()
            if progress:
                progress("fusion search", 0, len(todo))
            max_rows = self.backbone.train_resources().get("max_rows") or 64
            key = hit = None
            if search_cache is not None:
                key = search_cache.key(self.bank_id, cfg.identity(), [
                    (users[i].user_id, history_hash(users[i], self.task.name, {})) for i in todo], first_pass, max_rows,
                    held_out=holds_out(cfg))
                hit = search_cache.get(key, len(todo))
            if hit is None:
                found, info = search_weights(  # never on a held-out item (stack_stop): it judges what follows
                    engine, [mixes[i] for i in todo], [held_out_split(examples_of(i), cfg)[0] for i in todo],
                    cfg.search_evals,
                    tok.pad_token_id, seed=cfg.seed + first_pass, base_slot=self.base_slot, max_rows=max_rows)
                if search_cache is not None:
                    search_cache.put(key, found, info["seconds"])
            else:
                found, reused_s = hit
                log.info("the fusion weights of %d user(s) from %s (searched alike before, in %.1f s: counted as "
                         "this run's)", len(todo), search_cache.root, reused_s)
                fuse_s += reused_s
            for i, m in zip(todo, found):
                mixes[i] = m
            fuse_s += time.perf_counter() - t0
            if progress:
                progress("fusion search", len(todo), len(todo))
        done, train_s = 0, 0.0
        if progress:
            progress("users", 0, len(todo))
        for group, stats, seconds in stack_passes(self, users, mixes, todo, cfg, examples_of,
                                                  lambda i: examples.pop(i, None), first_pass, progress):
            train_s += seconds
            for j, i in enumerate(group):
                store.put(self._record(users[i], mixes[i], cfg, hashes[i], stats), None if stats is None else (
                    lambda d, j=j, uid=users[i].user_id: save_user(engine, j, d, base_model=self._model_id,
                                                                    extra={"user_id": uid})))
                self.stacks.evict(users[i].user_id)
                done += 1
            if progress:
                progress("users", done, len(todo))
        per_user = stack_params_per_user(engine, cfg.stack_rank, cfg.stack_targets,
                                         cfg.stack_layers) if cfg.stacks else 0
        return {"adapted": done, "skipped": skipped, "fusion_seconds": fuse_s, "train_seconds": train_s,
                "search_seconds_reused": reused_s,
                "seconds_per_user": (fuse_s + train_s) / max(1, len(users)),
                "trainable_params_per_user": per_user,
                "bytes_per_user": {u.user_id: store.bytes_of(u.user_id) for u in users}}

    @property
    def _model_id(self) -> str:
        return self.record.model if self.record else self.backbone.model_id

    def _record(self, user: User, mix: Mixture, cfg: AdaptConfig, hist: str, stats: dict | None) -> UserRecord:
        anchor_users = [self.record.anchors[a].user_id for a in mix.anchors] if mix.anchors else []
        stack = stack_record(user, cfg, stats)
        return UserRecord(user_id=user.user_id, task=self.task.name, bank=self.bank_id, history_hash=hist,
                          adapt=cfg, merge=cfg.merge, svd_rank=cfg.svd_rank if cfg.merge == "svd" else None,
                          anchors=list(mix.anchors), anchor_users=anchor_users, weights=list(mix.weights),
                          similarities=list(mix.similarities), stack=stack, history_items=len(user.history))

    # -- serving ------------------------------------------------------------------------------------
    def stored(self, store: UserStore | None, user_ids: Sequence[str],
               known: dict[str, UserRecord] | None = None) -> dict[str, UserRecord]:
        """The store's records of ``user_ids`` (those present), checked against this bank.
        ``known``: records the caller read before (through this method) and holds: those
        users' records are taken from it, not the store, and the others' found are added
        to it (a server's running requests keep the records they started with, and each
        admission reads the store for the joining users alone)."""
        out: dict[str, UserRecord] = {}
        if store is None:
            return out
        for uid in dict.fromkeys(user_ids):
            if known is not None and uid in known:
                out[uid] = known[uid]
            elif store.has(uid):
                rec = store.meta(uid)
                if rec.bank != self.bank_id:
                    raise MtaError(f"user '{uid}' in {store.root} was adapted against another bank "
                                   f"({rec.bank}, this one is {self.bank_id}); adapt the user again with this bank")
                if any(a >= self.n_anchors for a in rec.anchors):
                    raise MtaError(f"user {uid!r}: the record names anchor slot {max(rec.anchors)} of a bank with "
                                   f"{self.n_anchors} anchors (corrupt); adapt the user again")
                out[uid] = rec
                if known is not None:
                    known[uid] = rec
        return out

    def plans(self, requests: Sequence[Request], store: UserStore | None, fusion: AdaptConfig | None = None,
              known: dict[str, UserRecord] | None = None) -> tuple[list[Plan], list[str], list[str | None]]:
        """Each request's plan, route and notice. A private bank: the user's own anchor. Else
        a stored user's fusion and stack; a user with history only: fusion computed now;
        anyone else: the base model. ``known``: as for ``stored``."""
        self._activate()
        if self.kind == "private":
            mixes = self.mixtures([r.user or User(user_id=r.user_id, history=[]) for r in requests], AdaptConfig())
            return [Plan(m.anchors, m.weights) for m in mixes], ["private"] * len(requests), [None] * len(requests)
        records = self.stored(store, [r.user_id for r in requests], known)
        slots = self.stacks.ensure({u: rec for u, rec in records.items() if rec.stack}, store) if records else {}
        fresh = list({r.user_id: r.user for r in requests if r.user_id not in records
                      and r.user is not None and r.user.history}.values())
        fusion = self.settings(fusion)
        fresh_mix = dict(zip([u.user_id for u in fresh], self.mixtures(fresh, fusion))) if fresh else {}
        plans, routes, notices = [], [], []
        for r in requests:
            if r.user_id in records:
                rec = records[r.user_id]
                stack = slots.get(r.user_id)
                plans.append(Plan(tuple(rec.anchors), tuple(rec.weights), rec.merge, rec.svd_rank, stack))
                routes.append(("mta" if stack is not None else "fusion") if rec.anchors else "stack")
                notices.append(None)
            elif self.kind == "task":
                plans.append(Plan((0,), (1.0,)))
                routes.append("task")
                notices.append(None)
            elif r.user_id in fresh_mix and fresh_mix[r.user_id].anchors:
                m = fresh_mix[r.user_id]
                plans.append(Plan(m.anchors, m.weights, fusion.merge, fusion.svd_rank))
                routes.append("fusion")
                notices.append(f"user '{r.user_id}' is not in the store: fusion only, computed from history")
            else:
                plans.append(Plan())
                routes.append("base")
                notices.append(f"user '{r.user_id}' has no stored adapter and no history: base model")
        return plans, routes, notices

    def answer(self, requests: Sequence[Request], gen: GenerateConfig, store: UserStore | None = None,
               fusion: AdaptConfig | None = None, on_batch: Callable[[int], None] | None = None) -> list[Answer]:
        """Answer a batch of requests of many users, each through their own adapters."""
        if not requests:
            return []
        plans, routes, notices = self.plans(requests, store, fusion)
        rows = self.rows(plans)
        prompts = [self.task.prompt(r.input, retrieve(self.task, r.input, r.user.history, gen.retrieve_k)
                                    if r.user else []) for r in requests]
        texts = answers(self.backbone, self.task, prompts, rows, gen, gen.max_new_tokens or self.task.max_new_tokens,
                        on_batch=on_batch)
        for n in {n for n in notices if n}:
            log.warning(n)
        return [Answer(r.user_id, r.input, t, self.task.parse(t), route, note)
                for r, t, route, note in zip(requests, texts, routes, notices)]

    def export(self, user_id: str, store: UserStore, out: Path, pad_to: int | str | None = None,
               base_model: str | None = None) -> Path:
        """Write one stored user (fused anchors + stack) as ONE ordinary PEFT LoRA.
        ``base_model``: the name the adapter names its base by (default: the bank's model)."""
        self._activate()
        rec = self.stored(store, [user_id]).get(user_id)
        if rec is None:
            store.meta(user_id)  # raises the "not in the store" error with the stored ids
        slot = self.stacks.ensure({user_id: rec}, store)[user_id] if rec.stack else None
        anchors, weights = self.with_base(rec.anchors, rec.weights)
        done = export_user(self.backbone.engine, list(anchors), list(weights), out, mode=rec.merge, user=slot,
                           svd_rank=rec.svd_rank, pad_to=pad_to, base_model=base_model or self._model_id)
        shared_modes(out)  # another program (vLLM, PEFT as another user) reads it
        return done

    def export_vllm(self, store: UserStore, out: Path, served_model: str,
                    progress: Progress | None = None) -> dict:
        """Every stored user as a PEFT adapter laid out for vLLM's runtime loading:
        ``OUT/<lora_name>/`` (adapter_config.json names ``served_model`` as its base, the rank
        zero-padded to one vLLM accepts), and ``OUT/manifest.json`` mapping user ids to lora
        names. The lora name is ``u-`` + the user's store key (any user id, never a path)."""
        from mta.paths import atomic_path, write_json_atomic
        from mta.store import user_key

        ids = store.user_ids()
        if not ids:
            raise MtaError(f"{store.root}: no users to export")
        entries = []
        with atomic_path(Path(out)) as tmp:
            tmp.mkdir(parents=True)
            for n, uid in enumerate(ids):
                name = f"u-{user_key(uid)}"
                self.export(uid, store, tmp / name, pad_to="serving", base_model=served_model)
                cfg = json.loads((tmp / name / "adapter_config.json").read_text())
                entries.append({"user_id": uid, "lora_name": name, "rank": cfg["r"],
                                "target_modules": sorted(cfg["target_modules"])})
                if progress:
                    progress("exported users", n + 1, len(ids))
            manifest = {"format": "vllm-lora", "base_model_name": served_model, "bank": self.bank_id,
                        "task": self.task.name, "max_lora_rank": max(e["rank"] for e in entries), "users": entries}
            write_json_atomic(tmp / "manifest.json", manifest)
        return manifest
