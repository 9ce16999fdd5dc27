"""Stage 3, stacking: each user's ultra-low-rank LoRA trained on top of their fused
anchors, which stay frozen, on the user's own few examples (leave-one-out, mta.examples).

Many users train in one batch: a pass takes ``AdaptConfig.users_per_pass`` users, gives
each an engine user slot (``AdapterEngine.add_users``, initialised from the pass's seed),
routes each user's examples through their own row (fused anchors + their slot) and steps
all their stacks together (``mta.engine.train.train_jobs``). ``LoadedBank.adapt`` calls
this after stage 2 (the mixtures and, where asked, the searched weights) and stores each
pass's users before the next pass reuses the slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from mta.config import AdaptConfig
from mta.data.schema import User
from mta.engine.train import Job, train_jobs
from mta.examples import held_out
from mta.mixing import Mixture, Plan
from mta.records import StackRecord

if TYPE_CHECKING:  # the bank imports this module
    from mta.loaded_bank import LoadedBank

Progress = Callable[[str, int, int], None]


def stack_params_per_user(engine, rank: int, modules=None, last_layers: int | None = None) -> int:
    """Trainable parameters of one user's stack: sum over its layers of (in + out) x rank
    (computed from the layer shapes, so it is right even when no user was trained)."""
    return sum((engine.layers[n].in_features + engine.layers[n].out_features) * rank
               for n in engine.stack_selection(modules, last_layers))


def stack_passes(bank: LoadedBank, users: Sequence[User], mixes: Sequence[Mixture], todo: Sequence[int],
                 cfg: AdaptConfig, examples_of: Callable[[int], list], forget: Callable[[int], None],
                 first_pass: int = 0, progress: Progress | None = None
                 ) -> Iterator[tuple[list[int], dict | None, float]]:
    """Train the stacks of ``users[i] for i in todo``, a pass of ``cfg.users_per_pass`` at a
    time. Yields ``(the pass's user indices, its training stats or None without a stack,
    seconds)`` after each pass, while the pass's stacks are still in engine slots 0, 1, ...
    in that order (to be saved before the next pass). ``first_pass`` is the index in a
    whole run of the first user here, so that a shard's stacks start from the values the
    same users get in one run."""
    engine, tok = bank.backbone.engine, bank.backbone.tokenizer
    tcfg = cfg.train_config(**bank.backbone.train_resources(), lr_field="AdaptConfig.stack_lr") if cfg.stacks else None
    for g in range(0, len(todo), cfg.users_per_pass):
        group = list(todo[g:g + cfg.users_per_pass])
        stats = None
        t0 = time.perf_counter()
        if cfg.stacks:
            engine.add_users(len(group), cfg.stack_rank, cfg.alpha_s, seed=cfg.seed + first_pass + g,
                             modules=cfg.stack_targets, last_layers=cfg.stack_layers)
            bank.stacks.invalidate()
            rows = bank.rows([Plan(mixes[i].anchors, mixes[i].weights, cfg.merge, cfg.svd_rank, stack=j)
                              for j, i in enumerate(group)])
            split = [held_out_split(examples_of(i), cfg) for i in group]
            jobs = [Job(j, fit, rows[j], key=f"user:{users[i].user_id}")
                    for j, (i, (fit, _)) in enumerate(zip(group, split))]
            for i in group:  # a pass's examples are not needed after it
                forget(i)
            stats = train_jobs(engine, "stack", jobs, tcfg, pad_id=tok.pad_token_id,
                               on_step=(lambda s, t: progress("steps", s, t)) if progress else None,
                               held_out=[h for _, h in split] if cfg.stack_stop != "none" else None,
                               refit=cfg.stack_stop == "refit")
        yield group, stats, time.perf_counter() - t0


def holds_out(cfg: AdaptConfig) -> bool:
    """Whether ``cfg`` holds each user's last item out of the search and the stack's training:
    ``stack_stop`` "held-out" or "refit" with a stack to train."""
    return cfg.stack_stop != "none" and cfg.stacks


def held_out_split(examples: list, cfg: AdaptConfig) -> tuple[list, list]:
    """(the examples the stack trains on, those it is stopped by): the user's last item held
    out when ``holds_out(cfg)`` (``examples.held_out``; a refit trains on it too once its
    steps are chosen)."""
    return held_out(examples, holds_out(cfg))


def stack_record(user: User, cfg: AdaptConfig, stats: dict | None) -> StackRecord | None:
    """What a user's record says of their stack (None without one)."""
    if stats is None:
        return None
    key = f"user:{user.user_id}"
    return StackRecord(rank=cfg.stack_rank, alpha=cfg.alpha_s, epochs=cfg.stack_epochs,
                       targets=list(cfg.stack_targets) if cfg.stack_targets else None, layers=cfg.stack_layers,
                       lr=cfg.stack_lr, examples=len(user.history), losses=stats["losses"][key],
                       skipped_steps=stats["skipped_steps"].get(key, 0),
                       stopped_at=stats.get("stopped_at", {}).get(key),
                       held_out_losses=stats.get("held_out_losses", {}).get(key),
                       refit=bool(stats.get("refit")) and key in stats["stopped_at"])
