"""Where each setting comes from: one precedence, owned by the library.

A config (``BankConfig``, ``AdaptConfig``, ``BaselineConfig``) remembers which fields its
caller set (pydantic's ``model_fields_set``); every other field is resolved from the first
of these layers that has it, highest first:

1. what the caller set: a flag typed on the command line, a field passed to a config
   class (a preset typed or passed counts as its settings set: ``--preset reference``
   gives lr 5e-5 whatever a recipe says, and a flag beside it still wins);
2. a recipe file written by `mta tune` (``--recipe FILE``, ``mta.recipes.recipe_layers``);
3. the recipe a bank recorded when it was built (adaptation settings);
4. the model's registered recipe for the task (``mta/recipes/<model>/<task>.json``);
5. the field's default (the ``default`` preset's).

``mta adapt`` and ``LoadedBank.adapt`` resolve through ``resolve`` alike; a resolved
config has every field set, so resolving it again changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mta.config import AdaptConfig, BankConfig, BaselineConfig
from mta.errors import MtaError
from mta.recipes import Recipe, model_recipe, read_recipe, recipe_layers

SECTIONS: dict[str, type] = {"bank": BankConfig, "adapt": AdaptConfig, "baselines": BaselineConfig}
PRECEDENCE = ("set by the caller", "recipe file", "the bank's recorded recipe", "the model's registered recipe",
              "field default")
C = TypeVar("C")


@dataclass(frozen=True)
class Layer:
    """One source of settings below what the caller set, by section (``{"adapt": {...}}``)."""

    source: str
    values: dict[str, dict] = field(default_factory=dict)


def layers(model_id: str | None, task: str | None, *, recipe: Recipe | Path | None = None,
           bank_recipe: dict | None = None, recipe_source: str | None = None) -> list[Layer]:
    """The layers under what the caller set, highest first (``PRECEDENCE`` 2-4).
    ``recipe_source``: how errors name a recipe given as an object (its file, say)."""
    out = []
    if recipe is not None:
        r = recipe if isinstance(recipe, Recipe) else read_recipe(recipe)
        source = recipe_source or (str(recipe) if isinstance(recipe, Path) else f"the recipe tuned for {r.model}")
        out.append(Layer(f"recipe {source}", recipe_layers(r)))
    if bank_recipe:
        out.append(Layer("the bank's recorded recipe", {"adapt": dict(bank_recipe)}))
    if model_id:
        tuned = model_recipe(model_id, task)
        if tuned:
            out.append(Layer(f"the registered recipe of {model_id} for {task}", tuned))
    return out


def section_of(cfg) -> str:
    for name, cls in SECTIONS.items():
        if isinstance(cfg, cls):
            return name
    raise TypeError(f"not a config with layered defaults: {type(cfg).__name__}")


def is_resolved(cfg) -> bool:
    """Every field set (by the caller or by ``resolve``)."""
    return set(type(cfg).model_fields) <= cfg.model_fields_set


def pinned(cfg: C) -> C:
    """``cfg`` with every field counted as set: no layer changes it."""
    return type(cfg).build(cfg.dump())


def resolve(cfg: C, under: Sequence[Layer]) -> C:
    """``cfg`` with each field its caller did not set taken from the first layer of
    ``under`` (highest first) that has it, else its default; the result is ``pinned``.
    A layer naming a setting the config does not have is refused in one line."""
    section = section_of(cfg)
    cls = type(cfg)
    values: dict = {}
    for layer in reversed(under):  # lowest first: a higher layer overwrites
        for name, value in (layer.values.get(section) or {}).items():
            if name not in cls.model_fields:
                raise MtaError(f"{layer.source}: {section} has no setting {name!r}")
            values[name] = value
    values.update({name: getattr(cfg, name) for name in cfg.model_fields_set})
    explicit = cls.build(values)  # the preset a layer names applies under the values set over it
    return pinned(explicit)


def sources(cfg, under: Sequence[Layer]) -> dict[str, str]:
    """Which layer (``PRECEDENCE``'s words, or a layer's source) each field of an
    unresolved ``cfg`` comes from: what ``resolve`` would do, for `--explain`-style
    messages and tests."""
    section = section_of(cfg)
    out = {}
    for name in type(cfg).model_fields:
        if name in cfg.model_fields_set:
            out[name] = PRECEDENCE[0]
            continue
        out[name] = next((la.source for la in under if name in (la.values.get(section) or {})), PRECEDENCE[-1])
    return out
