"""Tuned defaults per registered model: what `mta tune` chose for it on development users
(docs/defaults.md gives the command, the data and the dev users behind each entry).

They apply when the model is used and a setting is neither given as a flag, nor set by
a ``--recipe`` file, nor recorded by the bank (in that order of precedence). A model
without an entry runs on the config classes' defaults, which were chosen with
SmolLM2-135M on synthetic development data.
"""

from __future__ import annotations

MODEL_RECIPES: dict[str, dict[str, dict]] = {
    # LaMP-2 dev users on the H200, 2026-12-01: the learning-rate group of `mta tune --space
    # quick` (docs/defaults.md, "Tuned defaults per model"); its stack-shape and top-k choices
    # were over the bytes budget the goal sets (a tenth of a per-user LoRA), so not taken
    "qwen2.5-coder-0.5b": {"bank": {"lr": 1e-4, "epochs": 3}, "adapt": {"stack_lr": 1e-4}},
    # the same dev users, 2026-12-01 (second session): `mta tune --space core` (learning rate,
    # anchor training); every other setting keeps the config default
    "qwen2.5-coder-1.5b": {"bank": {"lr": 3e-4, "epochs": 2}, "adapt": {"stack_lr": 3e-4}},
}


def model_recipe(model_id: str) -> dict[str, dict]:
    return MODEL_RECIPES.get(model_id, {})
