"""Attention for a decode step: grouped key/value heads read in place, and the model's
attention switched to it while a decoder runs; the two transformers spellings decoders
need (the cache argument's name) and dynamo's recompile limit."""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GQA_DECODE = "mta_gqa_decode"


def gqa_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """SDPA for one new token per row without copying the cache. With a mask, the SDPA path
    of transformers before ``pack_gqa`` (5.17, the GPU image's version) repeats every
    key/value head for its query heads (``repeat_kv``): a copy of the whole cache per layer
    per step, ~0.23 ms each, 64 per step, on the H200 at 8B shape with B=64
    (docs/performance.md). Here a key/value head's query heads become that many query
    positions of one head (a step's single token has nothing causal to mask among them;
    the mask says which cache slots each row sees), so the cache is read in place.
    Prompts (more than one new token) take transformers' SDPA.

    A mask shorter than the cache is an attention window (``GraphDecoder``'s ``windowed``):
    only the cache's first that many positions are read (SDPA reads every position it is
    given, masked or not, so a long static cache costs its whole length at every step)."""
    b, h, q, d = query.shape
    kvh = key.shape[1]
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[-2]:
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    if q != 1 or h == kvh or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kw)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = F.scaled_dot_product_attention(query.reshape(b, kvh, h // kvh, d), key, value, attn_mask=mask,
                                         scale=scaling)  # (b, kv heads, query heads per kv head, d)
    return out.reshape(b, h, 1, d).transpose(1, 2), None


AttentionInterface.register(GQA_DECODE, gqa_decode_attention)


def allow_recompiles(n: int) -> None:
    """Raise dynamo's recompile limit to at least ``n`` graphs per compiled function (past
    it, dynamo runs the function eagerly without a word); torch renamed the setting."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


def windows_possible(model: nn.Module) -> bool:
    """Whether decode steps can read an attention window of the cache (SDPA models: the
    window is read by `gqa_decode_attention`)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", GQA_DECODE)


@contextlib.contextmanager
def decode_attention(model: nn.Module, windowed: bool = False):
    """The model's attention through `gqa_decode_attention` while inside: SDPA models, on a
    transformers whose SDPA path does not pack grouped heads itself (``pack_gqa``, 5.24),
    and every SDPA model whose steps read a window of the cache (``windowed``)."""
    cfg = model.config
    old = getattr(cfg, "_attn_implementation", None)
    if old != "sdpa" or (hasattr(sdpa_attention, "pack_gqa") and not windowed):
        yield
        return
    cfg._attn_implementation = GQA_DECODE
    try:
        yield
    finally:
        cfg._attn_implementation = old


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 names the cache argument ``cache``, earlier 5.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
