"""`mta tune`: choose a recipe (learning rates, optimiser steps, anchor training, stack
shape, top-k, anchors, merge) for one model and task on DEV persons, whom later
evaluations leave out.

The search is a coordinate search: knob groups in a fixed order, each option of a group
evaluated under the eval protocol on the dev persons alone (folds among them, anchors
from the other dev folds), the best kept before the next group; ties keep the earlier
option (the default comes first). A group is scored by the method it is about: the
``budgets`` groups give every trained method (the task LoRA, each per-user LoRA, OPPU's
user part, the anchors, the stack) its own learning rate and optimiser steps from the
same grid, the same number of trials each, scored by ``task-lora``, ``oppu``,
``per-user-lora``, ``mta-fusion`` and ``mta``; the other groups by ``mta``. Adapters are
shared between trials trained with the same settings, and so are searched fusion weights
(OUT/searched: the stack's budget trials search each user once). At the end the chosen recipe is
evaluated once more on the dev persons with every baseline and ablation (rag-1, the
priors where the task has them, task-lora, per-user-lora, oppu, mta-fusion, mta-stack),
so the record says where mta stands and why.

The recipe file (``recipe.json``) holds the chosen bank, adapt and baseline settings, the
dev persons and their user ids, every trial and the final table. ``mta bank build/eval/run
--recipe FILE`` take its settings as defaults (flags still win) and ``mta eval`` leaves
the dev persons' users out. A recipe kept for a registered model and task goes into
``mta/recipes/`` (``mta.recipes``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from mta.config import AdaptConfig, BankConfig, BaselineConfig
from mta.data.schema import Dataset
from mta.errors import MtaError
from mta.evaluation.leaks import check_split
from mta.evaluation.methods import PRIOR_KINDS, PRIORS, EvalSetup, named_progress, prior_answer, private_config
from mta.evaluation.protocol import make_folds, persons_of, prepare_targets
from mta.evaluation.runner import diverged, run_eval, users_digest
from mta.evaluation.stats import paired_diff_ci
from mta.paths import write_json_atomic
from mta.recipes import Recipe
from mta.weight_search import SEARCHED, STACK_ONLY, SearchCache

log = logging.getLogger(__name__)
VALUES = "trial-values.json"  # OUT's log of finished trials (``tune`` resumes from it)
LOCKS = "locks"  # OUT/locks: the log's lock and one per trial (`TrialBoard`)
MEASURED = ("ci", "person_stats")  # what a trial's description keeps of its scores (``trial_value``)
SELECT = ("best", "least")  # how a group's option is chosen (``tune``'s ``select``)
Override = dict[str, dict]  # {"bank": {...}, "adapt": {...}, "baselines": {...}}

GROUPS: dict[str, list[Override]] = {
    "learning rate": [{"bank": {"lr": lr, "epochs": ep}, "adapt": {"stack_lr": lr}}
                      for lr, ep in ((3e-3, 1), (1e-3, 1), (3e-4, 2), (1e-4, 3))],
    "anchor training": [{"bank": {"anchor_training": m}} for m in ("user", "cluster")],
    "stack learning rate": [{"adapt": {"stack_lr": lr}} for lr in (3e-3, 1e-3, 3e-4, 1e-4)],
    # early stopping of the stack (and of the baselines' per-user parts, which follow it) on
    # the user's last item (mta.examples.held_out)
    "stack stop": [{"adapt": {"stack_stop": s}} for s in ("none", "held-out", "refit")],
    # the first three cost the same bytes per user (rank x blocks = 16); the last two more
    # than the default budget of a tenth of a per-user LoRA allows (see `stack_share`)
    "stack shape": [{"adapt": {"stack_rank": r, "stack_layers": n}}
                    for r, n in ((2, 8), (1, 16), (4, 4), (4, 0), (8, 0))],
    "top-k": [{"adapt": {"top_k": k}} for k in (2, 1, 4)],
    "anchors": [{"bank": {"anchors": n}} for n in (8, 4, 16)],
    "merge": [{"adapt": {"merge": m}} for m in ("delta", "factor")],
}
# Every trained part gets its own learning rate and optimiser steps from the same kind of
# search, with the same number of trials: the learning rates below times three step
# counts (the task LoRA's larger: it trains on every candidate's pooled history, not on
# one user's ~10 items). Each part is scored by the method that isolates it; OPPU's user
# part on top of the task LoRA chosen just before, the stack on top of the anchors.
BUDGET_LRS = (3e-3, 1e-3, 3e-4, 1e-4)
BUDGET_STEPS = {"task": (32, 128, 512), "user": (8, 32, 128)}
# group -> (config section, lr field, steps field, the method whose metric scores it, steps)
BUDGETS = {
    "task-lora budget": ("baselines", "task_lr", "task_steps", "task-lora", BUDGET_STEPS["task"]),
    "oppu budget": ("baselines", "oppu_lr", "oppu_steps", "oppu", BUDGET_STEPS["user"]),
    "per-user-lora budget": ("baselines", "user_lr", "user_steps", "per-user-lora", BUDGET_STEPS["user"]),
    "anchor budget": ("bank", "lr", "steps", "mta-fusion", BUDGET_STEPS["user"]),
    "stack budget": ("adapt", "stack_lr", "stack_steps", "mta", BUDGET_STEPS["user"]),
}
# The same search in half the trials (space "budgets-quick"): each part's learning rate at
# its middle step count ("<part> rate"), then its step counts at the rate chosen ("<part>
# steps", the middle one already evaluated): 4 + 2 evaluations instead of 12, the same for
# every part (and the stack's and OPPU's no-training trial, below, in their steps groups).
# It finds the grid's best where rate and steps act apart (the MovieLens 1.5B stack grid,
# docs/results.md: 3e-4 x 32 both ways); a grid's corner it can miss.
# The two per-user parts that sit on a trained shared part (MTA's stack on the fused anchors,
# OPPU's user part on the task LoRA) also get a "no training" trial, 0 steps (the shared part
# alone; its learning rate plays no part): where no budget helps on the dev persons, the tune
# can leave the part out instead of choosing the least harmful one (MovieLens at 1.5B,
# docs/results.md: every tuned user part made its method worse on the test persons). It is
# the group's first trial, so a tie, and `--select least`, keep the part out.
NO_TRAINING = ("stack budget", "oppu budget")
QUICK_BUDGETS: dict[str, str] = {}  # group -> the budget it searches
for _group, (_section, _lr, _steps, _method, _counts) in BUDGETS.items():
    _none = [{_section: {_steps: 0}}] if _group in NO_TRAINING else []
    GROUPS[_group] = _none + [{_section: {_lr: lr, _steps: n}} for lr in BUDGET_LRS for n in _counts]
    GROUPS[f"{_group} rate"] = [{_section: {_lr: lr, _steps: _counts[len(_counts) // 2]}} for lr in BUDGET_LRS]
    GROUPS[f"{_group} steps"] = _none + [{_section: {_steps: n}} for n in _counts]
    QUICK_BUDGETS.update({f"{_group} rate": _group, f"{_group} steps": _group})
SCORED_BY = {g: BUDGETS[QUICK_BUDGETS.get(g, g)][3] for g in [*BUDGETS, *QUICK_BUDGETS]}  # other groups: "mta"
# "core": the two knobs with evidence so far, the learning rate (0.5B's dev tune,
# docs/defaults.md) and anchor training (the CPU ablation, docs/results.md), for models
# where one trial costs minutes; "quick" adds the stack's shape and top-k; "budgets": every
# trained method's learning rate and steps, the same trials each (a fair comparison);
# "budgets-quick" the same by rate then steps (half the trials, above)
SPACES = {"core": ["learning rate", "anchor training"],
          "quick": ["learning rate", "anchor training", "stack shape", "top-k"],
          "budgets": list(BUDGETS), "budgets-quick": list(QUICK_BUDGETS),
          "full": [g for g in GROUPS if g not in QUICK_BUDGETS]}


def space_groups(space: str) -> list[str]:
    """The knob groups a search space names: one of ``SPACES``, or groups of ``GROUPS`` and
    spaces of ``SPACES`` separated by commas, spaces in a group's name written as hyphens
    (``stack-shape,top-k``: only those, on top of the model's registered recipe;
    ``budgets-quick,stack-stop``: the quick budget search, then the stack's stopping rule),
    each group once, in the order first named."""
    by_flag = {g.replace(" ", "-"): [g] for g in GROUPS}  # "top-k" keeps its hyphen
    by_flag.update(SPACES)
    parts = [by_flag.get(g.strip().replace(" ", "-"), g.strip()) for g in space.split(",")]
    bad = [g for g in parts if isinstance(g, str)]
    if not space.strip() or bad:
        groups = ", ".join(g for g in by_flag if g not in SPACES)
        raise MtaError(f"unknown search space {space!r}: one of {', '.join(SPACES)}, or groups among "
                       f"{groups} and those spaces separated by commas")
    return list(dict.fromkeys(g for part in parts for g in part))


ABLATION = ["rag-1", "task-lora", "per-user-lora", "oppu", "mta-fusion", "mta-stack", "mta"]
# the goal MTA is held to (docs/results.md): at most a tenth of a per-user LoRA's bytes per user
MAX_USER_SHARE = 0.1


def stack_share(engine, bank: BankConfig, adapt: AdaptConfig) -> float:
    """A user's stacked adapter (what MTA stores per user) as a share of a per-user LoRA's
    parameters (rank ``bank.rank`` on every injected layer, the per-user-lora baseline):
    both are rank x (in + out) summed over their layers, so the share is exact."""
    def size(names) -> int:
        return sum(engine.layers[n].in_features + engine.layers[n].out_features for n in names)

    stack = adapt.stack_rank * size(engine.stack_selection(adapt.stack_targets, adapt.stack_layers))
    return stack / (bank.rank * size(engine.layers))


DEV_SPLITS = ("auto", "balanced", "random")


def own_agreement(users, task, history_queries: int = 0, target_history: int | None = None) -> dict[str, float]:
    """{person: how well its users' own histories predict themselves}: each history item a
    target keeps (``prepare_targets``: the items that become test queries are not read) answered
    by the user-prior of the user's other items (``methods.prior_answer``) and scored as the
    task scores answers, accuracy for labels and minus the absolute error for ratings, averaged
    over the person's items. History alone, no query's gold. A person with no item to score
    (every history a single item, or no labels) gets the median of the others.

    Why it matters: where a person's history predicts their answers, training on it pays;
    where it does not, a per-user part fits what does not carry over. LaMP-2's first 1.5B
    tune drew 8 dev persons far above the rest on the query-side analogue (`user-prior`
    0.552 against 0.219, docs/results.md), and its per-user budgets hurt on the others."""
    if task.kind not in PRIOR_KINDS:
        raise MtaError(f"a person's own-history agreement needs a rating or classification task; {task.name} is "
                       f"{task.kind}", ("tune --dev-split",))
    scores: dict[str, list[float]] = {p: [] for p in persons_of(users)}
    for u in prepare_targets(users, history_queries, target_history, task):
        for i, it in enumerate(u.history):
            said = prior_answer(task, u.history[:i] + u.history[i + 1:])
            label = task.item_label(it)
            if not said or not label:
                continue
            scores[u.person_id].append(-abs(float(said) - float(label)) if task.kind == "rating"
                                       else float(said == label))
    known = [float(np.mean(v)) for v in scores.values() if v]
    if not known:
        raise MtaError("no user has two labelled history items: the persons cannot be ranked by their own histories",
                       ("tune --dev-split",))
    middle = float(np.median(known))
    return {p: float(np.mean(v)) if v else middle for p, v in scores.items()}


def resolved_split(how: str, task) -> str:
    """``how`` with ``auto`` made ``balanced`` or ``random`` for ``task``; an unknown name is
    one line."""
    if how not in DEV_SPLITS:
        raise MtaError(f"--dev-split must be one of {', '.join(DEV_SPLITS)}, not {how!r}", ("tune --dev-split",))
    if how == "auto":
        return "balanced" if task is not None and task.kind in PRIOR_KINDS else "random"
    if how == "balanced" and task is None:
        raise MtaError("a balanced dev split needs the task (its users' histories are scored by the task's prior)",
                       ("tune --dev-split",))
    return how


def dev_split(users, fraction: float, seed: int, how: str = "random", task=None, history_queries: int = 0,
              target_history: int | None = None) -> list[str]:
    """The dev users: every user of a share of the PERSONS, at least 4 persons (two folds of
    two), so no dev person has a user among the reported ones. ``random``: a seeded draw.
    ``balanced``: the persons ranked by ``own_agreement`` (ties in the seeded order) and cut
    into as many runs of neighbours as there are dev persons, one drawn from each run (the
    same seed): the dev persons span the others' range of how well a history predicts its
    user, where a random draw of few persons can fall on one end. ``auto`` (`mta tune`'s
    default): ``balanced`` for a rating or classification task, ``random`` otherwise
    (``resolved_split``)."""
    how = resolved_split(how, task)
    persons = persons_of(users)
    n = max(4, round(fraction * len(persons)))
    if n >= len(persons):
        raise MtaError(f"{len(persons)} persons leave none to report after a dev split of {n}")
    order = list(persons)
    rng = random.Random(seed)
    rng.shuffle(order)
    if how == "random":
        chosen = set(order[:n])
    else:
        score = own_agreement(users, task, history_queries, target_history)
        ranked = sorted(order, key=lambda p: score[p])  # (a stable sort: ties keep the seeded order)
        cuts = [round(i * len(ranked) / n) for i in range(n + 1)]
        chosen = {ranked[rng.randrange(a, b)] for a, b in zip(cuts, cuts[1:])}
    return sorted(u.user_id for u in users if u.person_id in chosen)


def dev_check(users, dev_ids, task, history_queries: int = 0, target_history: int | None = None) -> dict | None:
    """The dev persons' mean own-history agreement (``own_agreement``) against the other
    persons': how alike the two sides are in what a per-user part can learn (None for a
    generation task). Kept in the recipe and printed by `mta tune`."""
    if task.kind not in PRIOR_KINDS:
        return None
    score = own_agreement(users, task, history_queries, target_history)
    dev = {u.person_id for u in users if u.user_id in set(dev_ids)}
    side = {name: [v for p, v in score.items() if (p in dev) == (name == "dev")] for name in ("dev", "others")}
    return {"statistic": "own-history agreement: " + ("minus the absolute error" if task.kind == "rating"
                                                       else "accuracy") + " of each kept history item answered "
            "by the user-prior of the user's other items, a person's mean",
            **{name: float(np.mean(v)) for name, v in side.items()}}


# fields added to the configs after trial logs were first kept: left out of a trial's key
# while at their default, so a log written before they existed still names its trials
KEY_ADDED = {"AdaptConfig": ("stack_stop",), "BankConfig": ("stop",)}


def _key(*cfgs) -> str:
    def fields(c) -> dict:
        added = KEY_ADDED.get(type(c).__name__, ())
        return {k: v for k, v in c.dump().items() if not (k in added and v == type(c).model_fields[k].default)}

    return hashlib.sha256(json.dumps([fields(c) for c in cfgs], sort_keys=True).encode()).hexdigest()[:12]


def tune(ds: Dataset, setup: EvalSetup, out: Path, dev_ids: list[str], space: str, folds: int = 2,
         history_queries: int = 0, n_boot: int = 200, progress: Callable[[str, int, int], None] | None = None,
         max_user_share: float = MAX_USER_SHARE, target_history: int | None = None, leak_check: bool = True,
         ablation: bool = True, select: str = "best", split_folds: bool = False) -> Recipe:
    """The search over ``space`` on the dev users, then (``ablation``) the dev table of every
    method on the recipe chosen; without it the recipe is returned as soon as the search ends
    (the table costs as much as an evaluation of every method on the dev persons).
    ``split_folds`` (the processes of ``--jobs N``): a trial's folds are shared out too
    (``TrialBoard.run``), so a group of fewer trials than processes leaves none idle.
    ``select``: in each group the best trial (``best``), or, in a budget's groups, the one
    that trains least among those not significantly worse than the best (``least``: fewest
    steps, then the lowest rate; ``_least``)."""
    if select not in SELECT:
        raise MtaError(f"--select must be one of {', '.join(SELECT)}, not {select!r}")
    task = setup.task
    metric = task.metric_names[0]
    lower_better = task.kind == "rating"
    dev = Dataset([u for u in ds.users if u.user_id in set(dev_ids)], ds.task, ds.layout, ds.path, ds.synthetic)
    fold_list = make_folds(dev.users, folds, setup.bank_cfg.seed)
    if leak_check:  # once: every trial evaluates these folds
        check_split(fold_list, task, history_queries, target_history)
    chosen: Override = {"bank": {}, "adapt": {}, "baselines": {}}
    trials: list[dict] = []
    # every finished trial's value (or failure), kept in OUT/trial-values.json as it
    # finishes: a tune run again into the same OUT skips them (a search longer than one
    # session, or one that was stopped, goes on where it was)
    # the data by content (``data_sha256``: its users' histories and queries), so the log
    # goes on with the same data at another path (another machine); ``data`` says where it was
    identity = {"model": setup.backbone.model_id, "task": task.name, "data": str(ds.path),
                "data_sha256": users_digest(ds.users), "dev_users": sorted(dev_ids), "folds": folds,
                "seed": setup.bank_cfg.seed, "history_queries": history_queries,
                "target_history": target_history, "max_new_tokens": setup.max_new_tokens,
                "prompts": {k: v for k, v in setup.gen_cfg.identity().items() if k not in ("batch_size", "decoder")}}
    board = TrialBoard(out, identity, metric)
    cache, about = board.read()
    # ``about``: what each logged trial was (its group, method and override), so the log
    # reads on its own: kept beside the values, filled in for every trial this search walks
    # past (a log written before it was kept gets it for the trials this run reaches)
    if cache:
        log.info("tune: %d trial(s) already evaluated in %s; they are not run again", len(cache), out / VALUES)

    def configs(over: Override) -> tuple[BankConfig, AdaptConfig, BaselineConfig]:
        bank = {**chosen["bank"], **over.get("bank", {})}
        adapt = {**chosen["adapt"], **over.get("adapt", {})}
        base = {**chosen["baselines"], **over.get("baselines", {})}
        return (setup.bank_cfg.model_copy(update=bank), AdaptConfig.build({**setup.adapt_cfg.dump(), **adapt}),
                BaselineConfig.build({**setup.baselines.dump(), **base}))

    def evaluate(methods: list[str], bc: BankConfig, ac: AdaptConfig, bl: BaselineConfig, name: str,
                 share_search: bool = True, only: int | None = None) -> dict:
        """``share_search``: read searched weights from OUT/searched (shared by the trials);
        the final table searches again (its methods share their one search within it), so
        it measures the search on this recipe itself. ``only``: that fold alone (its result
        kept where the whole trial's evaluation resumes it; the metrics returned are its)."""
        trial = out / "trials" / name
        # adapters shared between trials, keyed by the recipe they were trained with
        task_cfg = bl.bank_for("task", bc)
        # a residual bank also depends on the task LoRA it sits on
        shared = {"bank": (bc, task_cfg) if bc.bank_base == "task" else (bc,), "task-lora": (task_cfg,),
                  "per-user-lora": (private_config(bc, ac, bl),),
                  "bank-reference": (bc.model_copy(update={"bank_base": "none"}),)}

        def place(fold: int, what: str) -> Path:
            if what in shared:
                return out / "banks" / _key(*shared[what]) / f"fold{fold}" / what
            return trial / f"fold{fold}" / what

        # each trial's own stages (banks, users, prompts), under its name; the CLI's bars drop
        # the trial before's (``Bars.part``), a plain callback gets them named
        s = EvalSetup(setup.backbone, task, bc, ac, setup.gen_cfg, named_progress(progress, f"trial {name}"),
                      setup.max_new_tokens, baselines=bl,
                      search_cache=SearchCache(out / SEARCHED) if share_search else None)
        if only is None:
            return run_eval(dev, methods, s, trial, fold_list, n_boot, bc.seed, target_history=target_history,
                            place=place, history_queries=history_queries, leak_check=False)
        # (its split and predictions in the fold's folder: the trial's own are the whole trial's)
        return run_eval(dev, methods, s, trial / f"fold{only}", [f for f in fold_list if f.index == only], n_boot,
                        bc.seed, target_history=target_history, place=place, history_queries=history_queries,
                        leak_check=False)

    def trial_value(method: str, bc: BankConfig, ac: AdaptConfig, bl: BaselineConfig,
                    name: str) -> tuple[float, dict]:
        """The trial's metric on the dev persons, and what its description keeps of it: the
        95% person-bootstrap interval and each dev person's summed statistics (the rows a
        paired bootstrap between two trials resamples: ``_least``)."""
        res = evaluate([method], bc, ac, bl, name)  # raises when the method, the only one, diverged
        m = res["rows"][0]["metrics"][metric]
        kept = {"ci": m["ci"]}
        if method in res.get("person_stats", {}):
            kept["person_stats"] = res["person_stats"][method].tolist()
        return m["value"], kept

    order = space_groups(space)
    start_share = stack_share(setup.backbone.engine, setup.bank_cfg, setup.adapt_cfg)
    if start_share > max_user_share:  # every trial would be skipped: say so before any runs
        raise MtaError(f"tune: the stack the search starts from stores {start_share:.1%} of a per-user LoRA per "
                       f"user, over the budget of {max_user_share:.0%} (--max-user-share); start from a smaller "
                       "--stack-rank or --stack-layers")
    total = sum(len(GROUPS[g]) for g in order)
    done = 0
    for group in order:
        if _moot(group, configs({})[1]):
            log.info("tune %s: not searched: the trials before left the stack out (0 steps)", group)
            done += len(GROUPS[group])
            if progress:
                progress("tune trials", done, total)
            continue
        method = SCORED_BY.get(group, "mta")
        best_value, best_over, best_key = None, None, None
        keys: dict[str, dict] = {}  # the group's logged trials: key -> what it was (_describe)
        # the group's trials in order: (override, key or None when over the bytes budget,
        # configs or the reason it is skipped, the trial's name: its place in the search)
        entries: list[tuple[Override, str | None, object, str]] = []
        for over in GROUPS[group]:
            bc, ac, bl = configs(over)
            share = stack_share(setup.backbone.engine, bc, ac)
            name = f"{len(trials) + len(entries):02d}"
            if share > max_user_share:  # a recipe MTA may not ship: too many bytes per user
                entries.append((over, None, f"stores {share:.1%} of a per-user LoRA per user, over the budget of "
                                            f"{max_user_share:.0%}", name))
                continue
            key = method + _key(bc) + _key(ac) + _key(bl)
            keys[key] = {**_describe(group, method, over, {"bank": bc, "adapt": ac, "baselines": bl}),
                         **{k: v for k, v in about.get(key, {}).items() if k in MEASURED}}
            entries.append((over, key, (bc, ac, bl), name))
        todo = {key: (over, cfgs, name) for over, key, cfgs, name in entries if key is not None}

        def run_one(key: str, todo=todo, method=method, keys=keys, group=group) -> object:
            over, cfgs, name = todo[key]
            try:
                # the interval goes with the trial's description (a log written before
                # intervals were kept has none: its values stay as they were)
                value, kept = trial_value(method, *cfgs, name)
                keys[key].update(kept)
            except MtaError as e:
                # more anchors than exist, or a recipe that diverges on this model: the
                # trial is recorded as failed and the search goes on without it
                if "AdaptConfig.top_k" in e.fields:
                    return {"skipped": str(e)}
                if diverged(e):
                    log.warning("tune %s %s: failed: %s", group, over, e)
                    return {"failed": str(e)}
                raise
            log.info("tune %s %s (%s): %s %.4f", group, over, method, metric, value)
            return value

        def run_fold(key: str, fold: int, todo=todo, method=method, group=group) -> None:
            """One fold of a trial, its result kept for the trial's own evaluation (`run_one`),
            which resumes it; an error there is the trial's, met again and handled by it."""
            over, (bc, ac, bl), name = todo[key]
            try:
                evaluate([method], bc, ac, bl, name, only=fold)
            except MtaError as e:
                log.info("tune %s %s: fold %d: %s (the trial's own run meets it)", group, over, fold, e)

        def tell(values: dict, todo=todo, done=done) -> None:
            if progress:
                progress("tune trials", done + sum(k in values for k in todo), total)

        cache, about = board.run(list(todo), run_one, keys, tell,
                                 (run_fold, [f.index for f in fold_list]) if split_folds else None)
        for over, key, cfgs, _ in entries:
            if key is None:
                trials.append({"group": group, "override": over, "skipped": cfgs})
            elif not isinstance(cache[key], float):  # {"skipped": why} or {"failed": why}
                trials.append({"group": group, "override": over, **cache[key]})
            else:
                trials.append({"group": group, "method": method, "override": over, metric: cache[key],
                               **({"ci": about[key]["ci"]} if "ci" in about.get(key, {}) else {})})
                value = cache[key]
                if best_value is None or (value < best_value if lower_better else value > best_value):
                    best_value, best_over, best_key = value, over, key
            done += 1
            if progress:
                progress("tune trials", done, total)
        missing = {k: d for k, d in keys.items() if about.get(k) is None}
        if missing:  # cached trials of an older log: described now
            cache, about = board.record({}, missing)
        if best_over is None:
            why = next((t["skipped"] for t in reversed(trials) if t["group"] == group and "skipped" in t), None)
            raise MtaError(f"tune: every option of {group!r} failed or was skipped"
                           + (f" (the last: {why}; see --max-user-share)" if why else f" (see {out / 'trials'})")
                           + "; nothing to choose from")
        if select == "least" and QUICK_BUDGETS.get(group, group) in BUDGETS:
            best_over = _least(group, best_key, keys, about, task, n_boot, setup.bank_cfg.seed) or best_over
        for section in chosen:
            chosen[section].update(best_over.get(section, {}))
    bc, ac, bl = configs({})
    start = {name: _changed(cfg) for name, cfg in
             (("bank", setup.bank_cfg), ("adapt", setup.adapt_cfg), ("baselines", setup.baselines))}
    methods = ABLATION[:1] + list(PRIORS) * (task.kind in PRIOR_KINDS) + ABLATION[1:]
    return Recipe(model=setup.backbone.model_id, task=task.name, data=str(ds.path), metric=metric,
                  dev_users=dev_ids, dev_persons=persons_of(dev.users), bank=chosen["bank"], adapt=chosen["adapt"],
                  baselines=chosen["baselines"], start={k: v for k, v in start.items() if v}, trials=trials,
                  ablation=_final_ablation(evaluate, methods, bc, ac, bl) if ablation else [],
                  max_user_share=max_user_share, select=select)


class TrialBoard:
    """OUT's trial log, shared by the processes of one tune (``mta tune --jobs N``; one
    process is the case N = 1). A trial is evaluated by the one process holding its lock
    (OUT/locks/KEY.lock; the kernel lets a lock go when its process ends, however it ends,
    so a trial whose process died is taken up by another); every finished trial is merged
    into OUT/trial-values.json under the log's own lock, so no process's write loses
    another's."""

    def __init__(self, out: Path, identity: dict, metric: str):
        self.path, self.locks = Path(out) / VALUES, Path(out) / LOCKS
        self.identity, self.metric = identity, metric

    def _lock(self, name: str, timeout: float) -> FileLock:
        self.locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.locks / f"{name}.lock"), timeout=timeout)

    def read(self) -> tuple[dict, dict]:
        """The log's values and trial descriptions (both {} when there is no log)."""
        with self._lock("values", -1):
            return _read_values(self.path, self.identity), _read_about(self.path)

    def record(self, values: dict, about: dict) -> tuple[dict, dict]:
        """Merge ``values`` and ``about`` (key -> value, key -> description) into the log;
        returns the whole log as `read` would."""
        with self._lock("values", -1):
            have, described = _read_values(self.path, self.identity), _read_about(self.path)
            have.update(values)
            described.update(about)
            write_json_atomic(self.path, {"identity": self.identity, "metric": self.metric, "values": have,
                                          "trials": described})
            return have, described

    def run(self, keys: list[str], run_one: Callable[[str], object], about: dict[str, dict],
            tell: Callable[[dict], None] | None = None,
            folds: tuple[Callable[[str, int], None], list[int]] | None = None) -> tuple[dict, dict]:
        """Have every trial of ``keys`` logged, in order: run here (``run_one(key)`` -> its
        value; logged with ``about[key]``, read after the run) each one not logged that no
        other process holds; then wait for the ones others hold and take up any whose
        process ended without logging it (it failed or was stopped). ``tell(values)``
        after each trial. Returns the log as `read` does.

        ``folds`` = (``run_fold``, the fold indices): first every unlogged trial's folds, each
        run here (``run_fold(key, fold)``, which keeps its result) unless another process
        holds it, so processes share a trial's folds as they share trials; then each trial
        as above, its ``run_one`` after every fold's process has let it go (it resumes the
        folds kept, and runs any whose process ended first). A fold run to its end is marked
        (``OUT/locks/KEY-foldF.done``) and not taken again."""
        values, described = self.read()
        run_fold, indices = folds or (None, [])
        for key in keys if run_fold else []:
            for fold in indices:
                if key in values:
                    break
                done = self.locks / f"{key}-fold{fold}.done"
                with self.claim(f"{key}-fold{fold}", False) as mine:
                    if mine and not done.exists():
                        run_fold(key, fold)
                        done.touch()
                values, described = self.read()
        for wait in (False, True):
            for key in keys:
                if key in values:
                    continue
                with self.claim(key, wait) as mine:
                    if not mine:
                        continue
                    values, described = self.read()  # another process may have logged it meanwhile
                    if key not in values:
                        for fold in indices:  # a fold another process runs: its end first
                            with self.claim(f"{key}-fold{fold}", True):
                                pass
                        value = run_one(key)
                        values, described = self.record({key: value}, {key: about[key]})
                if tell:
                    tell(values)
        return values, described

    @contextlib.contextmanager
    def claim(self, key: str, wait: bool) -> Iterator[bool]:
        """Hold trial ``key``'s lock while the block runs (True); held by another process:
        False at once, or (``wait``) True once that process lets it go."""
        lock = self._lock(key, -1 if wait else 0)
        try:
            lock.acquire()
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()


# what a stack is, not whether there is one (the fields that only shape it, less its steps
# and epochs, plus its stopping): meaningless once a tune has left the stack out
STACK_FIELDS = (STACK_ONLY - {"stack_epochs", "stack_steps"}) | {"stack_stop"}


def _moot(group: str, adapt: AdaptConfig) -> bool:
    """Whether ``group`` has nothing to search: it sets only what the stack is (its stopping,
    shape or rate) and the recipe so far trains no stack (a budget's "no training" trial won)."""
    return not adapt.stacks and all(set(o) == {"adapt"} and set(o["adapt"]) <= STACK_FIELDS for o in GROUPS[group])


def _least(group: str, best: str, keys: dict[str, dict], about: dict, task, n_boot: int,
           seed: int) -> Override | None:
    """Among ``group``'s trials (``keys``: key -> description), the one that trains least
    (fewest steps, then the lowest learning rate) whose dev score is not significantly
    worse than the best trial's (the paired 95% person-bootstrap interval of their
    difference holds 0); None when the best trial's person statistics were not kept (a
    log written before they were: the best is kept). A trial without them is not a
    candidate."""
    ref = about.get(best, {}).get("person_stats")
    if ref is None:
        return None
    metric = task.metric_names[0]

    def score(s):
        return task.metrics_from_stats(s)[metric]

    fits = []
    for key, d in keys.items():
        mine = about.get(key, {}).get("person_stats")
        if mine is None or "budget" not in d or len(mine) != len(ref):
            continue
        if key != best:
            _, lo, hi = paired_diff_ci(np.asarray(mine), np.asarray(ref), score, n_boot=n_boot, seed=seed)
            if not lo <= 0 <= hi:
                continue
        fits.append((d["budget"]["steps"] or 0, d["budget"]["lr"] or 0.0, key))
    chosen = min(fits)[2]
    if chosen != best:
        log.info("tune %s: %s trains least among the trials not significantly worse than the best", group,
                 about[chosen]["override"])
    return about[chosen]["override"]


def _describe(group: str, method: str, over: Override, cfgs: dict) -> dict:
    """What a logged trial was: its group, the method that scored it, its override and, for
    a budget's trial, the learning rate and steps it ran with (a quick search's steps trial
    names its steps alone; the rate is the one chosen before it)."""
    d = {"group": group, "method": method, "override": over}
    budget = QUICK_BUDGETS.get(group, group)
    if budget in BUDGETS:
        section, lr_field, steps_field, *_ = BUDGETS[budget]
        d["budget"] = {"part": budget, "lr": getattr(cfgs[section], lr_field),
                       "steps": getattr(cfgs[section], steps_field)}
    return d


def _read_about(path: Path) -> dict:
    """The descriptions of the trials logged in ``path`` ({} when none; ``_read_values`` has
    checked the file)."""
    if not path.exists():
        return {}
    about = json.loads(path.read_text(encoding="utf-8")).get("trials", {})
    return about if isinstance(about, dict) else {}


def _read_values(path: Path, identity: dict) -> dict:
    """The trial values an earlier run of this tune left in ``path`` ({} when none); a file
    from a tune of other data, dev users, protocol or model is refused (one line)."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        values, theirs = raw["values"], raw["identity"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise MtaError(f"{path}: not a readable trial log ({e}); remove it to tune from the start") from None
    if not isinstance(theirs, dict):
        raise MtaError(f"{path}: not a readable trial log (no identity); remove it to tune from the start")
    # a log that names its data by content matches it wherever it lies; an older one (no
    # ``data_sha256``) by its path, as it was written
    skip = {"data"} if "data_sha256" in theirs else {"data_sha256"}
    differ = [k for k in identity if k not in skip and theirs.get(k) != identity[k]]
    if differ:
        where = (f"; it was written before data were named by content: give the data at {theirs.get('data')}"
                 if differ == ["data"] else "")
        raise MtaError(f"{path} holds the trials of another tune (different {', '.join(differ)}){where}; "
                       "use another --out")
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}


def _changed(cfg) -> dict:
    """The fields of a config that differ from their defaults."""
    default = type(cfg)().dump()
    return {k: v for k, v in cfg.dump().items() if v != default.get(k)}


def _final_ablation(evaluate, methods: list[str], bc: BankConfig, ac: AdaptConfig, bl: BaselineConfig) -> list[dict]:
    """The dev table of every method on the chosen recipe. A method that diverges under it
    (a learning rate too high for that method on this model) is a row ``{"method",
    "error"}`` beside the others (the evaluation goes on without it); if every method
    diverged, one ``{"error"}`` row. The search is kept either way."""
    try:
        res = evaluate(methods, bc, ac, bl, "final", share_search=False)
    except MtaError as e:
        if not diverged(e):
            raise
        log.warning("tune: the final ablation failed (%s); the recipe is written without it", e)
        return [{"error": str(e)}]
    return res["rows"] + [{"method": m, "error": e} for m, e in res["failed"].items()]
