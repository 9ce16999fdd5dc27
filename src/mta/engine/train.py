"""Training many adapters in one pass: anchors of the bank, or users' stacked adapters.

Each *job* is one adapter (a bank slot or a stack-table slot) with its own examples and
its own routing row. At every step each still-running job contributes its next batch;
all rows go through the model together (in micro-batches of ``max_rows``). The loss is
the SUM over jobs of each job's mean token loss, so job j's gradient is exactly what
training it alone would give, and ``SlotAdamW`` steps each slot on its own schedule.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from mta.engine.budget import Budget, oom_error
from mta.engine.config import TrainConfig
from mta.engine.engine import AdapterEngine, Row, all_finite
from mta.engine.optim import SlotAdamW, lr_multiplier
from mta.errors import MtaError

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """Token ids and labels (IGNORE on prompt and padding positions)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass
class Job:
    """One adapter to train: its table slot, examples, routing row and shuffle key."""

    slot: int
    examples: Sequence[Example]
    row: Row
    key: str
    losses: list[float] = field(default_factory=list)
    skipped: int = 0  # optimiser steps skipped for a non-finite gradient
    steps: int | None = None  # optimiser steps of this job alone (default: ``plan_steps``)

    def steps_per_epoch(self, bs: int) -> int:
        return math.ceil(len(self.examples) / bs)


def job_order(key: str, seed: int, epoch: int, n: int) -> list[int]:
    """The shuffle of a job's examples: a function of (seed, key, epoch) only, so a job
    sees the same batches whether it trains alone or with others."""
    digest = hashlib.sha256(f"{seed}:{key}:{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(n, generator=gen).tolist()


def plan_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimiser steps of a job with ``n_examples``: ``cfg.steps`` when set (the data is
    cycled, a new shuffle each pass, as often as it takes), else ``epochs`` passes of
    ceil(n / batch_size) batches. With ``steps`` every adapter of a method gets the same
    number of updates however few items its user has."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(n_examples / cfg.batch_size)


def job_batches(job: Job, cfg: TrainConfig) -> list[list[Example]]:
    want = plan_steps(len(job.examples), cfg) if job.steps is None else job.steps
    out: list[list[Example]] = []
    epoch = 0
    while len(out) < want:
        order = job_order(job.key, cfg.seed, epoch, len(job.examples))
        for s in range(0, len(order), cfg.batch_size):
            out.append([job.examples[i] for i in order[s:s + cfg.batch_size]])
        epoch += 1
    return out[:want]


def pad_batch(examples: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-pad to the longest example: (input_ids, attention_mask, labels)."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def row_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token cross-entropy and per-row count of scored tokens."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view(shift_labels.shape)
    return ce.sum(dim=1), (shift_labels != IGNORE).sum(dim=1)


def _body(model):
    """The transformer stack under the LM head (``model.model`` for transformers' causal LMs)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), None)


def target_token_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of cross-entropy over the target tokens only, for RIGHT-padded rows under
    causal attention with no padding mask (see ``_step`` for why none is passed).

    The output projection runs only at positions that predict a target token: with a
    49k vocabulary and ~300-token prompts over ~5-token answers this skips most of the
    lm_head's work and all of its memory. Models that post-process logits (soft-capping)
    take the full path.
    """
    body = _body(model)
    head = model.get_output_embeddings()
    if body is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=ids, use_cache=False).logits
        return row_token_loss(logits, labels)[0]
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    shift_labels = labels[:, 1:]
    sel = shift_labels != IGNORE
    logits = head(hidden[:, :-1][sel]).float()
    ce = F.cross_entropy(logits, shift_labels[sel], reduction="none")
    rows = sel.nonzero()[:, 0]
    return torch.zeros(ids.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)


def check_steps(total: int, checks: int) -> list[int]:
    """The steps after which held-out losses are taken: 0 (before any update), every
    ceil(total / checks) steps, and the last."""
    every = max(1, math.ceil(total / max(1, checks)))
    return sorted({0, total, *range(every, total, every)})


class _HeldOut:
    """Early stopping on held-out examples: each job's loss on its own held-out examples
    (through its row, forward only) at the steps of ``check_steps``; a job whose loss is the
    lowest so far has its slot's tensors copied aside, and ``restore`` puts every job's best
    back (the copy at step 0 is the adapter as initialised: a stack whose B starts at zero
    then adds nothing). Ties keep the earlier step. Jobs without held-out examples keep
    their last step. The copy is one more table of the trained tensors' size (the
    optimiser's moments are two)."""

    def __init__(self, engine: AdapterEngine, jobs: Sequence[Job], held_out: Sequence[Sequence[Example]],
                 params: list[torch.nn.Parameter], pad_id: int, max_rows: int | None):
        if len(held_out) != len(jobs):
            raise ValueError("one held-out list per job")
        self.engine, self.jobs, self.held, self.params = engine, jobs, held_out, params
        self.pad_id, self.max_rows = pad_id, max_rows
        self.best: dict[int, tuple[float, int]] = {}  # job index -> (loss, step)
        self.kept = [p.detach().clone() for p in params]
        self.losses: dict[int, list[float]] = {i: [] for i, h in enumerate(held_out) if h}

    def check(self, step: int) -> None:
        pairs = [(self.jobs[i].row, e) for i in self.losses for e in self.held[i]]
        with torch.no_grad():
            flat = row_losses(self.engine, pairs, self.pad_id, self.max_rows)
            pos = 0
            for i in self.losses:
                n = len(self.held[i])
                loss = sum(flat[pos:pos + n]) / n
                pos += n
                self.losses[i].append(loss)
                if math.isfinite(loss) and (i not in self.best or loss < self.best[i][0]):
                    self.best[i] = (loss, step)
                    slot = self.jobs[i].slot
                    for k, p in zip(self.kept, self.params):
                        k[slot].copy_(p[slot])

    def restore(self) -> dict[int, int]:
        """Every held-out job's slot back to its best step; returns job index -> that step."""
        with torch.no_grad():
            for i in self.best:
                slot = self.jobs[i].slot
                for k, p in zip(self.kept, self.params):
                    p[slot].copy_(k[slot])
        return {i: step for i, (_, step) in self.best.items()}


def train_jobs(
    engine: AdapterEngine, target: Literal["bank", "stack"], jobs: Sequence[Job], cfg: TrainConfig,
    pad_id: int, on_step: Callable[[int, int], None] | None = None,
    held_out: Sequence[Sequence[Example]] | None = None, checks: int = 8, refit: bool = False,
) -> dict:
    """Train every job's adapter in one pass. Returns per-job losses and totals.

    ``held_out`` (one list per job, empty for none): early stopping, each job keeping its
    adapter at the checked step (``check_steps(total, checks)``) with the lowest loss on
    its held-out examples (``_HeldOut``); the stats then say at which step each stopped.
    ``refit`` (with ``held_out``): that step is only chosen there; each job is then trained
    again from its initial values, on its examples and its held-out ones together, for
    that many steps (none: it stays as initialised), as one chooses an epoch on a
    validation split and then trains on all the data; ``stopped_at`` is then the steps of
    that second run."""
    if refit:
        if held_out is None:
            raise ValueError("refit needs held-out examples to choose the steps by")
        return _refit(engine, target, jobs, cfg, pad_id, on_step, held_out, checks)
    if not jobs:
        raise ValueError("nothing to train: no jobs")
    slots = [j.slot for j in jobs]
    if len(set(slots)) != len(slots):
        raise ValueError("two jobs train the same slot")
    for j in jobs:
        if not j.examples:
            raise MtaError(f"job '{j.key}' has no training examples")
        if not any(x != IGNORE for e in j.examples for x in e.labels):
            raise MtaError(f"job '{j.key}' has no target tokens to learn from")
    params = engine.trainable(target)
    n_slots = engine.n_anchors if target == "bank" else engine.n_users
    opt = SlotAdamW(params, n_slots, weight_decay=cfg.weight_decay)
    model = engine.model
    was_training = model.training
    model.train()
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
    device = engine.device
    budget = Budget(cfg, device)
    plans = [job_batches(j, cfg) for j in jobs]
    total_steps = max(len(p) for p in plans)
    tokens = 0
    scope = contextlib.ExitStack()
    watch = None
    if held_out is not None:
        watch = _HeldOut(engine, jobs, held_out, params, pad_id, cfg.max_rows)
        at = set(check_steps(total_steps, checks))
    try:
        if cfg.compile is not False:
            scope.enter_context(compiled_layers(model, cfg.compile))
        if watch is not None:
            watch.check(0)
        for step in range(total_steps):
            active = [i for i, p in enumerate(plans) if step < len(p)]
            rows: list[tuple[int, Example]] = [(i, e) for i in active for e in plans[i][step]]
            # Longest first, so each micro-batch pads to a similar length. Gradients are
            # sums over rows: the order changes nothing but float rounding.
            rows.sort(key=lambda r: -len(r[1].input_ids))
            counts = {i: sum(sum(x != IGNORE for x in e.labels[1:]) for e in plans[i][step]) for i in active}
            while True:
                try:
                    job_loss, step_tokens = _step(engine, jobs, rows, counts, budget, cfg, pad_id, step, params)
                    break
                except torch.OutOfMemoryError:
                    for p in params:
                        p.grad = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    longest = len(rows[0][1].input_ids)
                    if not budget.halve(longest):
                        raise oom_error(device, budget.value or 0, len(rows)) from None
            tokens += step_tokens
            # A non-finite gradient with a finite loss (on the H200 with Qwen2.5-Coder, from
            # cuDNN's attention backward, pytorch/pytorch#196678, avoided in _step) would put NaN
            # into the adapter through Adam's moments: that adapter skips this update
            # instead, as AMP's GradScaler does, and the skip is logged and counted. One fused
            # check and sync per step; the per-adapter norms only when something is not finite.
            keep = list(range(len(active)))
            if not all_finite([p.grad for p in params if p.grad is not None]):
                sq = _slot_grad_sq(params, [jobs[i].slot for i in active])
                keep = [k for k, ok in enumerate(torch.isfinite(sq).tolist()) if ok]
                for k, i in enumerate(active):
                    if k not in keep:
                        jobs[i].skipped += 1
                        log.warning("step %d: the gradient of '%s' is not finite (%s); its update is skipped",
                                    step + 1, jobs[i].key, _where_not_finite(engine, params, jobs[i].slot))
            if cfg.max_grad_norm is not None and keep:
                slots_kept = [jobs[active[k]].slot for k in keep]
                _clip_per_slot(params, slots_kept, cfg.max_grad_norm, _slot_grad_sq(params, slots_kept))
            lrs = [cfg.lr * lr_multiplier(step, len(plans[active[k]]), cfg.warmup_ratio, cfg.schedule)
                   for k in keep]
            opt.step([jobs[active[k]].slot for k in keep], lrs)
            for p in params:
                p.grad = None
            for i in active:
                jobs[i].losses.append(job_loss[i])
            if watch is not None and step + 1 in at:
                watch.check(step + 1)
            if on_step:
                on_step(step + 1, total_steps)
    finally:
        scope.close()
        engine.trainable(None)
        if cfg.gradient_checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
    if not all_finite(params):
        raise MtaError(f"training diverged: adapter weights are NaN or inf; lower the learning rate "
                       f"(`{cfg.lr_field}` = {cfg.lr:g})", (cfg.lr_field,))
    never = [j.key for j, p in zip(jobs, plans) if j.skipped == len(p)]
    if never:
        raise MtaError(f"training diverged: every gradient of '{never[0]}' was NaN or inf, so it never "
                       f"trained; lower the learning rate (`{cfg.lr_field}` = {cfg.lr:g})", (cfg.lr_field,))
    out = {"steps": total_steps, "tokens": tokens, "optimizer_state_bytes": opt.state_bytes(),
           "losses": {j.key: j.losses for j in jobs}, "token_budget": budget.value,
           "skipped_steps": {j.key: j.skipped for j in jobs if j.skipped}}
    if watch is not None:
        out["stopped_at"] = {jobs[i].key: step for i, step in watch.restore().items()}
        out["held_out_losses"] = {jobs[i].key: v for i, v in watch.losses.items()}
    return out


def _refit(engine: AdapterEngine, target: Literal["bank", "stack"], jobs: Sequence[Job], cfg: TrainConfig,
           pad_id: int, on_step: Callable[[int, int], None] | None, held_out: Sequence[Sequence[Example]],
           checks: int) -> dict:
    """``train_jobs`` with ``refit``: the held-out run chooses each job's steps, the second
    run trains on everything for that many (its optimiser state new, as for any run)."""
    idx = torch.tensor([j.slot for j in jobs], device=engine.device)
    with torch.no_grad():
        init = [p.detach()[idx].clone() for p in engine.trainable(target)]
    engine.trainable(None)
    first = train_jobs(engine, target, jobs, cfg, pad_id, on_step, held_out, checks)
    chosen = first["stopped_at"]  # (a job without held-out examples trains its whole plan again)
    with torch.no_grad():
        for p, v in zip(engine.trainable(target), init):
            p[idx] = v
    engine.trainable(None)
    again = [Job(j.slot, [*j.examples, *h], j.row, j.key, steps=chosen.get(j.key))
             for j, h in zip(jobs, held_out) if chosen.get(j.key) != 0]
    second = train_jobs(engine, target, again, cfg, pad_id, on_step) if again else None
    losses = {j.key: (second["losses"][j.key] if second and j.key in second["losses"] else []) for j in jobs}
    return {"steps": second["steps"] if second else 0, "tokens": first["tokens"] + (second["tokens"] if second else 0),
            "optimizer_state_bytes": first["optimizer_state_bytes"], "losses": losses,
            "token_budget": first["token_budget"], "skipped_steps": second["skipped_steps"] if second else {},
            "stopped_at": chosen, "held_out_losses": first["held_out_losses"], "refit": True,
            "first_run_losses": first["losses"]}


def _step(engine, jobs, rows, counts, budget: Budget, cfg: TrainConfig, pad_id: int, step: int,
          params: list[torch.nn.Parameter]):
    """Forward and backward of one optimiser step's rows, micro-batch by micro-batch;
    gradients accumulate in the parameters. Returns (per-job loss, tokens)."""
    job_loss = dict.fromkeys(counts, 0.0)
    tokens = 0
    lengths = [len(e.input_ids) for _, e in rows]
    pos = 0
    while pos < len(rows):
        n = budget.next_size(lengths[pos:], cfg.max_rows)
        chunk = rows[pos:pos + n]
        pos += n
        ids, _, labels = pad_batch([e for _, e in chunk], pad_id, engine.device)
        probing = not budget.measured
        before = budget.start_probe() if probing else 0
        # backward stays inside the routing: checkpointed layers recompute with it
        with engine.route([jobs[i].row for i, _ in chunk]):
            # No padding mask: the rows are right-padded, so under causal attention no real
            # token ever sees a pad (pads come after it) and the loss skips the pads; without
            # a mask tensor SDPA runs causal flash attention. With one, the H200's default
            # SDPA backend (cuDNN, torch 2.11-2.13) returns NaN query gradients when the padded
            # length is 64 modulo 128 and a head's log-sum-exp is below ln(FLT_MAX) - which
            # Qwen2.5's massive-activation heads reach (pytorch/pytorch#196678;
            # scripts/sdpa-nan-check.py reproduces it).
            sums = target_token_loss(engine.model, ids, labels)
            denom = torch.tensor([max(1, counts[i]) for i, _ in chunk], dtype=sums.dtype, device=sums.device)
            per_row = sums / denom
            per_row.sum().backward()
        if probing:
            budget.end_probe(before, ids.numel())
        values = per_row.detach().tolist()  # the micro-batch's one sync: its losses
        for (i, _), v in zip(chunk, values):
            if not math.isfinite(v):
                raise MtaError(f"training diverged at step {step + 1}: the loss of '{jobs[i].key}' is {v} "
                               f"({_why_not_finite(params, jobs[i].slot, step)}); lower the learning rate "
                               f"(`{cfg.lr_field}` = {cfg.lr:g})", (cfg.lr_field,))
            job_loss[i] += v
        tokens += sum(len(e.input_ids) for _, e in chunk)  # the mask's sum, without a sync
    return job_loss, tokens


@torch.no_grad()
def row_losses(engine: AdapterEngine, rows: Sequence[tuple[Row, Example]], pad_id: int,
               max_rows: int | None = 16) -> list[float]:
    """Forward only: each (routing row, example) pair's mean cross-entropy over its target
    tokens, the training loss of ``_step`` without the backward (same routing, same
    right-padded batches without a padding mask, so the same numbers). Pairs are batched
    longest first, ``max_rows`` at a time."""
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1].input_ids))
    out = [0.0] * len(rows)
    was_training = engine.model.training
    engine.model.eval()
    try:
        step = max_rows or len(order)
        for s in range(0, len(order), step):
            chunk = order[s:s + step]
            ids, _, labels = pad_batch([rows[i][1] for i in chunk], pad_id, engine.device)
            with engine.route([rows[i][0] for i in chunk], reuse=False):  # one forward each
                sums = target_token_loss(engine.model, ids, labels)
            counts = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
            for i, v in zip(chunk, (sums / counts).tolist()):
                out[i] = v
    finally:
        engine.model.train(was_training)
    return out


@torch.no_grad()
def _where_not_finite(engine: AdapterEngine, params: list[torch.nn.Parameter], slot: int) -> str:
    """Which of a slot's gradient tables are not finite. The backward pass runs from the last
    layer to the first, so a NaN or inf that enters it at some layer reaches every table
    below: the last one in the model's order is where it entered."""
    names = engine.table_names()
    bad = []
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(g := p.grad[slot]).all()):
            bad.append(f"{names.get(id(p), '?')}, {'NaN' if bool(torch.isnan(g).any()) else 'inf'}")
    return f"{len(bad)} of {len(params)} tables; the last in the model, where the backward pass met it: {bad[-1]}"


def _why_not_finite(params: list[torch.nn.Parameter], slot: int, step: int) -> str:
    """Where a non-finite loss came from: the slot's adapter weights (the previous update
    blew up), or the forward pass, with the weights' largest magnitude (huge weights from
    too large a step, or small ones: an overflow elsewhere, e.g. bf16 activations)."""
    mine = [p.detach()[slot] for p in params if p.dim() and p.shape[0] > slot]
    if any(not torch.isfinite(w).all() for w in mine):
        return f"its adapter weights already held NaN/inf after the update of step {step}"
    top = max((float(w.abs().max()) for w in mine if w.numel()), default=0.0)
    return f"its adapter weights are finite, largest |w| {top:.3g}: the forward pass overflowed"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks (``model.model.layers`` for transformers' causal
    LMs), or none where the model has no such list."""
    layers = getattr(_body(model), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


@contextlib.contextmanager
def compiled_layers(model, backend: bool | str = True):
    """Each decoder block through ``torch.compile`` while inside, restored on the way out.

    Regional compilation: the blocks share one code object, so a compiled block can serve
    every layer whose guards it passes (how many graphs dynamo actually builds at 8B is not
    measured); the loss, the optimiser and the skip checks stay eager. Inside a block
    inductor fuses the elementwise work eager mode launches one op at a time (the norms'
    fp32 up-casts, the rotary embedding, the activation, the adapter path's casts and
    scales), forward and backward. Micro-batch shapes vary (rows, padded length): dynamo
    recompiles for new shapes, with symbolic sizes after its first recompile by default.
    """
    layers = decoder_layers(model)
    if backend is True and any(p.device.type == "cpu" for p in model.parameters()):
        # torch 2.13's CPU code generation vectorises the scatter-add of the adapter tables'
        # gradients (index_put, accumulate) with a wrong stride at micro-batches of 1-2
        # rows and writes past the table (a heap corruption; unvectorised it is exact)
        raise ValueError("compiled training with inductor is for CUDA models; on the CPU its vectorised "
                         "scatter-add of the adapter gradients is wrong at small micro-batches (torch 2.13)")
    from mta.decoding.attention import allow_recompiles

    allow_recompiles(64)  # micro-batch shapes: rows and padded lengths vary
    saved = [ly._compiled_call_impl for ly in layers]
    for ly in layers:
        ly.compile(backend="inductor" if backend is True else backend)
    try:
        yield layers
    finally:
        for ly, s in zip(layers, saved):
            ly._compiled_call_impl = s


def _checkpointing(model, on: bool) -> None:
    # transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_*.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


@torch.no_grad()
def _slot_grad_sq(params: list[torch.nn.Parameter], slots: list[int]) -> torch.Tensor:
    """Each slot's squared gradient norm over every parameter, summed on the device (no sync
    per tensor): NaN or inf exactly when one of the slot's gradient elements is."""
    idx = torch.tensor(slots, dtype=torch.long)
    dev = next((p.grad.device for p in params if p.grad is not None), idx.device)
    sq = torch.zeros(len(slots), dtype=torch.float64, device=dev)
    for p in params:
        if p.grad is not None:
            g = p.grad.index_select(0, idx.to(p.device)).double()
            sq += g.pow(2).flatten(1).sum(1).to(dev)
    return sq


def _clip_per_slot(params: list[torch.nn.Parameter], slots: list[int], max_norm: float,
                   sq: torch.Tensor) -> None:
    """Scale each slot's gradient to at most ``max_norm`` (``sq``: the slots' squared norms)."""
    idx = torch.tensor(slots, dtype=torch.long)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            shape = (len(slots),) + (1,) * (p.dim() - 1)
            g = p.grad.index_select(0, idx.to(p.device))
            p.grad.index_copy_(0, idx.to(p.device), g * scale.to(g.dtype).to(p.device).view(shape))


def encode_example(tokenizer, prompt: str, target: str, max_length: int = 512) -> Example:
    """Chat-formatted prompt + target + end-of-turn; only the target is learnt.

    Over-long prompts lose their beginning (the retrieved history), never the
    instruction at their end or the target.
    """
    from mta.decoding.prompts import chat_prompt, end_of_turn

    p_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [end_of_turn(tokenizer)]
    t_ids = t_ids[: max_length // 2]
    p_ids = p_ids[-(max_length - len(t_ids)):]
    return Example(tuple(p_ids + t_ids), tuple([IGNORE] * len(p_ids) + t_ids))
