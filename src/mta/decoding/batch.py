"""Batch generation: many prompts, each through its own user's adapters (or the base
model), greedy unless asked otherwise.

``generate`` is the library's entry (the evaluation, the CLI's ``generate``): prompts in
the chat template, left padding, longest first, in batches, through one of the decoders:
transformers' ``generate`` with the engine's per-row routing (``hf_generate``), or a
``DecoderPool`` of captured steps (``mta.decoding.step``) over the fixed routing
(``mta.decoding.fixed``). ``static_generate`` is transformers' own static-cache loop with
the routing pinned (its auto-compile on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mta.decoding.fixed import FixedRouting, captured_buffers, pinned
from mta.decoding.prompts import chat_prompt, stop_ids
from mta.decoding.step import GraphDecoder
from mta.engine.engine import AdapterEngine, Row
from mta.errors import ResourceError


@torch.no_grad()
def generate(backbone, prompts: Sequence[str], rows: Sequence | None, max_new_tokens: int, batch_size: int = 8,
             max_prompt_tokens: int = 1024, on_batch: Callable[[int], None] | None = None,
             decoder: str = "generate", **gen_kwargs) -> list[str]:
    """Greedy completions of chat-formatted ``prompts``, decoded without special tokens;
    prompt i goes through ``rows[i]`` (its user's adapters), or all through the base
    model when ``rows`` is None.

    Batches are formed longest first (little left padding). Prompts longer than
    ``max_prompt_tokens`` keep their END (the question): truncating on the right would
    cut off the instruction being answered.

    ``decoder="generate"`` (or ``"auto"``): transformers' generate. ``"graph"``: the batches
    go through the backbone's ``DecoderPool`` (mta.decoding.step: the decode step captured
    in a CUDA graph on CUDA), which gives
    the same greedy tokens; it takes no extra generation arguments. ``"compiled"``: the
    same, the step through torch.compile before it is captured.
    """
    if rows is not None and len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    if decoder not in ("auto", "generate", "graph", "compiled"):
        raise ValueError(f"unknown decoder {decoder!r} (auto, generate, graph, compiled)")
    decoder = "generate" if decoder == "auto" else decoder
    if decoder != "generate" and gen_kwargs:
        raise ValueError(f"the graph decoder is greedy and takes no generation arguments ({', '.join(gen_kwargs)})")
    tokenizer, engine = backbone.tokenizer, backbone.engine
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": stop_ids(tokenizer), **gen_kwargs}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False).to(engine.device)
        batch_rows = None if rows is None else [rows[i] for i in idx]
        try:
            if decoder != "generate":
                pool = backbone.decoder_pool(compile=decoder == "compiled")
                gen = pool.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens, kwargs["eos_token_id"],
                                    tokenizer.pad_token_id, engine=None if rows is None else engine, rows=batch_rows)
            else:
                gen = hf_generate(engine, batch_rows, enc["input_ids"], enc["attention_mask"], **kwargs)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of {engine.device.type} memory generating a batch of {len(idx)} prompts of "
                                f"up to {enc['input_ids'].shape[1]} tokens: lower the generation batch size or "
                                "the prompt length", ("GenerateConfig.batch_size",
                                                      "GenerateConfig.max_prompt_tokens")) from None
        for i, text in zip(idx, tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)):
            out[i] = text
        if on_batch:
            on_batch(len(idx))
    return out

@torch.no_grad()
def hf_generate(engine: AdapterEngine, rows: Sequence[Row] | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, **gen_kwargs) -> torch.Tensor:
    """transformers' ``generate`` with every row routed through its own adapters (KV cache
    on); ``rows=None``: the base model alone."""
    if rows is not None and len(rows) != input_ids.shape[0]:
        raise ValueError(f"{len(rows)} routing rows for a batch of {input_ids.shape[0]}")
    if gen_kwargs.get("num_beams", 1) != 1 or gen_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("beam search and several sequences per row would reorder rows; not supported")
    if rows is None:
        return engine.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    with engine.route(rows):
        return engine.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)


@torch.no_grad()
def static_generate(engine: AdapterEngine, rows: Sequence[Row], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, width: int | None = None, **gen_kwargs) -> torch.Tensor:
    """``hf_generate`` over transformers' static KV cache with the routing pinned; on CUDA
    transformers compiles the decode step itself (its auto-compile for static caches), and
    a new batch of the same size and width reuses that compiled step."""
    if len(rows) != input_ids.shape[0]:
        raise ValueError(f"{len(rows)} routing rows for a batch of {input_ids.shape[0]}")
    with pinned(engine, rows, width=width):
        return engine.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     cache_implementation="static", **gen_kwargs)


class DecoderPool:
    """GraphDecoders by bucket: a batch is padded to the next row bucket (dummy rows: one
    token, no adapters; past the largest bucket, the next power of two) and its prompt +
    new tokens to the next multiple of ``len_step``, so a handful of captures serve
    batches of every size. The least recently used decoder goes when more than
    ``max_decoders`` are held (each holds its KV cache)."""

    def __init__(self, model: nn.Module, row_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                 len_step: int = 128, max_decoders: int = 4, graph: bool | None = None,
                 compile: bool | str = False):
        if not row_buckets or any(b < 1 for b in row_buckets) or len_step < 2 or max_decoders < 1:
            raise ValueError("row buckets must be positive, len_step at least 2 and max_decoders at least 1")
        self.model, self.row_buckets, self.len_step = model, sorted(row_buckets), len_step
        self.max_decoders, self.graph, self.compile = max_decoders, graph, compile
        self.decoders: dict[tuple[int, int], GraphDecoder] = {}

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        fit = [b for b in self.row_buckets if b >= rows] or [1 << (rows - 1).bit_length()]
        return fit[0], -(-length // self.len_step) * self.len_step

    def decoder(self, rows: int, length: int) -> GraphDecoder:
        key = self.bucket(rows, length)
        dec = self.decoders.pop(key, None) or GraphDecoder(self.model, key[0], key[1], graph=self.graph,
                                                           compile=self.compile)
        self.decoders[key] = dec  # most recently used last
        while len(self.decoders) > self.max_decoders:
            self.decoders.pop(next(iter(self.decoders)))
        return dec

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 engine=None, rows: Sequence | None = None, width: int | None = None) -> torch.Tensor:
        """Greedy tokens for a left-padded batch of any size (``generate``'s layout). With
        ``engine`` and ``rows``, every row through its own adapters (pinned routing, the
        dummy rows inactive), in the fixed layout that reads fewer bytes (``fixed_layout``);
        ``width`` asks for the pinned layout with that many rank directions (default: what
        the rows need, rounded up to a multiple of 8, so later batches tend to reuse the
        capture)."""
        n, p = input_ids.shape
        dec = self.decoder(n, p + max_new_tokens)
        extra = dec.batch - n
        if extra:  # dummy rows: one real token each
            ids = torch.full((extra, p), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
            mask = torch.zeros((extra, p), dtype=attention_mask.dtype, device=attention_mask.device)
            mask[:, -1] = 1
            input_ids, attention_mask = torch.cat([input_ids, ids]), torch.cat([attention_mask, mask])
        if engine is None:
            out = dec.generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
            return out[:n]
        full = list(rows) + [Row(active=False)] * extra
        with FixedRouting().fill(engine, full, dec.batch, width):  # a fresh fill: the tables copied too
            dec.buffers = captured_buffers(engine)
            out = dec.generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
        return out[:n]
