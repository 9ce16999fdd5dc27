"""One precedence of settings, in the library (mta.defaults), used alike by the CLI and
by `LoadedBank.adapt` / `build_bank` called from Python."""

from __future__ import annotations

import json

import pytest

import mta.recipes as recipes
from mta import defaults
from mta.config import AdaptConfig, BankConfig
from mta.errors import MtaError
from mta.recipes import Recipe


def _recipe(**sections) -> Recipe:
    return Recipe(model="m", task="synth", data="d", metric="accuracy", dev_users=[], **sections)


def test_each_layer_wins_over_the_ones_below_it():
    under = [defaults.Layer("recipe file", {"adapt": {"stack_lr": 1e-3, "top_k": 3}}),
             defaults.Layer("bank", {"adapt": {"stack_lr": 2e-3, "top_k": 4, "stack_rank": 5}}),
             defaults.Layer("model", {"adapt": {"stack_lr": 3e-3, "top_k": 1, "stack_rank": 6, "stack_layers": 2}})]
    got = defaults.resolve(AdaptConfig(stack_lr=9e-4), under)
    assert (got.stack_lr, got.top_k, got.stack_rank, got.stack_layers, got.merge) == (9e-4, 3, 5, 2, "delta")
    assert defaults.is_resolved(got) and not defaults.is_resolved(AdaptConfig(stack_lr=9e-4))
    assert defaults.resolve(got, [defaults.Layer("x", {"adapt": {"top_k": 7}})]) == got  # resolved stays
    src = defaults.sources(AdaptConfig(stack_lr=9e-4), under)
    assert (src["stack_lr"], src["top_k"], src["stack_rank"], src["stack_layers"], src["merge"]) == \
        ("set by the caller", "recipe file", "bank", "model", "field default")
    with pytest.raises(MtaError, match="bank: adapt has no setting 'nope'"):
        defaults.resolve(AdaptConfig(), [defaults.Layer("bank", {"adapt": {"nope": 1}})])


def test_a_recipe_file_layers_its_start_under_its_choice():
    r = _recipe(adapt={"stack_lr": 1e-3}, start={"adapt": {"stack_lr": 5e-3, "stack_steps": 16},
                                                 "bank": {"bank_base": "task"}})
    (layer,) = defaults.layers(None, None, recipe=r)
    a = defaults.resolve(AdaptConfig(), [layer])
    b = defaults.resolve(BankConfig(), [layer])
    assert (a.stack_lr, a.stack_steps, b.bank_base) == (1e-3, 16, "task")


def test_the_library_resolves_the_registered_recipe_and_a_preset_as_the_cli_does():
    """The library half of the preset case: with Qwen2.5-Coder-0.5B's registered LaMP-2
    recipe, nothing set gives the recipe's stack lr 1e-4; the reference preset set gives
    its 5e-5 (and its other settings); a field set beside the preset wins."""
    under = defaults.layers("qwen2.5-coder-0.5b", "lamp2")
    plain = defaults.resolve(AdaptConfig(), under)
    assert (plain.stack_lr, plain.stack_steps, plain.fusion_weights) == (1e-4, 16, "searched")
    ref = defaults.resolve(AdaptConfig(preset="reference"), under)
    assert (ref.stack_lr, ref.stack_steps, ref.merge, ref.fusion_weights) == (5e-5, None, "factor", "similarity")
    assert defaults.resolve(AdaptConfig(preset="reference", stack_lr=1e-3), under).stack_lr == 1e-3
    assert defaults.resolve(BankConfig(), under).bank_base == "task"
    assert defaults.resolve(BankConfig(), defaults.layers("qwen2.5-coder-0.5b", "movielens")) == BankConfig()


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    """A registered recipe for the tiny model on the synthetic task (a temporary recipes root)."""
    root = tmp_path / "recipes"
    (root / "tiny-random-llama").mkdir(parents=True)
    (root / "tiny-random-llama" / "synth.json").write_text(json.dumps({
        "model": "tiny-random-llama", "task": "synth", "source": "test",
        "bank": {"anchors": 2, "min_history": 1},
        "adapt": {"stack_lr": 7e-4, "stack_rank": 1, "top_k": 1, "stack_layers": 1}}))
    monkeypatch.setattr(recipes, "ROOT", root)
    recipes._read.cache_clear()
    yield
    recipes._read.cache_clear()


def test_mta_adapt_and_loaded_bank_adapt_resolve_every_field_alike(tmp_path, tiny_recipe):
    """The same bank (which records a recipe of its own) and the model's registered
    recipe: `mta adapt` with nothing typed and `LoadedBank.adapt(users, AdaptConfig())`
    store users with the same settings, field for field."""
    from mta.bank import build_bank
    from mta.cli.main import main
    from mta.data.readers import load_dataset
    from mta.loaded_bank import LoadedBank
    from mta.store import UserStore
    from mta.tasks import get_task
    from tests.engine_helpers import tiny_backbone

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--queries", "1"]) == 0
    users = load_dataset(data).users
    backbone = tiny_backbone()
    rec = build_bank(backbone, users[:4], get_task("synth"), BankConfig(epochs=1, batch_size=4, max_length=160),
                     tmp_path / "bank", recipe={"stack_rank": 2, "max_length": 160})
    assert (rec.config.anchors, rec.config.min_history) == (2, 1)  # the registered recipe's bank settings
    targets = users[4:]
    cli_store = tmp_path / "cli"
    assert main(["adapt", "--bank", str(tmp_path / "bank"), "--data", str(data), "--out", str(cli_store),
                 "--users", ",".join(u.user_id for u in targets), "--dtype", "fp32", "--device", "cpu"]) == 0
    lib_store = UserStore(tmp_path / "lib", create=True)
    loaded = LoadedBank(backbone, tmp_path / "bank")
    loaded.adapt(targets, AdaptConfig(), lib_store)
    cli_cfg = json.loads((cli_store / "config.json").read_text())["configs"]["adapt"]
    lib_cfg = loaded.settings(AdaptConfig()).dump()
    assert cli_cfg == lib_cfg
    # the bank's record beats the model's recipe (rank 2 over 1); the model's recipe beats the default
    assert (lib_cfg["stack_rank"], lib_cfg["stack_lr"], lib_cfg["top_k"], lib_cfg["max_length"]) == (2, 7e-4, 1, 160)
    cli, lib = UserStore(cli_store), lib_store
    for u in targets:
        assert cli.meta(u.user_id).history_hash == lib.meta(u.user_id).history_hash  # same settings hashed
        assert cli.meta(u.user_id).stack.rank == 2
