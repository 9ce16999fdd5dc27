"""``mta eval``, ``mta run`` and ``mta demo``: methods compared under one protocol, on
one backbone, scored and reported by the same code (``mta.evaluation``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer
from rich.markup import escape
from rich.table import Table

from mta.backbone import DEFAULT_MODEL
from mta.cli.common import Bars, console, err_console, progress, run_log, with_recipes
from mta.cli.loading import load_backbone, write_config
from mta.cli.options import Configs, DataPath, OutDir, RecipeFile, TaskName, configured
from mta.config import AdaptConfig, BackboneConfig, BankConfig, BaselineConfig, EvalConfig, GenerateConfig, RunConfig
from mta.data.readers import load_dataset, write_jsonl
from mta.data.schema import Dataset
from mta.data.synth import synth_users
from mta.decoding.answers import check_answer_rules, describe
from mta.errors import MtaError
from mta.evaluation.jobs import helpers, share_device
from mta.evaluation.leaks import check_split
from mta.evaluation.methods import EvalSetup, expand_methods
from mta.evaluation.protocol import Fold, holdout, make_folds, persons_of, pooled
from mta.evaluation.report import UNPARSED_NOTE, write_report
from mta.evaluation.runner import (
    anchor_map_for,
    check_variants,
    eval_layout,
    references,
    run_eval,
    run_layout,
    run_variants,
)
from mta.evaluation.tune import (
    DEV_SPLITS,
    MAX_USER_SHARE,
    SELECT,
    SPACES,
    VALUES,
    dev_check,
    dev_split,
    resolved_split,
    space_groups,
    tune,
)
from mta.paths import check_output_dir, foreign_entries, wait_for_writers, write_text_atomic
from mta.recipes import read_recipe
from mta.tasks import get_task

STAGES = (BackboneConfig, BankConfig, AdaptConfig, GenerateConfig)


def check_run_out(out: Path, trial_log: bool = False) -> None:
    """A run directory is new, empty, or an earlier run of eval/run/tune (whose banks resume).
    ``trial_log`` (tune): or a directory that holds only a tune's trial log, carried from
    where an earlier run of the tune stopped (another machine): the tune goes on from it
    (its identity is checked against this tune's before any trial is skipped)."""
    def ours(d: Path) -> bool:
        if trial_log and foreign_entries(d) == [VALUES]:
            return True
        try:
            return json.loads((d / "config.json").read_text()).get("command") in ("eval", "run", "tune")
        except (OSError, ValueError, AttributeError):
            return False

    check_output_dir(out, ours, "an mta run directory")


def _read_back(res: dict) -> str:
    """The protocol's words for results an earlier run of the evaluation left (``mta eval``
    into the same directory, the folds joined after ``--only-folds``): their timings in the
    table are those runs', and the wall time is this run's alone."""
    got, of = (sum(c) for c in zip(res["read_back"], *(r["read_back"] for r in res.get("variants", [])
                                                         if "read_back" in r)))
    if not got:
        return ""
    which = "every result" if got == of else f"{got} of {of} results"
    return (f" ({which} of a method on a fold read back from an earlier run of this evaluation, its timings "
            "that run's)")


def _evaluate(command: str, ds: Dataset, out: Path, cfg: Configs, methods: list[str], folds: list[Fold],
              protocol: str, n_boot: int, seed: int, target_history: int | None, place,
              history_queries: int = 0, required: frozenset[str] = frozenset(), leak_check: bool = True,
              scope: str = "") -> None:
    """Load the backbone, run ``methods`` on ``folds``, write and print the report (``scope``:
    said in its title when ``folds`` are not all of the protocol's)."""
    t = get_task(ds.task)
    if not any(q.gold is not None for u in ds.users for q in u.queries):
        raise MtaError(f"{ds.path}: no query has a gold output; nothing to score")
    check_answer_rules(t, cfg.generate)
    if leak_check:  # before anything is written; run_eval is then told not to check again
        check_split(folds, t, history_queries, target_history)
    check_run_out(out)
    backbone = load_backbone(cfg.backbone)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    config = write_config(out, command, cfg, backbone, data=str(ds.path), synthetic=ds.synthetic, task=t.name,
                          methods=methods, seed=seed, users=len(ds.users))
    with run_log(out), progress() as bar:
        setup = EvalSetup(backbone, t, cfg.bank, cfg.adapt, cfg.generate, Bars(bar),
                          baselines=getattr(cfg, "baselines", BaselineConfig())).resolve(ds.users)
        res = run_eval(ds, methods, setup, out, folds, n_boot, seed, target_history, place, history_queries,
                       required, leak_check=False)
        variants = list(getattr(cfg, "eval", EvalConfig()).variants)
        if variants:
            res["variants"] = run_variants(ds, setup, out, folds, n_boot, seed, res, variants, place,
                                           target_history, history_queries)
    tag = "synthetic " if ds.synthetic else ""
    users = sum(len(f.targets) for f in folds) if scope else len(ds.users)
    title = f"mta {command}{scope}: {t.title}, {users} {tag}users, model {backbone.model_id}"
    peak, held, cap = (res.get(k) for k in ("peak_gpu_memory_bytes", "peak_gpu_reserved_bytes",
                                             "gpu_memory_cap_bytes"))
    meta = (f"Protocol: {protocol}; {cfg.bank.anchors} anchors requested per bank; 95% percentile bootstrap over "
            f"persons ({n_boot} resamples); {describe(t, cfg.generate, setup.max_new_tokens)}. "
            f"Wall time {time.perf_counter() - t0:.0f} s on {backbone.device}" + _read_back(res)
            + (f", peak GPU memory {peak / 2**30:.1f} GiB" if peak else "")
            + (f" ({held / 2**30:.1f} GiB held by torch's allocator" if held else "")
            + (f", under a cap of {cap / 2**30:.1f} GiB)" if held and cap else ")" if held else "")
            + (" (synthetic data)" if ds.synthetic else "") + ".")
    failed = res.get("failed", {})
    refs = references([m for m in methods if m not in failed and m not in res.get("left_out", {})])
    files = write_report(out, title, meta, t, res, config, ds.synthetic, refs)
    if anchor_map_for(ds, setup, place, out, f"anchor map (fold 0): {title}"):
        files.append("anchor_map.png")
    m1 = t.metric_names[0]
    table = Table(title=escape(title))
    for col in ("method", *t.metric_names, *(f"Δ vs {r}" for r in refs), "bytes/user"):
        table.add_column(col)
    for r in res["rows"]:
        diffs = []
        for ref in refs:
            d = r["metrics"][m1].get(f"diff_vs_{ref}")
            diffs.append("-" if d is None else f"{d['value']:+.3f}" + (" *" if d["significant"] else ""))
        table.add_row(r["method"], *[f"{r['metrics'][m]['value']:.3f}" for m in t.metric_names], *diffs,
                      f"{r['bytes_per_user']:,.0f}")
    console.print(table)
    if res.get("variants"):
        vt = Table(title=escape(f"ablation: mta with one setting changed, against mta ({m1})"))
        for col in ("variant", m1, "Δ vs mta", "bytes/user"):
            vt.add_column(col)
        for r in res["variants"]:
            if "error" in r:
                vt.add_row(escape(r["variant"]), "diverged", "-", "-")
                continue
            d = r["metrics"][m1]["diff_vs_mta"]
            vt.add_row(escape(r["variant"]), f"{r['metrics'][m1]['value']:.3f}",
                       f"{d['value']:+.3f}" + (" *" if d["significant"] else ""), f"{r['bytes_per_user']:,.0f}")
        console.print(vt)
    for m, e in failed.items():
        err_console.print(f"[yellow]not reported: {escape(m)} diverged ({escape(e)})[/yellow]")
    for m, why in res.get("left_out", {}).items():
        err_console.print(f"[yellow]not run: {escape(m)}: {escape(why)}[/yellow]")
    for r in res["rows"]:
        if r.get("unparsed", 0) >= UNPARSED_NOTE * r["queries"]:
            err_console.print(f"[yellow]notice: {escape(r['method'])}: {r['unparsed']} of {r['queries']} answers "
                              f"could not be parsed or were empty ({t.unparsed_scoring})[/yellow]")
    err_console.print(f"wrote {escape(str(out))}: {', '.join(files)}, config.json, run.log")


@configured(EvalConfig, BaselineConfig, *STAGES)
def eval_cmd(data: DataPath, out: OutDir, task: TaskName = None, recipe: RecipeFile = None, *,
             cfg: Configs) -> None:
    """Compare methods under one protocol; write metrics.json, results.md and PNG plots."""
    e = cfg.eval
    methods = expand_methods(e.methods)
    if e.variants and "mta" not in methods:
        raise MtaError("--variants compares variants of mta with mta itself: add mta to --methods")
    ds = load_dataset(data, task, e.persons)
    cfg, _ = with_recipes(cfg, recipe, cfg.backbone.model or DEFAULT_MODEL, task=ds.task)
    check_variants(e.variants, cfg.bank, cfg.adapt)  # a bad value is said now, not after the main run trained
    dev_note = ""
    if recipe is not None:  # the persons a recipe was tuned on are never reported (dev_users: all their users)
        dev = set(read_recipe(recipe).dev_users)
        kept = [u for u in ds.users if u.user_id not in dev]
        dev_note = f"; the {len(ds.users) - len(kept)} users of the dev persons of {recipe.name} left out"
        try:  # how alike the persons it was tuned on are to these (mta.evaluation.tune.dev_check)
            check = dev_check(ds.users, dev, get_task(ds.task), e.history_queries, e.target_history)
        except MtaError:
            check = None
        if check:
            dev_note += (f" (their own-history agreement {check['dev']:.3f}, these persons' {check['others']:.3f}: "
                         "docs/evaluation.md)")
        ds.users = kept
    if e.users:
        ds.users = ds.users[:e.users]
    if e.anchor_data:
        pool = load_dataset(e.anchor_data, ds.task)
        folds = [pooled(ds.users, pool.users)]
        protocol = (f"every user of the data is a target ({len(ds.users)}); anchor candidates from "
                    f"{pool.path} ({len(folds[0].candidates)} users)")
    else:
        folds = make_folds(ds.users, e.folds, e.seed)
        protocol = (f"{e.folds} folds over persons (seed {e.seed}; {len(persons_of(ds.users))} persons, "
                    f"{len(ds.users)} users); each fold's persons' users are targets, the other folds' users "
                    "the anchor candidates")
    scope = ""
    if e.only_folds:
        folds = [f for f in folds if f.index in e.only_folds]
        which = ", ".join(map(str, e.only_folds))
        scope = f", fold {which} of {e.folds} only"
        protocol += (f"; this run: fold {which} only (--only-folds), scored on its targets alone; `mta eval` "
                     "of every fold into a directory holding each fold's results reads them back")
    if e.history_queries:
        protocol += f"; each target's last {e.history_queries} history items are extra test queries"
    if e.target_history:
        protocol += f"; targets keep their first {e.target_history} history items"
    protocol += dev_note
    _evaluate("eval", ds, out, cfg, methods, folds, protocol, e.n_boot, e.seed, e.target_history, eval_layout(out),
              e.history_queries, leak_check=e.leak_check, scope=scope)


@configured(RunConfig, *STAGES)
def run_cmd(data: DataPath, out: OutDir, task: TaskName = None, recipe: RecipeFile = None, *,
            cfg: Configs) -> None:
    """The whole method on one split: build the bank on the anchor candidates, adapt the
    held-out targets, score base vs RAG vs MTA on their queries."""
    ds = load_dataset(data, task)
    cfg, _ = with_recipes(cfg, recipe, cfg.backbone.model or DEFAULT_MODEL, task=ds.task)
    _run(ds, out, cfg)


def _run(ds: Dataset, out: Path, cfg: Configs) -> None:
    fold = holdout(ds.users, cfg.run.targets_fraction, cfg.run.seed)
    protocol = (f"one split over persons (seed {cfg.run.seed}): {len(fold.targets)} target users held out, "
                f"{len(fold.candidates)} anchor candidates")
    _evaluate("run", ds, out, cfg, ["base", "rag-1", "mta"], [fold], protocol, 1000, cfg.run.seed, None,
              run_layout(out), required=frozenset({"mta"}))


@configured(RunConfig, *STAGES)
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="Directory for the synthetic data and the run."),
    users: int = typer.Option(24, min=4, help="Synthetic users (half become held-out targets)."),
    *, cfg: Configs,
) -> None:
    """`mta run` on built-in SYNTHETIC data (4 taste groups) with the default models."""
    write_jsonl(synth_users(users, seed=cfg.run.seed, queries=2), out / "data" / "users.jsonl")
    console.print(f"wrote {users} synthetic users to {escape(str(out / 'data'))}")
    # the bank default suits thousands of users, not 12 anchor candidates; tags are short
    small = {"bank": {"anchors": 4}, "generate": {"max_new_tokens": 8}}
    _run(load_dataset(out / "data"), out / "run", cfg.layer(small))


@configured(EvalConfig, BaselineConfig, *STAGES)
def tune_cmd(
    data: DataPath, out: OutDir, task: TaskName = None,
    dev_fraction: float = typer.Option(1 / 3, min=0.05, max=0.9, help="Share of the persons set aside as dev "
                                       "persons (all their users tuned on, never reported)."),
    dev_split_how: str = typer.Option("auto", "--dev-split", help=f"How the dev persons are drawn: "
                                      f"{', '.join(DEV_SPLITS)}. balanced: one from each run of the persons ranked "
                                      "by how well their own histories predict themselves (rating and "
                                      "classification tasks); random: a seeded draw (every tune before this "
                                      "option); auto: balanced where it is defined, else random "
                                      "(docs/evaluation.md)."),
    space: str = typer.Option("quick", help=f"Search space: {', '.join(SPACES)}, or knob groups and spaces "
                              "separated by commas, e.g. stack-shape,top-k or budgets-quick,stack-stop "
                              "(mta.evaluation.tune)."),
    max_user_share: float = typer.Option(MAX_USER_SHARE, min=0.0, max=1.0, help="Skip recipes whose stacked "
                                         "adapter stores more than this share of a per-user LoRA per user."),
    ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="After the search, the dev table of every "
                                  "method on the chosen recipe (recipe.json's ablation); --no-ablation writes the "
                                  "recipe as soon as the search ends."),
    select: str = typer.Option("best", help="In each group the best trial (best), or in a budget's groups the "
                               "one training least (fewest steps, then the lowest rate) among those not "
                               "significantly worse than the best on the dev persons (least)."),
    jobs: int = typer.Option(1, min=1, max=16, help="Processes evaluating trials at once, each with its own copy "
                             "of the model, on one device: --gpu-memory and the host's threads are split "
                             "among them (mta.evaluation.jobs)."),
    *, cfg: Configs,
) -> None:
    """Choose a recipe for this model and task on dev users; write OUT/recipe.json."""
    if select not in SELECT:
        raise MtaError(f"--select must be one of {', '.join(SELECT)}, not {select!r}")
    space_groups(space)  # an unknown space fails before anything loads
    e = cfg.eval
    unused = [flag for flag, given in (("--methods", e.methods != EvalConfig.model_fields["methods"].default),
                                       ("--anchor-data", e.anchor_data is not None),
                                       ("--variants", bool(e.variants)),
                                       ("--only-folds", bool(e.only_folds))) if given]
    if unused:
        raise MtaError(f"mta tune chooses its own methods and anchors among the dev users: {', '.join(unused)} "
                       "is an `mta eval` option")
    ds = load_dataset(data, task, e.persons)
    cfg, _ = with_recipes(cfg, None, cfg.backbone.model or DEFAULT_MODEL, task=ds.task)
    if e.users:
        ds.users = ds.users[:e.users]
    t = get_task(ds.task)
    check_answer_rules(t, cfg.generate)
    dev_split_how = resolved_split(dev_split_how, t)
    dev = dev_split(ds.users, dev_fraction, cfg.eval.seed, dev_split_how, t, e.history_queries, e.target_history)
    check = dev_check(ds.users, dev, t, e.history_queries, e.target_history)
    n_dev = len({u.person_id for u in ds.users if u.user_id in set(dev)})
    console.print(f"dev persons: {n_dev} of {len({u.person_id for u in ds.users})} ({dev_split_how})"
                  + (f"; own-history agreement {check['dev']:.3f}, the other persons' {check['others']:.3f}"
                     if check else ""))
    if e.leak_check:  # the dev folds, before anything is written; tune is then told not to check again
        check_split(make_folds([u for u in ds.users if u.user_id in set(dev)], e.folds, cfg.bank.seed), t,
                    e.history_queries, e.target_history)
    check_run_out(out, trial_log=True)
    backbone = load_backbone(cfg.backbone)
    each = share_device(backbone, jobs) if jobs > 1 else cfg.backbone.gpu_memory
    write_config(out, "tune", cfg, backbone, data=str(ds.path), task=t.name, dev_users=dev, dev_split=dev_split_how,
                 dev_check=check, space=space, jobs=jobs)
    # what a helper needs to load the data and the model as this process did (its share of the device)
    dumped = cfg.dump()
    dumped["backbone"] = {**dumped["backbone"], "gpu_memory": each}
    payload = {"configs": dumped, "data": str(ds.path), "task": t.name, "persons": e.persons, "users": e.users,
               "out": str(out), "dev": dev, "space": space, "max_user_share": max_user_share, "select": select,
               "threads": torch.get_num_threads() if jobs > 1 else None}
    with run_log(out), progress() as bar, wait_for_writers(jobs > 1), helpers(jobs - 1, payload):
        setup = EvalSetup(backbone, t, cfg.bank, cfg.adapt, cfg.generate, Bars(bar),
                          baselines=cfg.baselines).resolve(ds.users)
        recipe = tune(ds, setup, out, dev, space, cfg.eval.folds, cfg.eval.history_queries, cfg.eval.n_boot, Bars(bar),
                      max_user_share, cfg.eval.target_history, leak_check=False, ablation=ablation, select=select,
                      split_folds=jobs > 1)
    recipe = recipe.model_copy(update={"dev_split": dev_split_how, "dev_check": check})
    write_text_atomic(out / "recipe.json", recipe.model_dump_json(indent=2) + "\n")
    m = recipe.metric
    table = Table(title=escape(f"mta tune: {t.title}, {len(dev)} dev users, model {backbone.model_id}"))
    for col in ("method", m, "Δ vs rag-1", "Δ vs task-lora"):
        table.add_column(col)
    for r in recipe.ablation:
        if "error" in r:
            what = f"{r['method']} diverged" if "method" in r else "failed"
            err_console.print(f"the final ablation: {what}: {escape(r['error'])}")
            continue
        ds_ = [r["metrics"][m].get(f"diff_vs_{ref}") for ref in ("rag-1", "task-lora")]
        table.add_row(r["method"], f"{r['metrics'][m]['value']:.3f}",
                      *("-" if d is None else f"{d['value']:+.3f}" + (" *" if d["significant"] else "") for d in ds_))
    if recipe.ablation:
        console.print(table)
    else:
        console.print("no dev table of every method (--no-ablation)")
    console.print(f"chosen: bank {recipe.bank or 'defaults'}, adapt {recipe.adapt or 'defaults'}, "
                  f"baselines {recipe.baselines or 'the bank recipe'}; "
                  f"wrote {escape(str(out / 'recipe.json'))}")
