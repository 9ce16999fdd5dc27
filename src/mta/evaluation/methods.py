"""The methods `mta eval` compares, each run on one fold's targets.

All share one base model, one prompt format and one protocol (``protocol.py``):

- ``base``: the instruction alone; ``rag-K``: BM25 top-K history items in the prompt
  (``rag`` = rag-1 and rag-4);
- ``per-user-lora``: one rank-8 LoRA per user from scratch on their history (the
  meta-LoRA recipe applied to every user: OPPU-style), RAG-1 prompt;
- ``mta-fusion``: fused anchors only; ``mta-stack``: a stacked low-rank adapter only
  (no fusion); ``mta``: both, our defaults; ``mta-reference``: the authors' settings.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mta.bank import training_history
from mta.config import AdaptConfig, BankConfig, adapt_config
from mta.data.schema import User
from mta.engine import AdapterEngine, EngineSpec, Job, Row, TrainConfig, train_jobs
from mta.engine.peft_io import save_anchor, save_user
from mta.errors import MtaError
from mta.examples import loo_examples
from mta.inference import generate_routed, generate_texts
from mta.personalize import Personalizer, Request
from mta.retrieval import retrieve
from mta.stacking import adapt_users
from mta.store import UserStore, user_key

log = logging.getLogger(__name__)
ALL_METHODS = ("base", "rag", "per-user-lora", "mta-fusion", "mta-stack", "mta", "mta-reference")
BANK_METHODS = {"mta-fusion", "mta", "mta-reference"}
Progress = Callable[[str, int, int], None] | None


def expand_methods(spec: str) -> list[str]:
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name == "rag":
            out += ["rag-1", "rag-4"]
        elif name == "base" or re.fullmatch(r"rag-[1-9]\d*", name) or name in ALL_METHODS:
            out.append(name)
        else:
            raise MtaError(f"unknown method {name!r}; choose from: {', '.join(ALL_METHODS)} or rag-K")
    if not out:
        raise MtaError("--methods is empty")
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


@dataclass
class EvalSetup:
    model: object
    tokenizer: object
    embedder: object
    embedder_id: str
    task: object
    bank_cfg: BankConfig
    adapt_cfg: AdaptConfig
    retrieve_k: int = 1
    max_new_tokens: int = 12
    batch_size: int = 8
    progress: Progress = None


def _queries(users) -> list[tuple[User, object]]:
    return [(u, q) for u in users for q in u.queries]


def _collect(res: FoldResult, pairs, texts, task) -> None:
    for (u, _), t in zip(pairs, texts):
        res.preds.setdefault(u.user_id, []).append(task.parse(t))
        res.outputs.setdefault(u.user_id, []).append(t)


def _prompts(task, pairs, k: int) -> list[str]:
    return [task.prompt(q.input, retrieve(task, q.input, u.history, k)) for u, q in pairs]


def _bar(setup: EvalSetup, name: str, total: int):
    return (lambda n: setup.progress(name, n, total)) if setup.progress else None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _lora_params(layers: dict, rank: int) -> int:
    return sum((ly.in_features + ly.out_features) * rank for ly in layers.values())


def run_prompt(setup: EvalSetup, name: str, targets) -> FoldResult:
    k = 0 if name == "base" else int(name.split("-")[1])
    pairs = _queries(targets)
    t0 = time.perf_counter()
    texts = generate_texts(setup.model, setup.tokenizer, _prompts(setup.task, pairs, k), setup.max_new_tokens,
                           setup.batch_size, on_batch=_bar(setup, name, len(pairs)))
    res = FoldResult(infer_seconds=time.perf_counter() - t0, bytes_per_user={u.user_id: 0 for u in targets})
    _collect(res, pairs, texts, setup.task)
    return res


def run_private(setup: EvalSetup, name: str, targets, out: Path) -> FoldResult:
    """per-user-lora (a rank-8 bank slot per user) or mta-stack (a stack slot per user,
    no anchors): private adapters trained in one pass, then one mixed-user generation."""
    task, tok = setup.task, setup.tokenizer
    private = name == "per-user-lora"
    bc, ac = setup.bank_cfg, setup.adapt_cfg
    engine = AdapterEngine(setup.model, EngineSpec(n_anchors=len(targets) if private else 0, rank=bc.rank,
                                                   alpha=bc.alpha, target_modules=tuple(bc.target_modules)))
    res = FoldResult()
    try:
        if private:
            engine.init_bank(seed=bc.seed)
            rows = [Row([j], [1.0]) for j in range(len(targets))]
            cfg = TrainConfig(lr=bc.lr, epochs=bc.epochs, batch_size=bc.batch_size, warmup_ratio=bc.warmup_ratio,
                              seed=bc.seed, max_rows=bc.max_rows)
        else:
            engine.add_users(len(targets), ac.stack_rank, ac.alpha_s, seed=ac.seed, modules=ac.stack_targets,
                             last_layers=ac.stack_layers)
            rows = [Row(user=j) for j in range(len(targets))]
            cfg = TrainConfig(lr=ac.stack_lr, epochs=max(1, ac.stack_epochs), batch_size=ac.batch_size,
                              warmup_ratio=ac.warmup_ratio, seed=ac.seed, max_rows=ac.max_rows)
        t0 = time.perf_counter()
        jobs = [Job(j, loo_examples(task, training_history(u, bc) if private else u, tok, setup.retrieve_k,
                                    bc.max_length if private else ac.max_length), rows[j], key=f"user:{u.user_id}")
                for j, u in enumerate(targets)]
        train_jobs(engine, "bank" if private else "stack", jobs, cfg, pad_id=tok.pad_token_id,
                   on_step=(lambda s, t: setup.progress(f"{name} steps", s, t)) if setup.progress else None)
        res.adapt_seconds = time.perf_counter() - t0
        res.trainable_params_per_user = (_lora_params(engine.layers, bc.rank) if private
                                         else _lora_params(engine.stack_layers, ac.stack_rank))
        for j, u in enumerate(targets):
            d = out / user_key(u.user_id)
            (save_anchor if private else save_user)(engine, j, d)
            res.bytes_per_user[u.user_id] = _dir_bytes(d)
        pairs = _queries(targets)
        slot = {u.user_id: j for j, u in enumerate(targets)}
        t0 = time.perf_counter()
        texts = generate_routed(engine, tok, _prompts(task, pairs, setup.retrieve_k),
                                [rows[slot[u.user_id]] for u, _ in pairs], max_new_tokens=setup.max_new_tokens,
                                batch_size=setup.batch_size, on_batch=_bar(setup, name, len(pairs)))
        res.infer_seconds = time.perf_counter() - t0
        _collect(res, pairs, texts, task)
    finally:
        engine.remove()
    return res


def mta_config(name: str, base: AdaptConfig) -> AdaptConfig:
    if name == "mta-reference":
        return adapt_config("reference", seed=base.seed, max_length=base.max_length, retrieve_k=base.retrieve_k)
    if name == "mta-fusion":
        return base.model_copy(update={"stack_epochs": 0})
    return base


def run_mta(setup: EvalSetup, name: str, targets, bank: Path, out: Path) -> FoldResult:
    cfg = mta_config(name, setup.adapt_cfg)
    store = UserStore(out)
    t0 = time.perf_counter()
    stats = adapt_users(setup.model, setup.tokenizer, setup.embedder, setup.embedder_id, bank, list(targets),
                        setup.task, cfg, store,
                        (lambda s, d, t: setup.progress(f"{name} {s}", d, t)) if setup.progress else None)
    res = FoldResult(adapt_seconds=time.perf_counter() - t0, bytes_per_user=dict(stats["bytes_per_user"]),
                     trainable_params_per_user=stats["trainable_params_per_user"])
    pairs = _queries(targets)
    pz = Personalizer(setup.model, setup.tokenizer, setup.embedder, setup.embedder_id, bank, setup.task, out, cfg)
    try:
        t0 = time.perf_counter()
        answers = pz.answer([Request(u.user_id, q.input, u) for u, q in pairs], cfg.retrieve_k,
                            setup.max_new_tokens, setup.batch_size, on_batch=_bar(setup, name, len(pairs)))
        res.infer_seconds = time.perf_counter() - t0
    finally:
        pz.close()
    _collect(res, pairs, [a.output for a in answers], setup.task)
    return res
