"""Recipes: settings chosen by `mta tune`, as data.

A recipe file (``Recipe``, ``OUT/recipe.json`` of a tune) holds what the search chose on
dev persons and the settings it started from; ``--recipe FILE`` layers it
(``recipe_layers``). A registered recipe is a data file beside this module,
``<model>/<task>.json`` (``TunedRecipe``): what `mta tune` chose for that model on that
task's dev persons (docs/defaults.md gives the command, the data and the dev persons
behind each), with a ``source`` line saying where it came from. ``mta.defaults`` says
where each sits in the precedence of settings. A model or task without a file runs on
the config classes' defaults, which were chosen with SmolLM2-135M on synthetic
development data. Nothing else holds tuned values.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mta.errors import MtaError

ROOT = Path(__file__).resolve().parent
RECIPE_SCHEMA = 1  # of a recipe file written by `mta tune`


class TunedRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    task: str
    source: str = Field(min_length=1)
    bank: dict = Field(default_factory=dict)
    adapt: dict = Field(default_factory=dict)
    baselines: dict = Field(default_factory=dict)


@cache
def _read(path: Path) -> TunedRecipe:
    try:
        rec = TunedRecipe.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as e:
        raise MtaError(f"{path}: not a tuned recipe ({str(e).splitlines()[0]})") from None
    if (rec.model, rec.task) != (path.parent.name, path.stem):
        raise MtaError(f"{path}: holds the recipe of {rec.model}/{rec.task}, not {path.parent.name}/{path.stem}")
    return rec


def registered() -> list[TunedRecipe]:
    """Every tuned recipe shipped with the library."""
    return [_read(p) for p in sorted(ROOT.glob("*/*.json"))]


def model_recipe(model_id: str, task: str | None) -> dict[str, dict]:
    """{"bank": ..., "adapt": ..., "baselines": ...} tuned for ``model_id`` on ``task``;
    empty when there is none (or the task is not known yet)."""
    if not task:
        return {}
    path = ROOT / model_id / f"{task}.json"
    if not path.is_file():
        return {}
    rec = _read(path)
    return {k: v for k, v in (("bank", rec.bank), ("adapt", rec.adapt), ("baselines", rec.baselines)) if v}


class Recipe(BaseModel):
    """What `mta tune` chose, for which model and task, on which dev users."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RECIPE_SCHEMA
    model: str
    task: str
    data: str
    metric: str
    dev_users: list[str]  # every user of the dev persons
    dev_persons: list[str] = Field(default_factory=list)
    bank: dict = Field(default_factory=dict)    # BankConfig fields the search changed
    adapt: dict = Field(default_factory=dict)   # AdaptConfig fields the search changed
    baselines: dict = Field(default_factory=dict)  # BaselineConfig fields the search changed
    # the settings the search started from where they differ from the config defaults (the
    # tune's flags, e.g. --bank-base task, and the model's registered recipe), by section:
    # `--recipe` layers these under the chosen ones, so an evaluation reproduces the tune
    start: dict[str, dict] = Field(default_factory=dict)
    trials: list[dict] = Field(default_factory=list)
    # rows of the final table, {"method", "error"} for a method that diverged, or one {"error"}
    ablation: list[dict] = Field(default_factory=list)
    max_user_share: float | None = None  # the bytes budget the search kept to (None: recipes before it)
    select: str = "best"  # how each group's option was chosen (mta tune --select; recipes before it: best)
    dev_split: str = "random"  # how the dev persons were drawn (mta tune --dev-split; recipes before it: random)
    # the dev persons' own-history agreement against the others' (mta.evaluation.tune.dev_check;
    # None for a generation task and for recipes before it)
    dev_check: dict | None = None


def read_recipe(path: Path) -> Recipe:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MtaError(f"{path}: not a readable recipe ({e})") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != RECIPE_SCHEMA:
        raise MtaError(f"{path}: not a recipe of schema version {RECIPE_SCHEMA}; write one with mta tune")
    try:
        return Recipe.model_validate(raw)
    except Exception as e:  # noqa: BLE001 - pydantic's message, one line
        raise MtaError(f"{path}: corrupt recipe ({str(e).splitlines()[0]})") from None


def recipe_layers(r: Recipe) -> dict[str, dict]:
    """A recipe's settings by section, as ``--recipe`` layers them: the chosen ones over
    the settings the search started from."""
    return {s: {**r.start.get(s, {}), **getattr(r, s)} for s in ("bank", "adapt", "baselines")}
