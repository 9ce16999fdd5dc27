"""A base-model fingerprint stored with every adapter, so that an adapter is never
silently applied to a model it was not trained on."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mta.errors import MtaError

FIELDS = ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "vocab_size")


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """Base weights of the linear layers in module order, the same with or without an
    engine injected (a bank layer contributes its wrapped base, never twice)."""
    out = []
    for name, m in model.named_modules():
        if "lm_head" in name or name.endswith(".base"):
            continue
        if hasattr(m, "bank_A"):
            out.append(m.base.weight)
        elif isinstance(m, nn.Linear):
            out.append(m.weight)
    return out


def _bytes(t: torch.Tensor) -> bytes:
    # rounded to bf16 first: the same checkpoint loaded in fp32 (CPU) or bf16 (CUDA) is the
    # same base model; the real models here are bf16 checkpoints, so this loses nothing
    return t.detach().to(torch.bfloat16).float().cpu().numpy().tobytes()


def model_fingerprint(model: nn.Module) -> dict[str, str | int]:
    """Architecture and sizes from the config, plus a sha256 over a few weight slices
    (the first rows of the input embedding, the first and last linear layer, the final
    norm), independent of the dtype the model was loaded in. Bank layers are seen
    through to their frozen base weights."""
    cfg = model.config
    fp: dict[str, str | int] = {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
    }
    for f in FIELDS[1:]:
        v = getattr(cfg, f, None)
        if v is not None:
            fp[f] = int(v)
    h = hashlib.sha256()
    emb = model.get_input_embeddings().weight
    h.update(_bytes(emb[:8]))
    weights = _linear_weights(model)
    for w in (weights[0], weights[-1]):
        h.update(_bytes(w[:4]))
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    if norms:
        h.update(_bytes(norms[-1]))
    fp["weights_sha256"] = h.hexdigest()[:32]
    return fp


def check_fingerprint(stored: dict | None, actual: dict, what: str) -> None:
    """Refuse ``what`` when its stored fingerprint does not match the loaded base model."""
    if not stored:
        raise MtaError(f"{what}: no base-model fingerprint stored; refusing to guess compatibility")
    diff = [f"{k} {stored.get(k)!r} != {actual.get(k)!r}" for k in sorted(set(stored) | set(actual))
            if str(stored.get(k)) != str(actual.get(k))]
    if diff:
        raise MtaError(f"{what} was trained on a different base model ({'; '.join(diff[:3])})")
