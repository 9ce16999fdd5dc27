"""Typed, frozen, self-checking configs for each stage. A bad config raises ONE
``MtaError`` that lists every problem, naming the field and the value."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mta.engine.engine import LLAMA_TARGETS
from mta.errors import MtaError


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def make(cls, **kwargs):
        """Construct from options where None means "the default"; validation errors
        become one readable MtaError."""
        return cls.build({k: v for k, v in kwargs.items() if v is not None})

    @classmethod
    def build(cls, values: dict):
        """Construct from ``values`` as given (None is a value here)."""
        try:
            return cls(**values)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                field = ".".join(str(p) for p in err["loc"])
                problems.append(f"`{field}` {err['msg'].lower()} (got {err.get('input')!r})")
            raise MtaError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None


class BankConfig(_Config):
    """Stage 1: anchors and their meta-LoRAs.

    Rank 8 on all linear layers as in the reference; one epoch at lr 3e-3 instead of the
    reference's 3 epochs at 1e-4 (chosen on development data: docs/defaults.md).
    """

    anchors: int = Field(50, ge=1, description="k-means clusters = anchors requested")
    min_history: int = Field(11, ge=1, description="history items an anchor needs (reference: > 10)")
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    epochs: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    retrieve_k: int = Field(1, ge=0, description="BM25 items of the anchor's other history in the prompt")
    max_length: int = Field(512, ge=32)
    max_items: int | None = Field(None, ge=1, description="an anchor trains on its latest N history items "
                                  "(bounds the cost of very active anchors); None = all")
    group_size: int = Field(8, ge=1, description="anchors trained per pass; a resume restarts a group")
    max_rows: int = Field(16, ge=1)
    seed: int = 0


class AdaptConfig(_Config):
    """Stages 2 and 3: fusion of the anchors and the stacked per-user adapter.

    Defaults (docs/defaults.md says on which development data and why): exact ``delta``
    merge of the top-2 anchors, a rank-2 stack in the last 8 blocks, lr 3e-3, one epoch.
    """

    top_k: int = Field(2, ge=1)
    weighting: Literal["linear", "softmax"] = "linear"
    temperature: float = Field(0.1, gt=0)
    merge: Literal["delta", "factor", "svd"] = "delta"
    svd_rank: int = Field(8, ge=1)
    stack_rank: int = Field(2, ge=1)
    stack_targets: tuple[str, ...] | None = Field(None, description="modules with a stacked adapter; None = all")
    stack_layers: int | None = Field(8, ge=0, description="stack only in the last N transformer blocks "
                                     "(backward stops at the lowest stacked block); 0 or None = all")
    stack_alpha: float | None = Field(None, gt=0, description="default: 2 x stack_rank")
    stack_epochs: int = Field(1, ge=0, description="0 = fusion only, no stacked adapter")
    stack_lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    retrieve_k: int = Field(1, ge=0)
    max_length: int = Field(512, ge=32)
    max_rows: int = Field(16, ge=1)
    seed: int = 0

    @property
    def alpha_s(self) -> float:
        return self.stack_alpha if self.stack_alpha is not None else 2.0 * self.stack_rank


PRESETS: dict[str, dict] = {
    # The authors' released settings: factor merge of the top-2 (weighted the right way
    # round), stacked rank 4 on all linear layers, lr 5e-5, one epoch.
    "reference": {"merge": "factor", "top_k": 2, "stack_rank": 4, "stack_alpha": 8.0,
                  "stack_lr": 5e-5, "stack_epochs": 1, "stack_layers": None},
    "default": {},
}


def adapt_config(preset: str = "default", **overrides) -> AdaptConfig:
    if preset not in PRESETS:
        raise MtaError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return AdaptConfig.build({**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
