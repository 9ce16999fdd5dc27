"""Typed, frozen, self-checking configs: one per stage, plus the backbone (model,
device, memory) and the evaluation protocol. A bad value raises ONE ``ConfigError``
that lists every problem and names the fields.

These classes are the single source of every default. The CLI builds its options from
them (``mta.cli.options``): a field's CLI flag is its name with dashes, or the ``flag``
given in its metadata where two stages share a name (``BankConfig.lr`` is ``--bank-lr``).
Fields of different configs with the same flag are ONE knob: they must have the same
default (tested), and the flag sets all of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mta.engine.config import LLAMA_TARGETS, TrainConfig
from mta.errors import ConfigError


def flag(name: str) -> dict:
    """Field metadata: the CLI flag of this field (without the leading dashes)."""
    return {"flag": name}


def flag_name(cls: type, name: str) -> str:
    """The CLI flag of ``cls``'s field ``name`` (without the leading dashes): its ``flag``
    metadata, else the name with hyphens."""
    extra = cls.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or name.replace("_", "-")


MAX_SEED = 2**32 - 1  # what every random generator used takes (numpy, torch, python)


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def make(cls, **kwargs):
        """Construct from options where None means "the default"."""
        return cls.build({k: v for k, v in kwargs.items() if v is not None})

    @classmethod
    def build(cls, values: dict):
        """Construct from ``values`` as given (None is a value here); errors become one ConfigError."""
        try:
            return cls(**values)
        except ValidationError as e:
            problems, fields = [], []
            for err in e.errors():
                field = ".".join(str(p) for p in err["loc"]) or "config"
                fields.append(f"{cls.__name__}.{field.split('.')[0]}")
                msg = err["msg"]
                msg = msg[0].lower() + msg[1:] if msg else msg
                problems.append(f"`{field}` {msg} (got {err.get('input')!r})")
            raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems), tuple(fields)) from None

    def dump(self) -> dict:
        return self.model_dump(mode="json")

    def identity(self) -> dict:
        """``dump`` without the fields added since ids were first taken from configs, where
        they hold their default: a bank id or a stored user's settings hash stays what it
        was for a config that does not use them (a new default field would otherwise
        invalidate every bank and user already on disk)."""
        out = self.dump()
        for name in ADDED_FIELDS.get(type(self).__name__, ()):
            if name in out and out[name] == type(self).model_fields[name].default:
                del out[name]
        return out


# fields added after bank ids, user hashes and results' identities were first taken from
# configs (``identity``)
ADDED_FIELDS = {"BankConfig": ("steps", "bank_base", "stop"),
                "AdaptConfig": ("stack_steps", "fusion_weights", "search_evals", "stack_stop"),
                # an evaluation's results and a tune's trial log are identified by the answering
                # settings too (mta.evaluation.runner, .tune)
                "GenerateConfig": ("rating_answer", "label_answer")}


def _split_csv(v: Any) -> Any:
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    return v


Names = Annotated[tuple[str, ...], BeforeValidator(_split_csv)]  # also accepts "a,b,c"
Indices = Annotated[tuple[int, ...], BeforeValidator(_split_csv)]  # also accepts "0,1"


# `--gpu-memory`: a share of the device, bytes with an optional unit, or auto
MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}
MIN_GPU_MEMORY = 2**26  # a byte count below 64 MiB is a typo, not a budget
AUTO_ROOM = 24 * 2**30  # auto: what the loaded model holds plus this much working memory ...
AUTO_MAX_SHARE = 0.9    # ... and never more than this share of the device


def parse_gpu_memory(v: Any) -> str:
    """``--gpu-memory`` in its one written form: "auto", a share of the device in (0, 1]
    ("0.3"), or a whole number of bytes ("42949672960"; from "40GiB", "40G", "43GB", "4e10")."""
    text = str(v).strip().lower().replace(" ", "").replace("_", "")
    if text == "auto":
        return text
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?|\.\d+)([a-z]*)", text)
    if not m or m.group(2) not in MEMORY_UNITS:
        raise ValueError("must be auto, a share of the device in (0, 1] such as 0.3, or bytes such as 40GiB")
    number, unit = float(m.group(1)), m.group(2)
    if not unit and number <= 1:
        if number <= 0:
            raise ValueError("a share of the device must be above 0")
        return repr(number)
    size = int(number * MEMORY_UNITS[unit])
    if size < MIN_GPU_MEMORY:
        raise ValueError(f"{v} is under 64 MiB of memory: give a share of the device (0, 1] or bytes such as 40GiB")
    return str(size)


def gpu_memory_cap(spec: str, total: int, held: int) -> int:
    """The bytes a process may use on a device of ``total`` bytes under ``--gpu-memory
    spec``, once its model holds ``held``: a share of the device, a byte count (at most the
    device), or auto (``held`` plus `AUTO_ROOM`, at most `AUTO_MAX_SHARE` of the device)."""
    if spec == "auto":
        return min(int(AUTO_MAX_SHARE * total), held + AUTO_ROOM)
    value = float(spec)
    return int(value * total) if value <= 1 else min(int(value), total)


def jobs_gpu_memory(spec: str, total: int, held: int, jobs: int) -> int:
    """The bytes each of ``jobs`` processes sharing one device may use when ``--gpu-memory
    spec`` bounds them together and each one's model holds ``held``: the whole divided
    evenly; auto counts every process's model and `AUTO_ROOM` once (at most
    `AUTO_MAX_SHARE` of the device). Each process must have room beyond its model."""
    whole = (min(int(AUTO_MAX_SHARE * total), jobs * held + AUTO_ROOM) if spec == "auto"
             else gpu_memory_cap(spec, total, held))
    each = whole // jobs
    if each <= held:
        raise ConfigError(f"--gpu-memory {spec} leaves each of the {jobs} processes of --jobs {jobs} "
                          f"{each / 2**30:.1f} GiB, no more than the model alone holds ({held / 2**30:.1f} GiB): "
                          "give fewer --jobs or more --gpu-memory", ("BackboneConfig.gpu_memory",))
    return each


class BackboneConfig(_Config):
    """The base model, the embedder, where they run and how memory is planned.

    ``dtype`` auto: bf16 on CUDA, fp32 on CPU (on this project's CPUs a bf16 backward
    is 25x slower: benchmarks/cpu_train_step.py). Adapters always keep fp32 master
    weights; ``adapter_compute`` is the dtype their matmuls run in (auto: bf16 when the
    base is bf16; benchmarks/precision.py measured it equal to fp32 within its stated
    tolerance and faster). ``token_budget`` bounds the padded tokens of one training
    micro-batch; auto on CUDA measures the bytes per token of the first micro-batch and
    sizes the rest to what ``gpu_memory`` leaves (`gpu_memory_cap`; docs/architecture.md,
    "Devices, dtypes and memory").
    """

    model: str | None = Field(None, description="registry LLM or local HF model directory "
                              "(default: the bank's model, else smollm2-135m)")
    embedder: str | None = Field(None, description="registry embedder or sentence-transformers directory "
                                 "(default: the bank's embedder, else minilm-l6)")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="base-model dtype (auto: bf16 on CUDA, "
                                                  "fp32 on CPU)")
    adapter_compute: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the adapter matmuls; master weights stay fp32 (auto: the base dtype)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward "
                                         "(less memory, ~30% more time)")
    token_budget: int | None = Field(None, ge=64, description="padded tokens per training micro-batch "
                                     "(default: no limit on CPU, measured from free memory on CUDA)")
    max_rows: int | None = Field(None, ge=1, description="rows per training micro-batch "
                                 "(default: 16 on CPU, no limit on CUDA)")
    gpu_memory: str = Field("auto", validation_alias=AliasChoices("gpu_memory", "gpu_memory_share"),
                            description="GPU memory this process may use: a share of the device (0.3), bytes "
                            "(40GiB, 40GB, 4e10) or auto (the loaded model plus 24 GiB, at most 90% of the "
                            "device: room for a server beside an evaluation)")
    compile_training: bool = Field(False, description="train with the model's decoder blocks through "
                                   "torch.compile (CUDA only; about a minute of compile per process, then "
                                   "faster: docs/performance.md, runs F and F2)")
    fused_kernels: Literal["none", "liger"] = Field(
        "none", description="fused kernels for the base model's RMSNorm, SwiGLU and rotary embedding: liger "
        "(Liger Kernel's Triton kernels; CUDA only, pip install 'mta[liger]'; mta.fused) or none")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _gpu_memory(cls, v: Any) -> str:
        return parse_gpu_memory(v)


class BankConfig(_Config):
    """Stage 1: anchors and their meta-LoRAs.

    Rank 8 on all linear layers as in the reference; one epoch at lr 3e-3 instead of the
    reference's 3 epochs at 1e-4 (chosen on development data: docs/defaults.md).
    """

    anchors: int = Field(50, ge=1, description="k-means clusters = anchors requested (capped at the "
                         "eligible users; the bank records the effective number)")
    min_history: int = Field(11, ge=1, description="history items an anchor needs (reference: more than 10)")
    bank_base: Literal["none", "task"] = Field(
        "none", description="none: each meta-LoRA learns the task from scratch (the paper); task: a task LoRA is "
        "trained first on the whole candidate pool and held frozen under every anchor, which trains as a residual "
        "on top of it (Per-Pcs, PriME); fusion merges the residuals and every user's rows carry the task LoRA")
    anchor_training: Literal["user", "cluster"] = Field(
        "user", description="what each meta-LoRA trains on: its anchor user's history (the paper), or the pooled "
        "histories of every candidate user nearest its cluster's centroid (for pools of sparse users)")
    rank: int = Field(8, ge=1, description="meta-LoRA rank", json_schema_extra=flag("bank-rank"))
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="meta-LoRA alpha",
                         json_schema_extra=flag("bank-alpha"))
    target_modules: Names = Field(LLAMA_TARGETS, min_length=1, description="modules with a "
                                            "meta-LoRA (comma-separated)", json_schema_extra=flag("bank-targets"))
    epochs: int = Field(1, ge=1, description="meta-LoRA (and per-user LoRA) epochs",
                        json_schema_extra=flag("bank-epochs"))
    steps: int | None = Field(None, ge=1, description="optimiser steps per meta-LoRA, the data cycled as often as "
                              "it takes; replaces epochs (default: epochs x batches per epoch)",
                              json_schema_extra=flag("bank-steps"))
    lr: float = Field(3e-3, gt=0, allow_inf_nan=False, description="meta-LoRA (and per-user LoRA) learning "
                      "rate, cosine with warm-up", json_schema_extra=flag("bank-lr"))
    batch_size: int = Field(8, ge=1, description="examples per anchor per optimiser step",
                            json_schema_extra=flag("bank-batch-size"))
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps in linear warm-up")
    retrieve_k: int = Field(1, ge=0, description="BM25 history items in each prompt (0 disables)")
    max_length: int = Field(512, ge=32, description="tokens per training example (prompt cut from the left)")
    max_items: int | None = Field(None, ge=1, description="anchors (and per-user LoRAs) train on their latest "
                                  "N history items (default: all)", json_schema_extra=flag("anchor-items"))
    group_size: int = Field(8, ge=1, description="anchors trained per pass; a resumed build restarts a group")
    stop: Literal["none", "held-out", "refit"] = Field(
        "none", description="per-user LoRAs only (a private bank, the per-user-lora baseline): held-out keeps each "
        "at the checked step with the lowest loss on its user's last history item; refit chooses that step so, "
        "then trains again on every item for that many steps; `mta eval` sets it from --stack-stop, so every "
        "per-user part is stopped alike; anchors and task LoRAs train to their last step",
        json_schema_extra={"cli": False})
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of k-means, initialisation, shuffling, folds and "
                      "bootstrap")

    def train_config(self, **resources) -> TrainConfig:
        return TrainConfig(lr=self.lr, epochs=self.epochs, steps=self.steps, batch_size=self.batch_size,
                           warmup_ratio=self.warmup_ratio, seed=self.seed, **resources)


# Stage-3 settings of each preset; fields given explicitly override them.
PRESETS: dict[str, dict] = {
    "default": {},
    # The authors' released fusion and stacking: factor merge of the top-2 by similarity
    # (weighted the right way round), stacked rank 4 on all linear layers of all blocks,
    # lr 5e-5, 1 epoch.
    "reference": {"merge": "factor", "top_k": 2, "fusion_weights": "similarity", "stack_rank": 4,
                  "stack_alpha": 8.0, "stack_lr": 5e-5, "stack_epochs": 1, "stack_steps": None, "stack_layers": 0},
}


class AdaptConfig(_Config):
    """Stages 2 and 3: fusion of the anchors and the stacked per-user adapter.

    Defaults (docs/defaults.md says on which development data and why): exact ``delta``
    merge of the top-2 anchors, a rank-2 stack in the last 8 blocks, lr 3e-3, one epoch.
    ``top_k`` 0 means no fusion (a stack alone); ``stack_epochs`` 0 means fusion alone.
    """

    preset: Literal["default", "reference"] = Field("default", description="default, or reference (the "
                                                     "authors' fusion and stacking); explicit values override it")
    top_k: int = Field(2, ge=0, description="anchors mixed per user (0: no fusion, stack only)")
    weighting: Literal["linear", "softmax"] = Field("linear", description="anchor weights: linear "
                                                    "(similarity-proportional) or softmax")
    temperature: float = Field(0.1, gt=0, allow_inf_nan=False, description="softmax temperature")
    fusion_weights: Literal["similarity", "searched"] = Field(
        "similarity", description="similarity: the weights from the anchors' similarity (recomputable from the "
        "history); searched: a CMA-ES search per user over the top-k anchors' weights, started at those and "
        "scored by the user's leave-one-out loss (the weights are stored, k floats per user; delta merge only)")
    search_evals: int = Field(24, ge=2, description="candidate weight vectors scored per user by a searched "
                              "fusion (each one forward pass over the user's examples)")
    merge: Literal["delta", "factor", "svd"] = Field("delta", description="delta (exact), factor (reference) "
                                                     "or svd")
    svd_rank: int = Field(8, ge=1, description="rank of an svd merge")
    stack_rank: int = Field(2, ge=1, description="rank of the stacked adapter")
    stack_targets: Names | None = Field(None, description="modules with a stacked adapter "
                                                  "(comma-separated; default: all)")
    stack_layers: int = Field(8, ge=0, description="stack only in the last N transformer blocks (0 = all; "
                              "backward stops at the lowest stacked block)")
    stack_alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description="stack alpha "
                                      "(default: 2 x stack rank)")
    stack_epochs: int = Field(1, ge=0, description="stacking epochs (0 = fusion only)")
    stack_steps: int | None = Field(None, ge=0, description="optimiser steps per stack, the user's examples cycled "
                                    "as often as it takes; replaces stack_epochs unless that is 0; 0 = no stack, "
                                    "as stack_epochs 0 (default: epochs x batches per epoch)")
    stack_lr: float = Field(3e-3, gt=0, allow_inf_nan=False, description="stacking learning rate")
    stack_stop: Literal["none", "held-out", "refit"] = Field(
        "none", description="when the stack stops: none (at its last step), held-out (the user's last "
        "history item is held out of the weight search and the stack's training, and the stack is kept at the "
        "checked step, 0 included (no change to the fused anchors), with the lowest loss on it), or refit (that "
        "step chosen so, then the stack trained again from its start on every item, the held-out one too, for "
        "that many steps)")
    batch_size: int = Field(8, ge=1, description="examples per user per optimiser step",
                            json_schema_extra=flag("stack-batch-size"))
    users_per_pass: int = Field(64, ge=1, description="users whose stacks train together in one pass (a stack's "
                                "initial values depend on its pass: keep it to reproduce a run)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps in linear warm-up")
    retrieve_k: int = Field(1, ge=0, description="BM25 history items in each prompt (0 disables)")
    max_length: int = Field(512, ge=32, description="tokens per training example (prompt cut from the left)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of k-means, initialisation, shuffling, folds and "
                      "bootstrap")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if isinstance(values, dict):
            preset = values.get("preset", "default")
            if preset in PRESETS:
                values = {**PRESETS[preset], **values}
        return values

    @model_validator(mode="after")
    def _check(self) -> AdaptConfig:
        if self.top_k == 0 and not self.stacks:
            raise ValueError("top_k 0 (no fusion) with no stack (stack_epochs or stack_steps 0) leaves nothing to "
                             "adapt")
        if self.fusion_weights == "searched" and self.merge != "delta":
            raise ValueError(f"searched fusion weights need the exact delta merge, not {self.merge!r}")
        return self

    @property
    def stacks(self) -> bool:
        """Whether users get a stack: neither ``stack_epochs`` nor ``stack_steps`` is 0 (either
        0 is fusion only; ``mta tune`` offers it as a stack budget's "no training" trial)."""
        return self.stack_epochs > 0 and self.stack_steps != 0

    @property
    def alpha_s(self) -> float:
        return self.stack_alpha if self.stack_alpha is not None else 2.0 * self.stack_rank

    def train_config(self, **resources) -> TrainConfig:
        return TrainConfig(lr=self.stack_lr, epochs=max(1, self.stack_epochs), steps=self.stack_steps,
                           batch_size=self.batch_size, warmup_ratio=self.warmup_ratio, seed=self.seed, **resources)


class BaselineConfig(_Config):
    """The trained baselines' own budgets, so that each method is tuned alike (`mta tune`):
    the learning rate and optimiser steps of the task LoRA (``task-lora``, and OPPU's
    shared part), of each per-user LoRA (``per-user-lora``) and of OPPU's per-user part.
    Unset, a baseline trains with the bank's (BankConfig: lr, epochs, steps)."""

    task_lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="the task LoRA's learning rate "
                                  "(default: the bank's)")
    task_steps: int | None = Field(None, ge=1, description="the task LoRA's optimiser steps (default: the bank's "
                                   "epochs over the pooled examples)")
    user_lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="each per-user LoRA's learning "
                                  "rate (default: the bank's)")
    user_steps: int | None = Field(None, ge=1, description="each per-user LoRA's optimiser steps (default: the "
                                   "bank's)")
    oppu_lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="OPPU's per-user part's learning "
                                  "rate (default: the bank's)")
    oppu_steps: int | None = Field(None, ge=0, description="OPPU's per-user part's optimiser steps (default: the "
                                   "bank's; 0 = none: OPPU is then the task LoRA alone)")

    def bank_for(self, part: Literal["task", "user"], bank: BankConfig) -> BankConfig:
        """The bank recipe with ``part``'s learning rate and steps where set; a baseline (and
        a residual bank's task LoRA) never sits on a base of its own."""
        lr, steps = getattr(self, f"{part}_lr"), getattr(self, f"{part}_steps")
        update = {k: v for k, v in (("lr", lr), ("steps", steps)) if v is not None}
        return bank.model_copy(update={**update, "bank_base": "none"})


class GenerateConfig(_Config):
    """Answering queries: prompt retrieval, batch size and answer length."""

    max_new_tokens: int | None = Field(None, ge=1, description="tokens generated per answer "
                                       "(default: the task's)")
    batch_size: int = Field(8, ge=1, description="prompts per generation batch")
    retrieve_k: int = Field(1, ge=0, description="BM25 history items in each prompt (0 disables)")
    max_prompt_tokens: int = Field(1024, ge=16, description="prompt tokens kept (from the end)")
    decoder: Literal["auto", "generate", "graph", "compiled"] = Field(
        "auto", description="auto: compiled for the server on CUDA (compiled and captured at start-up, before "
        "/readyz turns ready), generate elsewhere and for batch generation; "
        "generate: transformers' generate (the server: its eager loop); graph: the slot decoder (the "
        "server's loop, for batch generation too: batch-size slots of one static cache, rows joining as others "
        "finish, the decode step captured in a CUDA graph on CUDA); compiled: graph with the step through "
        "torch.compile first (fused kernels: 1.5x the memory floor at Llama-3-8B shape instead of 2.1x; a "
        "minute or two of compiling per decoder); same greedy tokens (docs/performance.md)")
    rating_answer: Literal["text", "mode", "median", "mean"] = Field(
        "text", description="a rating task's answer: text: generated and parsed (LaMP's protocol); mode: the most "
        "likely score; median: the median of the model's distribution over the scores (the answer with the "
        "least expected absolute error: for MAE); mean: its expected value (for RMSE); read from the answer's "
        "first token in one forward pass (docs/evaluation.md)")
    label_answer: Literal["text", "likeliest"] = Field(
        "text", description="a classification task's answer: text: generated and parsed (LaMP's protocol); "
        "likeliest: the task's label the model finds likeliest as the whole answer (its tokens and the end of the "
        "turn, through the user's adapters; never an answer outside the labels) (docs/evaluation.md)")


class EvalConfig(_Config):
    """`mta eval`'s protocol: which methods, how users are split, how intervals are drawn."""

    methods: Names = Field(("base", "rag"), min_length=1, description="comma-separated: base, rag "
                                     "(= rag-1 and rag-4), rag-K, task-lora, per-user-lora, oppu, mta-fusion, "
                                     "mta-stack, mta, mta-reference; or all")
    folds: int = Field(2, ge=2, description="user folds; each fold is evaluated with anchors from the others")
    users: int | None = Field(None, ge=2, description="use only the first N users (quick runs)")
    target_history: int | None = Field(None, ge=1, description="targets keep only their first N history "
                                       "items (MovieLens protocol: 10)")
    history_queries: int = Field(0, ge=0, description="each target's last N history items become extra test "
                                 "queries and leave its history (0: the data's own queries only)")
    anchor_data: Path | None = Field(None, description="a separate pool of anchor candidates (rich users); the "
                                     "users of the data are then all targets, in one fold")
    persons: Path | None = Field(None, description="a JSON file mapping each user id to its person; folds, "
                                 "dev split and bootstrap draw persons (default: inferred from profile overlap "
                                 "for LaMP files, the data's person fields for JSONL)")
    only_folds: Indices = Field((), description="run only these folds (comma-separated indices from 0), to spread "
                                "one evaluation over processes or machines: each writes its folds' results; "
                                "`mta eval` of every fold into a directory holding them all reads them back "
                                "(docs/evaluation.md)")
    leak_check: bool = Field(True, description="stop before training when a target's query answer is in its "
                             "fold's training data (docs/evaluation.md)")
    n_boot: int = Field(1000, ge=100, description="bootstrap resamples")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of k-means, initialisation, shuffling, folds and "
                      "bootstrap")
    variants: Names = Field((), description="comma-separated OPTION=VALUE: `mta` again with one bank or "
                            "adaptation option changed (its flag without the dashes, e.g. bank-base=none,"
                            "fusion-weights=similarity,anchor-training=cluster,stack-steps=32), on the same folds, "
                            "each reported against `mta` with a paired interval (the ablation table)")

    @field_validator("only_folds")
    @classmethod
    def _only_folds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(i < 0 for i in v):
            raise ValueError("fold indices start at 0")
        if len(set(v)) != len(v):
            raise ValueError("a fold is named twice")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _folds_exist(self) -> EvalConfig:
        if self.only_folds and self.anchor_data is not None:
            raise ValueError("--only-folds splits the folds over persons; with --anchor-data there is one fold")
        if any(i >= self.folds for i in self.only_folds):
            raise ValueError(f"there are {self.folds} folds (0 to {self.folds - 1}); --only-folds named "
                             f"{','.join(map(str, self.only_folds))}")
        return self

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for item in v:
            name, eq, value = item.partition("=")
            name = name.strip().lstrip("-").replace("_", "-")
            if not eq or not value.strip():
                raise ValueError(f"variant {item!r} is not OPTION=VALUE")
            if not variant_fields(name):
                raise ValueError(f"variant {item!r}: --{name} is not a bank or adaptation option")
            out.append(f"{name}={value.strip()}")
        if len(set(out)) != len(out):
            raise ValueError("a variant is named twice")
        return tuple(out)


def variant_fields(option: str) -> list[tuple[type, str]]:
    """The bank and adaptation fields the flag ``option`` sets (a shared flag, e.g. seed or
    retrieve-k, sets each of them)."""
    return [(cls, name) for cls in (BankConfig, AdaptConfig) for name in cls.model_fields
            if flag_name(cls, name) == option]


def apply_variant(variant: str, bank: BankConfig, adapt: AdaptConfig) -> tuple[BankConfig, AdaptConfig]:
    """The bank and adaptation configs with ``variant`` (``OPTION=VALUE``, checked by
    ``EvalConfig``) applied, validated as the option itself would be (a bad value is a
    ConfigError naming the field)."""
    option, _, value = variant.partition("=")
    out = {BankConfig: bank, AdaptConfig: adapt}
    for cls, name in variant_fields(option):
        out[cls] = cls.build({**out[cls].model_dump(), name: value})
    return out[BankConfig], out[AdaptConfig]


class RunConfig(_Config):
    """`mta run`: one seeded split of the users into anchor candidates and targets."""

    targets_fraction: float = Field(0.5, gt=0, lt=1, description="share of users held out as targets")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of k-means, initialisation, shuffling, folds and "
                      "bootstrap")


class ServeConfig(_Config):
    """`mta serve`: where it listens, how much it batches and queues, and its limits."""

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    max_batch: int = Field(32, ge=1, description="requests decoded together in one step")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond the batch; more are answered 429")
    resident: int = Field(256, ge=1, description="users whose stacks stay on the device (least recently used out)")
    max_tokens: int = Field(512, ge=1, description="the largest max_tokens a request may ask for")
    prefill_chunk: int | None = Field(None, ge=0, description="prompt tokens (rows x columns) prefilled between two "
                                      "decode steps: joining rows' prompts go in chunks so running rows keep decoding "
                                      "(default: 2048 on CUDA, where a prefill forward of up to a few thousand "
                                      "tokens costs about what its launches cost, 512 on a CPU; 0: each joining "
                                      "group's prompts in one forward)")
    join_rows: int | None = Field(None, ge=1, description="while rows are decoding, waiting requests join once "
                                  "this many slots are free (or the oldest has waited --join-wait-ms): each join "
                                  "costs a prefill forward, so joining in groups keeps the running rows' steps "
                                  "close to a plain decode step (default: an eighth of --max-batch)")
    join_wait_ms: float = Field(100.0, ge=0, allow_inf_nan=False, description="the longest a waiting request is "
                                "held back for --join-rows free slots while rows are decoding, in milliseconds")
    prefix_cache_tokens: int = Field(16384, ge=0, description="prompt tokens whose keys and values are kept per "
                                     "user to reuse for the prefix a user's next prompt shares (0: none)")
    feed_tokens: int = Field(16, ge=0, description="a joining request whose cached prefix leaves at most this many "
                             "prompt tokens is not prefilled: they go in one a decode step beside the running "
                             "rows (graph and compiled decoders; 0: every joining request is prefilled)")
    async_steps: bool = Field(True, description="the decode loop's host runs one step behind the device: each "
                              "step's tokens are taken, streamed and the queue admitted while the next step runs "
                              "(graph and compiled decoders; a step with a sampling request waits for its tokens; "
                              "off: each step's tokens are taken before the next is launched)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="the largest request body, in bytes")
    retry_after: int = Field(1, ge=1, description="seconds a 429 answer asks the client to wait")
    shutdown_timeout: float = Field(60.0, gt=0, description="seconds a shutdown waits for running requests")
    adapt_worker: bool = Field(True, description="adapt users in a worker process with its own copy of the model, "
                               "beside the decode loop; off: on the decode loop's thread, once the running requests "
                               "have finished (no second copy of the model, but requests wait for the job)")
    adapt_share: float = Field(0.5, gt=0, le=1, description="share of the machine the adaptation worker takes: of "
                               "the CPU cores for its threads (at least one), or of the GPU's memory")
    switch_interval_ms: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False, description="the server "
                                             "process's thread switch interval (Python's sys.setswitchinterval), in "
                                             "milliseconds: how long a thread waiting for the GIL lets its holder "
                                             "run before asking for it (default: Python's, 5 ms)")


def load_sections(dumped: dict[str, dict]) -> dict[str, _Config]:
    """Configs dumped by section (``{"backbone": {...}, "serve": {...}}``, as a command's
    ``config.json`` and a Ray driver send them) built again, by section name."""
    classes = {"backbone": BackboneConfig, "bank": BankConfig, "adapt": AdaptConfig, "generate": GenerateConfig,
               "eval": EvalConfig, "baselines": BaselineConfig, "run": RunConfig, "serve": ServeConfig}
    unknown = set(dumped) - set(classes)
    if unknown:
        raise ValueError(f"no config section named {', '.join(sorted(unknown))}")
    return {name: classes[name].build(values) for name, values in dumped.items()}
