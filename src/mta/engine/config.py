"""The engine's plain settings, without torch: the modules an adapter targets by default
and one training recipe (``TrainConfig``). ``mta.config`` builds on them, so reading or
validating a config never loads torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# the linear layers of a Llama-style block (attention and MLP): "all linear layers"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe plus the resources it may use.

    ``max_rows`` / ``token_budget`` bound one micro-batch (rows, padded tokens); None is
    no bound, except ``token_budget`` on CUDA, where None means "measure": the first
    micro-batch's peak memory per token sizes the rest to the free memory, and an
    out-of-memory step is retried with half the budget. They change nothing but float
    rounding. ``memory_cap`` (bytes, `--gpu-memory`) caps what the measured budget plans
    into for this process (jobs sharing a GPU: otherwise the first takes most of it and
    the next runs out of memory). ``lr_field`` names the config field
    behind ``lr`` in error messages. ``compile``: the model's decoder layers run through
    ``torch.compile`` while training (True: inductor; a string: a dynamo backend's name;
    see ``compiled_layers``).
    """

    lr: float = 1e-4
    epochs: int = 1
    steps: int | None = None  # optimiser steps per job; set, it replaces ``epochs`` (``plan_steps``)
    batch_size: int = 8
    warmup_ratio: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    max_rows: int | None = 16
    token_budget: int | None = None
    memory_cap: int | None = None
    gradient_checkpointing: bool = False
    lr_field: str = "lr"
    compile: bool | str = False

    def __post_init__(self) -> None:
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1 or None, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"max_rows must be >= 1, got {self.max_rows}")
        if self.token_budget is not None and self.token_budget < 1:
            problems.append(f"token_budget must be >= 1, got {self.token_budget}")
        if self.memory_cap is not None and self.memory_cap < 1:
            problems.append(f"memory_cap must be a positive number of bytes or None, got {self.memory_cap}")
        if not (isinstance(self.compile, bool) or isinstance(self.compile, str) and self.compile):
            problems.append(f"compile must be True, False or a dynamo backend's name, got {self.compile!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if problems:
            raise ValueError("; ".join(problems))
