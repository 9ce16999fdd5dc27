"""The methods `mta eval` compares, each run on one fold's targets.

All share one backbone (base model, embedder), one prompt format and one protocol
(``protocol.py``). What each method is, exactly:

- ``base``: the instruction alone; ``rag-K``: BM25 top-K history items in the prompt
  (``rag`` = rag-1 and rag-4);
- ``task-lora``: ONE LoRA with the meta-LoRA recipe (BankConfig) on the pooled histories
  of the fold's anchor candidates, never a target's: the task learnt, no user;
- ``per-user-lora``: one LoRA per user from scratch on their own history, with the
  meta-LoRA recipe (BankConfig: rank, lr, epochs, examples), RAG-k prompt;
- ``oppu``: OPPU's recipe: the task LoRA, frozen, and on top of it a per-user LoRA with
  the meta-LoRA recipe (rank, alpha, lr, epochs, all linear layers of all blocks) on the
  user's history;
- ``mta-fusion``: the fold's bank, the user's fused top-k anchors, no stack;
- ``mta-stack``: a stacked adapter (AdaptConfig's rank, lr, layers) over the bare base
  model, no anchors;
- ``mta``: fusion + stack with the AdaptConfig given (our defaults unless changed);
- ``mta-reference``: the SAME bank (our bank recipe: BankConfig), with the authors'
  fusion and stacking (the ``reference`` preset: factor merge of the top-2, rank-4 stack
  on all linear layers of all blocks, lr 5e-5, one epoch) and our corrected weights (the
  most similar anchor weighs most).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mta.backbone import Backbone
from mta.bank import build_private
from mta.config import AdaptConfig, BankConfig, BaselineConfig, GenerateConfig
from mta.data.persons import query_item
from mta.data.schema import User
from mta.decoding.answers import answers, check_answer_rules
from mta.defaults import pinned
from mta.engine.budget import alloc_retries
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank, Request
from mta.paths import dir_bytes
from mta.retrieval import retrieve
from mta.store import UserStore
from mta.weight_search import SearchCache

log = logging.getLogger(__name__)
ALL_METHODS = ("base", "rag", "task-lora", "per-user-lora", "oppu", "mta-fusion", "mta-stack", "mta",
               "mta-reference")
BANK_METHODS = {"mta-fusion", "mta", "mta-reference"}
TASK_METHODS = {"task-lora", "oppu"}
# no model at all: a rating task's target answers its mean score, a classification task's
# its most frequent label, over its own training history (not part of "all": ask for it)
USER_PRIOR = "user-prior"
# no model either: the answer the fold's training users gave the same item most often
# (their mean score), else the user's own prior (not part of "all": ask for it)
ITEM_PRIOR = "item-prior"
PRIORS = (USER_PRIOR, ITEM_PRIOR)
PRIOR_KINDS = ("rating", "classification")  # the task kinds it is defined for
Progress = Callable[[str, int, int], None] | None


def expand_methods(spec) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (s.strip() for s in names if s.strip()):
        if name == "all":
            out += expand_methods(ALL_METHODS)
        elif name == "rag":
            out += ["rag-1", "rag-4"]
        elif name == "base" or re.fullmatch(r"rag-[1-9]\d*", name) or name in ALL_METHODS or name in PRIORS:
            out.append(name)
        else:
            raise MtaError(f"unknown method {name!r}; choose from: {', '.join(ALL_METHODS)}, {', '.join(PRIORS)}, "
                           "rag-K or all",
                           ("EvalConfig.methods",))
    if not out:
        raise MtaError("no method to evaluate", ("EvalConfig.methods",))
    return list(dict.fromkeys(out))


@dataclass
class FoldResult:
    """One method on one fold: parsed predictions and raw outputs per user, costs."""

    preds: dict[str, list] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    adapt_seconds: float = 0.0
    infer_seconds: float = 0.0
    bytes_per_user: dict[str, int] = field(default_factory=dict)
    trainable_params_per_user: int = 0
    # optimiser steps of each adapter the method trained, by part ("stack", "LoRA",
    # "user part"); the shared adapters it uses are added by the runner ("anchors", "task LoRA")
    steps: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class EvalSetup:
    backbone: Backbone
    task: object
    bank_cfg: BankConfig
    adapt_cfg: AdaptConfig
    gen_cfg: GenerateConfig
    progress: Progress = None
    max_new_tokens: int = 0  # resolved by ``resolve``: the config's, else the task's rule for the users
    prefix: str = ""  # names the fold in progress lines when there are several
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    # searched fusion weights shared between runs and methods (``mta tune``'s trials; without
    # one, ``run_eval`` keeps one in its run directory for its methods)
    search_cache: SearchCache | None = None

    def resolve(self, users) -> EvalSetup:
        check_answer_rules(self.task, self.gen_cfg)
        self.max_new_tokens = self.gen_cfg.max_new_tokens or self.task.answer_tokens(self.backbone.tokenizer, users)
        return self


def _queries(users) -> list[tuple[User, object]]:
    return [(u, q) for u in users for q in u.queries]


def _collect(res: FoldResult, pairs, texts, task) -> None:
    for (u, _), t in zip(pairs, texts):
        res.preds.setdefault(u.user_id, []).append(task.parse(t))
        res.outputs.setdefault(u.user_id, []).append(t)


def _bar(setup: EvalSetup, name: str, total: int):
    """The answering's progress (prompts answered, by increments), reported at 0 now: the
    stage's clock starts when answering does, and a first batch that takes minutes shows
    as such (run U's log said "64/87, 0 s" of a fold whose answering took 326 s: its
    ``infer_seconds``)."""
    if not setup.progress:
        return None
    setup.progress(setup.prefix + name, 0, total)
    return lambda n: setup.progress(setup.prefix + name, n, total)


def named_progress(progress: Progress, name: str) -> Progress:
    """``progress`` for a run named ``name`` inside another (a tune's trial, an
    evaluation's variant): its stages under that name; the CLI's bars (``part``) also drop
    the run before's."""
    part = getattr(progress, "part", None)
    if part:
        return part(name)
    return (lambda stage, done, total: progress(f"{name}: {stage}", done, total)) if progress else None


def _stages(setup: EvalSetup, name: str):
    """A progress callback for a library call's stages (anchors, users, steps) of ``name``."""
    return (lambda s, d, t: setup.progress(f"{setup.prefix}{name} {s}", d, t)) if setup.progress else None


def run_prompt(setup: EvalSetup, name: str, targets) -> FoldResult:
    """base / rag-K: the base model with 0 or K history items in the prompt."""
    k = 0 if name == "base" else int(name.split("-")[1])
    pairs = _queries(targets)
    prompts = [setup.task.prompt(q.input, retrieve(setup.task, q.input, u.history, k)) for u, q in pairs]
    g = setup.gen_cfg
    t0 = time.perf_counter()
    texts = answers(setup.backbone, setup.task, prompts, None, g, setup.max_new_tokens,
                    on_batch=_bar(setup, name, len(pairs)))
    res = FoldResult(infer_seconds=time.perf_counter() - t0, bytes_per_user={u.user_id: 0 for u in targets})
    _collect(res, pairs, texts, setup.task)
    return res


def _prior(task, labels: list[str]) -> str:
    """The mean score rounded half up (rating), or the most frequent label, the first seen
    of a tie (classification); "" without a label."""
    labels = [lb for lb in labels if lb not in (None, "None")]
    if not labels:
        return ""
    if task.kind == "rating":
        return str(int(sum(float(x) for x in labels) / len(labels) + 0.5))
    counts = Counter(labels)
    return max(dict.fromkeys(labels), key=lambda lb: counts[lb])


def prior_answer(task, history) -> str:
    """What ``history`` alone answers (``user-prior``): the mean score rounded half up, or
    the most frequent label, the first seen of a tie; "" without a labelled item."""
    return _prior(task, [task.item_label(it) for it in history])


def item_answers(task, users) -> dict[str, list[str]]:
    """{item: the labels ``users`` gave it in their histories, in the users' order}."""
    out: dict[str, list[str]] = {}
    for u in users:
        for it in u.history:
            out.setdefault(query_item(task.item_example(it)[0]), []).append(task.item_label(it))
    return out


def run_prior(setup: EvalSetup, name: str, targets, training=()) -> FoldResult:
    """user-prior: the answer a user's own history alone suggests, without a model: the
    mean of its scores rounded to the nearest whole score (rating tasks), or its most
    frequent label, the earliest of a tie (classification). item-prior: the same over the
    labels the fold's TRAINING users (``training``: the anchor candidates, never a target)
    gave the query's item, else the user-prior. What a personalised model has to beat to
    have learnt more than the user's prior and the crowd's opinion of the item."""
    task = setup.task
    if task.kind not in PRIOR_KINDS:
        raise MtaError(f"{name} needs a rating or classification task; {task.name} is {task.kind}",
                       ("EvalConfig.methods",))
    res = FoldResult(bytes_per_user={u.user_id: 0 for u in targets})
    t0 = time.perf_counter()
    crowd = item_answers(task, training) if name == ITEM_PRIOR else {}
    for u in targets:
        own = prior_answer(task, u.history)
        answers = [_prior(task, crowd.get(query_item(q.input), [])) or own for q in u.queries]
        res.preds[u.user_id] = [task.parse(a) for a in answers]
        res.outputs[u.user_id] = answers
    res.infer_seconds = time.perf_counter() - t0
    return res


def _answer(setup: EvalSetup, bank: LoadedBank, name: str, targets, res: FoldResult,
            store: UserStore | None = None, fusion: AdaptConfig | None = None) -> None:
    pairs = _queries(targets)
    device = setup.backbone.device
    t0, retries = time.perf_counter(), alloc_retries(device)
    loads, load_s = bank.stacks.loads, bank.stacks.load_seconds
    answers = bank.answer([Request(u.user_id, q.input, u) for u, q in pairs],
                          setup.gen_cfg.model_copy(update={"max_new_tokens": setup.max_new_tokens}), store, fusion,
                          on_batch=_bar(setup, name, len(pairs)))
    res.infer_seconds = time.perf_counter() - t0
    # where the answering's time went (the stacks' loads from the store, or the forwards)
    log.info("%s%s: %d queries answered in %.1f s, %d stored stacks loaded in %.1f s of it", setup.prefix, name,
             len(pairs), res.infer_seconds, bank.stacks.loads - loads, bank.stacks.load_seconds - load_s)
    met = alloc_retries(device) - retries
    if met:  # (runs U and V: OPPU's answering took 60-330 s where its 0-step trial took 1-5 s)
        log.warning("%s%s: answering met the GPU memory cap %d times (each a flush of the allocator's cache and "
                    "a retry), in its %.0f s", setup.prefix, name, met, res.infer_seconds)
    _collect(res, pairs, [a.output for a in answers], setup.task)


def private_config(bank: BankConfig, adapt: AdaptConfig, baselines: BaselineConfig) -> BankConfig:
    """The per-user LoRA baseline's recipe: the bank's, with its own budget, stopped as
    MTA's stack is (``AdaptConfig.stack_stop``: every per-user part gets the same guard)."""
    return baselines.bank_for("user", bank).model_copy(update={"stop": adapt.stack_stop})


def run_private(setup: EvalSetup, targets, out: Path) -> FoldResult:
    """per-user-lora: a private bank of the targets (one LoRA each, one pass), each user
    answered through their own LoRA."""
    t0 = time.perf_counter()
    rec = build_private(setup.backbone, list(targets), setup.task,
                        private_config(setup.bank_cfg, setup.adapt_cfg, setup.baselines), out,
                        _stages(setup, "per-user-lora"))
    # the steps whose adapter was kept: where early stopping stopped, else all
    res = FoldResult(adapt_seconds=time.perf_counter() - t0, steps={"LoRA": [
        a.steps if a.stopped_at is None else a.stopped_at for a in rec.anchors]})
    bank = LoadedBank(setup.backbone, out, setup.task)
    res.trainable_params_per_user = sum((ly.in_features + ly.out_features) * rec.config.rank
                                        for ly in setup.backbone.engine.bank_layers.values())
    for a in rec.anchors:
        res.bytes_per_user[a.user_id] = dir_bytes(out / "anchors" / f"{a.slot:03d}")
    _answer(setup, bank, "per-user-lora", targets, res)
    return res


def run_task(setup: EvalSetup, bank: LoadedBank, targets) -> FoldResult:
    """task-lora: every target through the one task LoRA (trained on other users; a shared
    cost like the bank's, so nothing per user)."""
    res = FoldResult(bytes_per_user={u.user_id: 0 for u in targets})
    _answer(setup, bank, "task-lora", targets, res)
    return res


def method_config(name: str, base: AdaptConfig, bank: BankConfig,
                  baselines: BaselineConfig = BaselineConfig()) -> AdaptConfig:
    """The AdaptConfig each adapter method uses; a baseline's and the reference's are
    pinned (``mta.defaults``): no registered recipe changes what they are."""
    if name == "oppu":  # a per-user LoRA with the bank's recipe (its own lr and steps) over the frozen task LoRA
        steps = bank.steps if baselines.oppu_steps is None else baselines.oppu_steps  # 0: the task LoRA alone
        return pinned(AdaptConfig.make(top_k=1, stack_rank=bank.rank, stack_alpha=bank.alpha, stack_layers=0,
                                       stack_targets=bank.target_modules, stack_lr=baselines.oppu_lr or bank.lr,
                                       stack_epochs=bank.epochs, stack_steps=steps,
                                       batch_size=bank.batch_size, warmup_ratio=bank.warmup_ratio,
                                       retrieve_k=bank.retrieve_k, max_length=bank.max_length, seed=base.seed,
                                       stack_stop=base.stack_stop))  # stopped as MTA's stack is
    if name == "mta-reference":
        return pinned(AdaptConfig.make(preset="reference", seed=base.seed, max_length=base.max_length,
                                       retrieve_k=base.retrieve_k, batch_size=base.batch_size))
    if name == "mta-fusion":
        return base.model_copy(update={"stack_epochs": 0})
    if name == "mta-stack":
        return base.model_copy(update={"top_k": 0})
    return base


def run_adapted(setup: EvalSetup, name: str, bank: LoadedBank, targets, out: Path) -> FoldResult:
    """mta, mta-fusion, mta-reference (on the fold's bank), mta-stack (on an empty bank)
    and oppu (on the task bank): adapt the targets into a store, then answer them in
    mixed-user batches."""
    cfg = method_config(name, setup.adapt_cfg, setup.bank_cfg, setup.baselines)
    store = UserStore(out, create=True)
    t0 = time.perf_counter()
    stats = bank.adapt(list(targets), cfg, store, _stages(setup, name), search_cache=setup.search_cache)
    # a search taken from the cache (another method's, the same search) counts its seconds here too
    res = FoldResult(adapt_seconds=time.perf_counter() - t0 + stats.get("search_seconds_reused", 0.0),
                     bytes_per_user=dict(stats["bytes_per_user"]),
                     trainable_params_per_user=stats["trainable_params_per_user"])
    stacks = [store.meta(u.user_id).stack for u in targets]
    if any(st is not None for st in stacks):
        # the steps whose adapter was kept: where early stopping stopped, else all
        res.steps["user part" if name == "oppu" else "stack"] = [
            st.kept_steps for st in stacks if st is not None]
    _answer(setup, bank, name, targets, res, store, cfg)
    return res
