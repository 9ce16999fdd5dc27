"""Tuned recipes are data files per (model, task) that the library reads."""

from __future__ import annotations

import json

import pytest

import mta.recipes as recipes
from mta.config import AdaptConfig, BankConfig, BaselineConfig, GenerateConfig
from mta.errors import MtaError
from tests.conftest import ROOT


def test_every_shipped_recipe_is_valid_and_builds_configs():
    shipped = recipes.registered()
    assert {(r.model, r.task) for r in shipped} >= {("qwen2.5-coder-0.5b", "lamp2"), ("qwen2.5-coder-1.5b", "lamp2")}
    for r in shipped:
        BankConfig.build(r.bank), AdaptConfig.build(r.adapt), BaselineConfig.build(r.baselines)


def test_a_recipe_is_per_model_and_task():
    assert recipes.model_recipe("qwen2.5-coder-0.5b", "lamp2") == {
        "bank": {"lr": 1e-4, "epochs": 3, "bank_base": "task"},
        "adapt": {"stack_lr": 1e-4, "fusion_weights": "searched", "stack_steps": 16},
        "baselines": {"user_steps": 16, "oppu_steps": 16}}
    assert recipes.model_recipe("qwen2.5-coder-0.5b", "movielens") == {}  # tuned on LaMP-2 only
    assert recipes.model_recipe("qwen2.5-coder-0.5b", None) == {}
    assert recipes.model_recipe("smollm2-135m", "lamp2") == {}


def test_a_misplaced_or_broken_recipe_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "lamp2.json").write_text(json.dumps({"model": "other", "task": "lamp2", "source": "x"}))
    (tmp_path / "m" / "lastfm.json").write_text("{not json")
    monkeypatch.setattr(recipes, "ROOT", tmp_path)
    recipes._read.cache_clear()
    with pytest.raises(MtaError, match="holds the recipe of other/lamp2, not m/lamp2"):
        recipes.model_recipe("m", "lamp2")
    with pytest.raises(MtaError, match="not a tuned recipe"):
        recipes.model_recipe("m", "lastfm")
    recipes._read.cache_clear()


def test_config_identity_ignores_fields_added_later_at_their_defaults():
    """Bank ids and user hashes are taken from ``identity``: a bank built before ``steps``,
    ``bank_base`` and ``stop`` existed keeps its id; setting any changes it."""
    base = BankConfig()
    assert not {"steps", "bank_base", "stop"} & set(base.identity())
    assert base.identity() == {k: v for k, v in base.dump().items() if k not in ("steps", "bank_base", "stop")}
    assert BankConfig(steps=4).identity()["steps"] == 4
    assert BankConfig(bank_base="task").identity()["bank_base"] == "task"
    assert BankConfig(stop="held-out").identity()["stop"] == "held-out"
    a = AdaptConfig()
    assert not {"stack_steps", "fusion_weights", "search_evals", "stack_stop"} & set(a.identity())
    assert AdaptConfig(fusion_weights="searched").identity()["fusion_weights"] == "searched"
    assert AdaptConfig(stack_stop="held-out").identity()["stack_stop"] == "held-out"
    # results and trial logs written before the rating rule existed still resume (the MovieLens
    # tune's log: its answering settings as recorded then)
    g = GenerateConfig()
    logged = json.loads((ROOT / "results/gpu-2026-12-05e/ml-tune/trial-values.json").read_text())["identity"]
    assert {k: v for k, v in g.identity().items() if k not in ("batch_size", "decoder")} == logged["prompts"]
    assert GenerateConfig(rating_answer="median").identity()["rating_answer"] == "median"


@pytest.mark.integration
def test_reading_a_config_does_not_load_torch():
    """`mta.config` (and the recipes) validate settings without the engine: importing them
    must not import torch (start-up time of every command that only reads settings)."""
    import subprocess
    import sys

    code = "import sys, mta.config, mta.recipes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_preset_typed_beats_the_models_recipe_and_flags_beat_the_preset():
    """`--preset reference` on a model whose registered recipe sets the stack's learning
    rate, steps and searched weights: the preset's settings hold (its stack lr 5e-5, one
    epoch, similarity weights with the factor merge), since typing a preset types its
    settings; a flag typed beside it still wins."""
    import inspect

    from mta.cli.common import with_recipes
    from mta.cli.options import configured

    @configured(AdaptConfig)
    def cmd(*, cfg):
        return cfg

    def resolve(**typed):
        cfg = cmd(**{**{name: None for name in inspect.signature(cmd).parameters}, **typed})
        return with_recipes(cfg, None, "qwen2.5-coder-0.5b", task="lamp2")[0].adapt

    plain = resolve()
    assert (plain.stack_lr, plain.stack_steps, plain.fusion_weights) == (1e-4, 16, "searched")  # the recipe
    ref = resolve(preset="reference")
    assert (ref.stack_lr, ref.stack_steps, ref.stack_epochs, ref.merge, ref.fusion_weights, ref.stack_rank) == \
        (5e-5, None, 1, "factor", "similarity", 4)
    assert resolve(preset="reference", stack_lr=1e-3).stack_lr == 1e-3
