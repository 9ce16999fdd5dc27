"""Tuned defaults per (registered model, task): data files, one per pair, beside this
module: ``<model>/<task>.json``, each what `mta tune` chose for that model on that task's
dev persons (docs/defaults.md gives the command, the data and the dev persons behind
each). A file holds ``bank``, ``adapt`` and ``baselines`` settings (config field names)
and a ``source`` line saying where they came from.

They apply when that model runs that task and a setting is neither given as a flag, nor
set by a ``--recipe`` file, nor recorded by the bank (in that order of precedence). A
model or task without a file runs on the config classes' defaults, which were chosen with
SmolLM2-135M on synthetic development data. The library reads them through
``model_recipe``; nothing else holds tuned values.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mta.errors import MtaError

ROOT = Path(__file__).resolve().parent


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
