"""Typed records of what lands on disk: the bank index and the per-user record.

Each carries a ``schema_version``. A file of another version (or none: written before
records were versioned) is refused with a one-line error that says what to do, instead
of being half-understood.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mta.config import AdaptConfig, BankConfig
from mta.data.schema import HistoryItem
from mta.errors import MtaError

BANK_SCHEMA = 2
USER_SCHEMA = 2


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnchorRecord(_Record):
    slot: int
    user_id: str
    cluster: int
    embedding: list[float]
    done: bool = False
    examples: int | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    train_seconds: float | None = None
    reused_from: str | None = None
    sha256: str | None = None  # of the adapter's safetensors file, checked on load
    members: list[str] = []  # the users whose histories it trains on (anchor_training "cluster")
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite gradient (mta.engine.train)
    # a per-user LoRA with BankConfig.stop "held-out": the step whose adapter was kept (0:
    # none of the updates) and the held-out loss at each checked step; None otherwise
    stopped_at: int | None = None
    held_out_losses: list[float] | None = None
    steps: int | None = None  # optimiser steps it trained for (None: copied in, or recorded before this field)


class BankRecord(_Record):
    """``BANK/index.json``. ``kind`` "bank": anchors chosen by k-means; "private": every
    user is its own anchor (per-user LoRAs, evaluated as a bank of one-hot mixtures);
    "task": one anchor trained on the pooled histories of ``pooled`` (the task LoRA)."""

    schema_version: Literal[2] = BANK_SCHEMA
    kind: Literal["bank", "private", "task"] = "bank"
    task: str
    model: str
    embedder: str
    fingerprint: dict[str, Any]
    config: BankConfig
    notes: list[str] = Field(default_factory=list)
    candidates: int
    pooled: list[str] = Field(default_factory=list)
    negatives: list[HistoryItem] = Field(default_factory=list)  # other users' items, for tasks that need them
    recipe: dict = Field(default_factory=dict)  # AdaptConfig settings recommended with this bank (mta tune)
    embed_seconds: float = 0.0
    anchors: list[AnchorRecord]
    # bank_base "task": the sha256 of the task LoRA under every anchor (BANK/base, a task
    # bank), set once it is trained; None for a bank without a base
    base_sha256: str | None = None
    # the candidate pool it was built from (``bank.pool_digest``): a resume with other data
    # is refused; None in banks written before it was recorded
    data_sha256: str | None = None

    @property
    def anchor_ids(self) -> list[str]:
        return [a.user_id for a in self.anchors]

    @property
    def complete(self) -> bool:
        return all(a.done for a in self.anchors)

    @property
    def bank_id(self) -> str:
        """Identifies the trained bank: its anchors, base model, recipe and the anchors' trained
        weights (their files' sha256: two banks of the same anchor ids and recipe trained on
        other data, or retrained differently, are different banks for the users adapted
        against them)."""
        payload = {"anchors": self.anchor_ids, "fingerprint": self.fingerprint, "config": self.config.identity(),
                   "weights": [a.sha256 for a in self.anchors]}
        if self.base_sha256 is not None:
            payload["base"] = self.base_sha256
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class StackRecord(_Record):
    rank: int
    alpha: float
    epochs: int
    targets: list[str] | None = None
    layers: int = 0
    lr: float
    examples: int
    losses: list[float]
    sha256: str | None = None  # of the stack's safetensors file, checked on load
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite gradient (mta.engine.train)
    # stack_stop "held-out": the step whose adapter was kept (0: none of the updates) and
    # the held-out loss at each checked step; None without early stopping
    stopped_at: int | None = None
    held_out_losses: list[float] | None = None
    refit: bool = False  # stack_stop "refit": trained again on every item for ``stopped_at`` steps

    @property
    def kept_steps(self) -> int:
        """Optimiser steps whose updates the stored stack holds: every one it trained for,
        or with early stopping the step kept (0: none)."""
        return len(self.losses) if self.stopped_at is None else self.stopped_at


# the most an anchor may weigh in a user's mixture: similarity weights are at most 1,
# searched ones at most 2 (mta.weight_search); a record beyond this was edited or damaged
MAX_WEIGHT = 10.0


class UserRecord(_Record):
    """``STORE/users/<key>/meta.json``: everything needed to serve the user again."""

    schema_version: Literal[2] = USER_SCHEMA
    user_id: str
    task: str
    bank: str
    history_hash: str
    adapt: AdaptConfig
    merge: Literal["delta", "factor", "svd"]
    svd_rank: int | None = None
    anchors: list[int]
    anchor_users: list[str]
    weights: list[float]
    similarities: list[float]
    stack: StackRecord | None = None
    history_items: int

    @model_validator(mode="after")
    def _check(self) -> UserRecord:
        if not len(self.anchors) == len(self.anchor_users) == len(self.weights):
            raise ValueError("anchors, anchor_users and weights differ in length")
        if any(a < 0 for a in self.anchors):
            raise ValueError("an anchor slot is negative")
        if not all(math.isfinite(w) and 0 <= w <= MAX_WEIGHT for w in self.weights):
            raise ValueError(f"a fusion weight is not a number in [0, {MAX_WEIGHT:g}]")
        return self


def _read(path: Path, cls: type[_Record], what: str, remedy: str, version: int) -> Any:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MtaError(f"{path}: corrupt {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise MtaError(f"{path}: corrupt {what} ({e.msg})") from None
    if not isinstance(raw, dict):
        raise MtaError(f"{path}: corrupt {what} (not a JSON object)")
    found = raw.get("schema_version")
    if found != version:
        age = "no schema version (written by mta 0.1)" if found is None else f"schema version {found!r}"
        raise MtaError(f"{path}: {what} has {age}; this mta reads version {version}: {remedy}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise MtaError(f"{path}: corrupt {what} (field `{loc}`: {first['msg']})") from None


def read_bank_record(path: Path) -> BankRecord:
    return _read(path, BankRecord, "bank index", "rebuild the bank (mta bank build)", BANK_SCHEMA)


def read_user_record(path: Path) -> UserRecord:
    return _read(path, UserRecord, "user record", "adapt the user again (mta adapt)", USER_SCHEMA)


def dump(record: _Record) -> str:
    return record.model_dump_json(indent=2) + "\n"
