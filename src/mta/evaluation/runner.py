"""`mta eval`: every method under one protocol (folds), one base model, with intervals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mta.anchors import embed_users
from mta.bank import (
    BASE_DIR,
    adapter_dir,
    build_bank,
    build_task,
    finished_task,
    read_index,
    training_history,
)
from mta.config import AdaptConfig, BankConfig, apply_variant
from mta.data.schema import Dataset, User
from mta.errors import MtaError
from mta.evaluation import plots
from mta.evaluation.leaks import check_folds
from mta.evaluation.methods import (
    BANK_METHODS,
    ITEM_PRIOR,
    PRIORS,
    TASK_METHODS,
    USER_PRIOR,
    EvalSetup,
    FoldResult,
    _stages,
    named_progress,
    private_config,
    run_adapted,
    run_prior,
    run_private,
    run_prompt,
    run_task,
)
from mta.evaluation.protocol import Fold, persons_of, prepare_targets
from mta.evaluation.stats import bootstrap_ci, group_sum, paired_diff_ci, user_stats
from mta.loaded_bank import LoadedBank
from mta.paths import RESULT, write_json_atomic, write_text_atomic  # RESULT: a method's result on a fold (``_resumed``)
from mta.store import UserStore
from mta.weight_search import SEARCHED, SearchCache

log = logging.getLogger(__name__)


def _item_ids(user: User) -> tuple:
    return tuple((it.id, it.model_dump_json()) for it in user.history)


def _digest(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def users_digest(users) -> str:
    """The sha256 of users as read (ids, histories, queries and gold outputs), whatever their
    order: what an evaluation's result, or a tune's trial log, was computed on."""
    rows = sorted(json.dumps(u.model_dump(mode="json"), sort_keys=True) for u in users)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _identity(setup: EvalSetup, m: str, targets_digest: str, candidates_digest: str) -> str:
    """What a method's result on a fold depends on: the method, the model and task, every
    resolved stage's configuration, the fold's targets (as prepared) and its candidates."""
    return _digest({"method": m, "task": setup.task.name, "model": setup.backbone.model_id,
                    "fingerprint": setup.backbone.fingerprint, "max_new_tokens": setup.max_new_tokens,
                    "configs": [setup.bank_cfg.model_dump(mode="json"), setup.adapt_cfg.model_dump(mode="json"),
                                # without a later field at its default: earlier results still resume
                                setup.gen_cfg.identity(), setup.baselines.model_dump(mode="json")],
                    "targets": targets_digest, "candidates": candidates_digest})


def _resumed(where: Path, identity: str) -> FoldResult | None:
    """The result an earlier run of the same evaluation left in ``where`` (same identity),
    or None: a method finished on a fold is not run again when a stopped evaluation is
    run again into its directory (its banks resume too). Its timings are that run's."""
    try:
        doc = json.loads((where / RESULT).read_text(encoding="utf-8"))
        if doc.get("identity") != identity:
            return None
        return FoldResult(**doc["result"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _keep(where: Path, identity: str, part: FoldResult) -> None:
    """``part`` saved for ``_resumed``, unless its predictions do not come back from JSON
    as they are (then the method simply runs again next time)."""
    doc = {"identity": identity, "result": dataclasses.asdict(part)}
    text = json.dumps(doc)
    if json.loads(text) != doc:
        return
    where.mkdir(parents=True, exist_ok=True)
    write_text_atomic(where / RESULT, text)


def scored_users(users: list[User]) -> list[User]:
    return [u for u in users if any(q.gold is not None for q in u.queries)]


def method_stats(task, users: list[User], preds: dict[str, list]) -> np.ndarray:
    """(scored persons, d): each scored person's summed query statistics (over all their
    users) for one method's parsed predictions (``preds[user_id]``, one per query);
    queries without gold skipped. The bootstrap's unit is the person."""
    su = scored_users(users)
    rows = user_stats([[p for p, q in zip(preds[u.user_id], u.queries) if q.gold is not None] for u in su],
                      [[q.gold for q in u.queries if q.gold is not None] for u in su], task.query_stats)
    return group_sum(rows, [u.person_id for u in su])


def summarise(task, users: list[User], results: dict[str, FoldResult], references: list[str],
              n_boot: int, seed: int) -> list[dict]:
    """Per method: metrics with 95% CIs, paired differences to each of ``references``, costs."""
    su = scored_users(users)
    n_queries = sum(q.gold is not None for u in su for q in u.queries)
    stats = {name: method_stats(task, users, res.preds) for name, res in results.items()}
    rows = []
    for name, res in results.items():
        row = {"method": name, "users": len(su), "persons": len({u.person_id for u in su}), "queries": n_queries,
               "metrics": {}}
        for m in task.metric_names:
            def fn(s, m=m):
                return task.metrics_from_stats(s)[m]

            v, lo, hi = bootstrap_ci(stats[name], fn, n_boot=n_boot, seed=seed)
            row["metrics"][m] = {"value": v, "ci": [lo, hi]}
            for ref in references:
                if ref in results and name != ref:
                    d, dlo, dhi = paired_diff_ci(stats[name], stats[ref], fn, n_boot=n_boot, seed=seed)
                    row["metrics"][m]["diff_vs_" + ref] = {"value": d, "ci": [dlo, dhi],
                                                           "significant": bool(dlo > 0 or dhi < 0)}
        n = max(1, len(res.preds))
        row["seconds_per_user_adapt"] = res.adapt_seconds / n
        row["seconds_per_user_inference"] = res.infer_seconds / n
        b = list(res.bytes_per_user.values())
        row["bytes_per_user"] = float(np.mean(b)) if b else 0.0
        row["trainable_params_per_user"] = res.trainable_params_per_user
        # answers the task could not parse, or empty ones (scored as wrong, as the furthest
        # rating or as empty text): a collapsed adapter shows here plainly
        row["unparsed"] = sum(p is None or p == "" for u in su for p, q in zip(res.preds[u.user_id], u.queries)
                              if q.gold is not None)
        row["optimizer_steps"] = {part: {"min": min(v), "median": float(np.median(v)), "max": max(v)}
                                  for part, v in res.steps.items() if v}
        rows.append(row)
    return rows


def references(methods: list[str]) -> list[str]:
    """The methods every other is compared with (paired differences), when evaluated: the
    prompt-only baseline, the shared task LoRA, the user's own prior and the item's."""
    return [m for m in ("rag-1", "task-lora", USER_PRIOR, ITEM_PRIOR) if m in methods]


def merge(into: FoldResult | None, part: FoldResult) -> FoldResult:
    if into is None:
        return part
    into.preds.update(part.preds)
    into.outputs.update(part.outputs)
    into.bytes_per_user.update(part.bytes_per_user)
    into.adapt_seconds += part.adapt_seconds
    into.infer_seconds += part.infer_seconds
    into.trainable_params_per_user = part.trainable_params_per_user or into.trainable_params_per_user
    for k, v in part.steps.items():
        into.steps.setdefault(k, []).extend(v)
    return into


def eval_layout(out: Path) -> Callable[[int, str], Path]:
    """`mta eval`: RUN/fold<i>/bank, RUN/fold<i>/<method>."""
    return lambda fold, name: out / f"fold{fold}" / name


def run_layout(out: Path) -> Callable[[int, str], Path]:
    """`mta run` (one split): RUN/bank and RUN/store (the mta store)."""
    return lambda fold, name: out / ("bank" if name == "bank" else "store" if name == "mta" else name)


def not_run(methods: Sequence[str], adapt: AdaptConfig) -> dict[str, str]:
    """The methods asked for that a recipe leaves nothing to run, each with the reason:
    ``mta-stack`` (the stack alone) where the recipe trains no stack (its steps or epochs 0,
    a tune's "no training" choice), which would adapt nothing and answer as the base model."""
    if "mta-stack" in methods and not adapt.stacks:
        return {"mta-stack": "the recipe trains no stack (stack steps or epochs 0), so the stack alone would "
                             "adapt nothing"}
    return {}


def run_eval(ds: Dataset, methods: list[str], setup: EvalSetup, out: Path, folds: list[Fold], n_boot: int,
             seed: int, target_history: int | None = None, place: Callable[[int, str], Path] | None = None,
             history_queries: int = 0, required: frozenset[str] = frozenset(), leak_check: bool = True) -> dict:
    """Every method on every fold's targets (anchors from the fold's candidates), then
    intervals over all targets. ``place(fold, name)`` is where a fold's bank and each
    method's adapters go (default: ``eval_layout``); ``history_queries`` and
    ``target_history`` shape the targets (``protocol.prepare_targets``). ``leak_check``:
    stop before anything trains when a target's answer is in its fold's training data
    (``mta.evaluation.leaks``)."""
    task = setup.task
    place = place or eval_layout(out)
    left_out = not_run(methods, setup.adapt_cfg)
    for m, why in left_out.items():
        log.warning("%s is not run: %s", m, why)
    methods = [m for m in methods if m not in left_out]
    if not methods:
        raise MtaError(f"no method to run: {'; '.join(f'{m}: {w}' for m, w in left_out.items())}")
    out.mkdir(parents=True, exist_ok=True)
    if setup.search_cache is None:  # mta and mta-fusion search alike: one search, its time counted by each
        setup = dataclasses.replace(setup, search_cache=SearchCache(out / SEARCHED))
    results: dict[str, FoldResult | None] = {m: None for m in methods}
    split = []
    t_start = time.perf_counter()
    bank_seconds = 0.0
    targets = {f.index: prepare_targets(f.targets, history_queries, target_history, task) for f in folds}
    if leak_check:
        check_folds([(targets[f.index], f.candidates) for f in folds], task)
    # Per-user LoRAs first: they follow the bank's recipe (rank, lr, epochs, examples), so
    # an anchor's meta-LoRA IS its per-user LoRA when it trains on the same history; the
    # banks below copy those instead of training the same adapter twice.
    own: dict[str, tuple[tuple, Path]] = {}
    # ... only the anchors of a from-scratch bank, and only while the per-user LoRAs train
    # with the anchors' budget (``bank_for`` never sets a base: equal means lr and steps unset)
    scratch = setup.bank_cfg.model_copy(update={"bank_base": "none"})
    reuse = private_config(setup.bank_cfg, setup.adapt_cfg, setup.baselines) == scratch  # (never when stopped)
    # A method whose training diverges (a NaN the trainer cannot skip) is left out of the
    # report with its error, and the others go on: one baseline at too high a learning rate
    # must not cost a whole evaluation. Its adapters' folders are left as they are. A
    # ``required`` method's divergence is the caller's error (`mta run` is for its mta).
    failed: dict[str, MtaError] = {}

    def attempt(names, fn):
        try:
            return fn()
        except MtaError as e:
            if not diverged(e) or required & set(names):
                raise
            gone = [n for n in names if n in methods and n not in failed]
            for n in gone:
                failed[n] = e
            log.warning("%s: %s; the evaluation goes on without %s", setup.prefix.strip() or "eval", e,
                        ", ".join(gone))
            return None

    digests = {f.index: (users_digest(targets[f.index]), users_digest(f.candidates)) for f in folds}

    # (results read back, results in all): a table whose every result was read back says
    # so, for its wall time is then the reading's, and each method's timings an earlier run's
    read_back = [0, 0]

    def resumed(m: str, fold: Fold, where: Path) -> FoldResult | None:
        part = _resumed(where, _identity(setup, m, *digests[fold.index]))
        if part is not None:
            read_back[0] += 1
            log.info("%s%s: finished by an earlier run of this evaluation; its result read from %s",
                     setup.prefix, m, where / RESULT)
        return part

    def kept(m: str, fold: Fold, where: Path, part: FoldResult | None) -> FoldResult | None:
        if part is not None:
            _keep(where, _identity(setup, m, *digests[fold.index]), part)
        return part

    if "per-user-lora" in methods:
        for fold in folds:
            d = place(fold.index, "per-user-lora")
            setup.prefix = f"fold {fold.index} " if len(folds) > 1 else ""
            part = resumed("per-user-lora", fold, d) if (d / "index.json").is_file() else None
            if part is None:
                part = kept("per-user-lora", fold, d, attempt(
                    ["per-user-lora"], lambda d=d, fold=fold: run_private(setup, targets[fold.index], d)))
            if part is None:
                break
            results["per-user-lora"] = merge(results["per-user-lora"], part)
            read_back[1] += 1
            slots = {a.user_id: a.slot for a in read_index(d).anchors}
            if reuse:
                for u in targets[fold.index]:
                    own[u.user_id] = (_item_ids(training_history(u, setup.bank_cfg)), adapter_dir(d, slots[u.user_id]))

    # bank_base "task": the task LoRA (the task-lora baseline's, which OPPU stacks on) is
    # trained once, where the baseline keeps it, and the bank copies it in as its base
    # (BANK/base) instead of training it again; a bank whose base an earlier run trained
    # lends it to the baselines instead. mta-reference keeps a from-scratch bank.
    residual = setup.bank_cfg.bank_base == "task"
    task_cfg = setup.baselines.bank_for("task", setup.bank_cfg)
    users_of_bank = sorted(BANK_METHODS - {"mta-reference"} if residual else BANK_METHODS)

    def trained(user: User) -> Path | None:
        hit = own.get(user.user_id)
        return hit[1] if hit and hit[0] == _item_ids(user) else None

    for fold in folds:
        setup.prefix = f"fold {fold.index} " if len(folds) > 1 else ""
        split.append({"fold": fold.index, "targets": [u.user_id for u in targets[fold.index]],
                      "anchor_candidates": [u.user_id for u in fold.candidates],
                      "target_persons": persons_of(fold.targets), "candidate_persons": persons_of(fold.candidates)})
        bank = task_bank = ref_bank = task_path = None
        # the stack table answers this fold's targets, no more: a bank's default (a server's
        # 256 resident users) held 8.8 GiB at 1.5B for OPPU's rank-8 stacks on every layer,
        # 29 users a fold (run U's Last.fm tune, docs/architecture.md)
        resident = max(1, len(targets[fold.index]))
        # methods an earlier run of this evaluation finished on this fold: read back, and no
        # bank or task LoRA is built (or trained again) for them alone
        done = {m: part for m in methods if m != "per-user-lora" and m not in failed
                and (part := resumed(m, fold, place(fold.index, m))) is not None}
        wanted = set(methods) - set(failed) - set(done)
        if TASK_METHODS & wanted or (residual and set(users_of_bank) & wanted):
            t0 = time.perf_counter()
            base = place(fold.index, "bank") / BASE_DIR
            if residual and finished_task(base, setup.backbone, task, task_cfg, list(fold.candidates)):
                task_path = base
            elif attempt(sorted(TASK_METHODS) + (users_of_bank if residual else []), lambda fold=fold: build_task(
                    setup.backbone, list(fold.candidates), task, task_cfg, place(fold.index, "task-lora"),
                    _stages(setup, "task-lora"))) is not None:
                task_path = place(fold.index, "task-lora")
            if task_path is not None and TASK_METHODS & wanted:
                task_bank = LoadedBank(setup.backbone, task_path, task, resident=resident)
            bank_seconds += time.perf_counter() - t0
            wanted = set(methods) - set(failed) - set(done)
        if BANK_METHODS & wanted:
            t0 = time.perf_counter()
            base_from = task_path if residual else None
            if set(users_of_bank) & wanted and attempt(users_of_bank, lambda fold=fold, base_from=base_from: build_bank(
                    setup.backbone, list(fold.candidates), task, setup.bank_cfg, place(fold.index, "bank"),
                    _stages(setup, "bank"), trained=None if residual else trained, base_cfg=task_cfg,
                    base_from=base_from)) is not None:
                bank = LoadedBank(setup.backbone, place(fold.index, "bank"), task, resident=resident)
            if residual and "mta-reference" in wanted and attempt(["mta-reference"], lambda fold=fold: build_bank(
                    setup.backbone, list(fold.candidates), task, scratch, place(fold.index, "bank-reference"),
                    _stages(setup, "bank-reference"), trained=trained)) is not None:
                ref_bank = LoadedBank(setup.backbone, place(fold.index, "bank-reference"), task, resident=resident)
            bank_seconds += time.perf_counter() - t0
        for m in methods:
            if m == "per-user-lora" or m in failed:
                continue
            part = done.get(m)
            if part is None:
                used = ref_bank if m == "mta-reference" and ref_bank is not None else bank
                where = place(fold.index, m)
                part = attempt([m], lambda m=m, fold=fold, used=used, task_bank=task_bank, where=where: _run_method(
                    setup, m, targets[fold.index], where, used, task_bank, fold.candidates))
                if part is not None:  # kept with the shared adapters' steps: a resumed part needs no bank
                    part.steps.update(_shared_steps(m, used, task_bank))
                    kept(m, fold, where, part)
            if part is not None:
                results[m] = merge(results[m], part)
                read_back[1] += 1
    if len(failed) == len(methods):  # nothing to report
        raise next(iter(failed.values()))
    results = {m: r for m, r in results.items() if m not in failed}
    prepared = {u.user_id: u for f in folds for u in targets[f.index]}
    evaluated = [prepared[u.user_id] for u in ds.users if u.user_id in prepared]  # the data's order
    rows = summarise(task, evaluated, results, references(list(results)), n_boot, seed)
    write_json_atomic(out / "split.json", split)
    preds = [{"method": m, "user_id": uid, "outputs": r.outputs[uid], "parsed": r.preds[uid]}
             for m, r in results.items() for uid in r.preds]
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in preds))
    return {"rows": rows, "bank_seconds": bank_seconds, "wall_seconds": time.perf_counter() - t_start,
            "read_back": read_back,
            "folds": split, **peak_fields(setup.backbone.peak_memory()),
            "failed": {m: str(e) for m, e in failed.items()}, "left_out": left_out,
            # each method's (persons, d) statistics, as the intervals resample them (not
            # written: for paired intervals against another run, a variant's or a trial's)
            "person_stats": {m: method_stats(task, evaluated, r.preds) for m, r in results.items()}}


VARIANTS = "variants"  # RUN/variants/<variant>: each variant's own run of mta (run_variants)


def check_variants(variants, bank: BankConfig, adapt: AdaptConfig) -> None:
    """Each variant applied once to the run's configs: a bad value fails here (one line),
    before anything trains, not after the main run."""
    for v in variants:
        apply_variant(v, bank, adapt)


def run_variants(ds: Dataset, setup: EvalSetup, out: Path, folds: list[Fold], n_boot: int, seed: int,
                 main: dict, variants: list[str], place: Callable[[int, str], Path],
                 target_history: int | None = None, history_queries: int = 0) -> list[dict]:
    """The ablation: ``mta`` again for each variant (one bank or adaptation setting changed,
    ``mta.config.apply_variant``) on the same folds, in RUN/variants/<variant>, each row
    with its paired difference to ``main``'s ``mta`` (the same persons resampled). A
    variant's bank and task LoRA are the main run's when its settings leave them as they
    were (``place``: the main run's layout), trained in its own directory otherwise; a
    variant that diverges is a row with its error. Resumes like the main run."""
    task = setup.task
    if "mta" not in main["person_stats"]:  # (the CLI asks for mta up front; here it diverged)
        log.warning("the variants are not run: they are compared with mta, which has no result (%s)",
                    main.get("failed", {}).get("mta", "not among the methods"))
        return []
    base = main["person_stats"]["mta"]
    task_cfg = setup.baselines.bank_for("task", setup.bank_cfg)
    rows = []
    for v in variants:
        bank_cfg, adapt_cfg = apply_variant(v, setup.bank_cfg, setup.adapt_cfg)
        where = out / VARIANTS / v
        same_bank = bank_cfg == setup.bank_cfg
        same_task = setup.baselines.bank_for("task", bank_cfg) == task_cfg

        def vplace(fold: int, what: str, where=where, same_bank=same_bank, same_task=same_task) -> Path:
            if (what == "bank" and same_bank) or (what == "task-lora" and same_task):
                return place(fold, what)
            return where / f"fold{fold}" / what

        # its own weight search (in its directory): a changed bank or adaptation searches anew
        vsetup = dataclasses.replace(setup, bank_cfg=bank_cfg, adapt_cfg=adapt_cfg, search_cache=None,
                                     progress=named_progress(setup.progress, f"variant {v}"))
        try:
            res = run_eval(ds, ["mta"], vsetup, where, folds, n_boot, seed, target_history, vplace,
                           history_queries, required=frozenset({"mta"}), leak_check=False)
        except MtaError as e:
            if not diverged(e):
                raise
            rows.append({"variant": v, "method": "mta", "error": str(e)})
            continue
        row = {"variant": v, **res["rows"][0], "read_back": res["read_back"]}
        stats = res["person_stats"]["mta"]  # the same persons as ``base``, in the same order
        for m in task.metric_names:
            d, lo, hi = paired_diff_ci(stats, base, lambda s, m=m: task.metrics_from_stats(s)[m], n_boot=n_boot,
                                       seed=seed)
            row["metrics"][m]["diff_vs_mta"] = {"value": d, "ci": [lo, hi], "significant": bool(lo > 0 or hi < 0)}
        rows.append(row)
    return rows


def peak_fields(peak: dict | None) -> dict:
    """An eval record's memory fields: the run's peak bytes allocated (the key older records
    carry too) and reserved by torch's caching allocator, and the cap it ran under
    (``--gpu-memory``); None on the CPU."""
    return {"peak_gpu_memory_bytes": peak and peak["allocated"],
            "peak_gpu_reserved_bytes": peak and peak["reserved"], "gpu_memory_cap_bytes": peak and peak.get("cap")}


def _shared_steps(m: str, bank, task_bank) -> dict[str, list[int]]:
    """The optimiser steps of the shared adapters method ``m`` stands on: the fold's anchors
    (one copied from a per-user LoRA carries that LoRA's steps) or its task LoRA."""
    if m in BANK_METHODS and bank is not None and bank.record is not None:
        out = {"anchors": [a.steps for a in bank.record.anchors if a.steps is not None]}
        if bank.base_slot is not None:
            out["task LoRA"] = [a.steps for a in read_index(bank.path / BASE_DIR).anchors if a.steps is not None]
        return out
    if m in TASK_METHODS and task_bank is not None and task_bank.record is not None:
        return {"task LoRA": [a.steps for a in task_bank.record.anchors if a.steps is not None]}
    return {}


def _run_method(setup: EvalSetup, m: str, targets: list[User], where: Path, bank, task_bank,
                candidates=()) -> FoldResult:
    """One method on one fold's targets (``bank`` / ``task_bank``: the fold's, where the
    method needs one; ``candidates``: the fold's training users)."""
    if m == "base" or m.startswith("rag-"):
        return run_prompt(setup, m, targets)
    if m in PRIORS:
        return run_prior(setup, m, targets, candidates)
    if m == "task-lora":
        return run_task(setup, task_bank, targets)
    if m == "oppu":
        return run_adapted(setup, m, task_bank, targets, where)
    if m == "mta-stack":
        return run_adapted(setup, m, LoadedBank(setup.backbone, None, setup.task, resident=max(1, len(targets))),
                           targets, where)
    return run_adapted(setup, m, bank, targets, where)


def diverged(e: MtaError) -> bool:
    """A recipe that diverges on this model (mta.engine.train's NaN checks), not a bad input."""
    return str(e).startswith("training diverged")


def anchor_map_for(ds: Dataset, setup: EvalSetup, place: Callable[[int, str], Path], out: Path,
                   title: str) -> Path | None:
    """The anchor map of fold 0: all users embedded, fold 0's anchors, a few targets' links."""
    bank = place(0, "bank")
    if not (bank / "index.json").exists():
        return None
    rec = read_index(bank)
    emb = embed_users(ds.users, setup.task, setup.backbone.embedder)
    pos = {u.user_id: i for i, u in enumerate(ds.users)}
    anchors = [pos[a] for a in rec.anchor_ids if a in pos]
    links = []
    for name in ("mta", "mta-reference", "mta-fusion"):
        if not (place(0, name) / "store.json").is_file():
            continue
        store = UserStore(place(0, name))
        ids = store.user_ids()
        if ids:
            for uid in ids[:8]:
                links.append((pos[uid], [pos[a] for a in store.meta(uid).anchor_users if a in pos]))
            break
    path = out / "anchor_map.png"
    plots.anchor_map(emb, [u.user_id for u in ds.users], anchors, links, title, path)
    return path
