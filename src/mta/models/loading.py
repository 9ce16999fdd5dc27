"""Load an LLM or a sentence embedder by registry name or local directory, offline."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Nothing but the fetch commands may touch the network; make the HF libraries agree.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from mta.errors import ModelNotFoundError  # noqa: E402
from mta.models.registry import RANDOM_8B, REGISTRY  # noqa: E402

log = logging.getLogger(__name__)


def resolve_model_dir(name_or_path: str, kind: str = "llm") -> Path | None:
    """Registry name -> its cached directory (None for the built-in random models); a path -> itself."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if spec.kind != kind:
            raise ModelNotFoundError(f"'{name_or_path}' is an {spec.kind}, not an {kind}")
        if spec.layout == "random":
            return None
        if not spec.present:
            raise ModelNotFoundError(
                f"model '{spec.name}' is not fetched; run: mta models fetch {spec.name}"
            )
        return spec.path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        names = ", ".join(n for n, s in REGISTRY.items() if s.kind == kind)
        raise ModelNotFoundError(
            f"{name_or_path!r} is neither a registry {kind} ({names}) nor a local directory"
        )
    if kind == "llm" and not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    if kind == "embedder" and not (
        (path / "modules.json").exists() or (path / "config.json").exists()
    ):
        raise ModelNotFoundError(f"{path}: not a sentence-transformers directory (no modules.json)")
    return path


def load_llm(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode; the tokenizer pads on the left with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_path, "llm")
    if path is None and name_or_path == RANDOM_8B:
        from mta.models.tiny import LLAMA3_8B_SHAPE, random_llama

        model, tok = random_llama(LLAMA3_8B_SHAPE, dtype=dtype, device=device)
    elif path is None:
        from mta.models.tiny import tiny_llama

        model, tok = tiny_llama(dtype=torch.float32 if dtype == torch.float32 else dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tok


class HashingEmbedder:
    """Bag-of-words embeddings through scikit-learn's HashingVectorizer: no weights, for tests.
    Exposes the part of SentenceTransformer.encode that mta uses."""

    def __init__(self, dim: int = 512):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vectorizer = HashingVectorizer(n_features=dim, alternate_sign=False, norm="l2",
                                            stop_words="english")

    def encode(self, texts, normalize_embeddings: bool = True, **_):
        import numpy as np

        vecs = self.vectorizer.transform(list(texts)).toarray().astype(np.float32)
        if normalize_embeddings:
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
        return vecs


def load_embedder(name_or_path: str = "minilm-l6", device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    path = resolve_model_dir(name_or_path, "embedder")
    if path is None:
        return HashingEmbedder()
    return SentenceTransformer(str(path), device=device)
