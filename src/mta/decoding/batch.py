"""Batch generation: many prompts, each through its own user's adapters (or the base
model), greedy unless asked otherwise.

``generate`` is the library's entry (the evaluation, the CLI's ``generate``): prompts in
the chat template, through one of the decoders: transformers' ``generate`` with the
engine's per-row routing (``hf_generate``; left padding, longest first, in batches), or
the server's slot decoder (``mta.decoding.slots``: the step captured, compiled or not,
over the fixed routing; rows join as others finish). ``static_generate`` is transformers'
own static-cache loop with the routing pinned (its auto-compile on CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from mta.decoding import eager
from mta.decoding.fixed import pinned
from mta.decoding.prompts import chat_prompt, stop_ids
from mta.engine.engine import AdapterEngine, Row
from mta.errors import ResourceError

log = logging.getLogger(__name__)


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

    ``decoder="generate"`` (or ``"auto"``): transformers' generate. ``"graph"``: the
    prompts go through the backbone's slot decoder (``Backbone.slot_decoder``, the server's
    loop: ``batch_size`` slots, the decode step captured in a CUDA graph on CUDA, rows
    joining as others finish, longest first), which gives the same greedy tokens; it takes
    no extra generation arguments. ``"compiled"``: the same, the step through
    torch.compile before it is captured.
    """
    if rows is not None and len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    if decoder not in ("auto", "generate", "graph", "compiled"):
        raise ValueError(f"unknown decoder {decoder!r} (auto, generate, graph, compiled)")
    decoder = "generate" if decoder == "auto" else decoder
    if decoder != "generate" and gen_kwargs:
        raise ValueError(f"the graph decoder is greedy and takes no generation arguments ({', '.join(gen_kwargs)})")
    tokenizer, engine = backbone.tokenizer, backbone.engine
    texts, order = chat_texts(tokenizer, prompts)
    out: list[str] = [""] * len(texts)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": stop_ids(tokenizer), **gen_kwargs}
    if decoder != "generate" and texts:
        ids = tokenizer(texts, truncation=True, max_length=max_prompt_tokens, add_special_tokens=False)["input_ids"]
        seqs = {i: eager.Sequence(ids[i], Row(active=False) if rows is None else rows[i], max_new_tokens,
                            frozenset(kwargs["eos_token_id"])) for i in order}
        try:
            # the span rounded up (at most the prompt limit's): later calls of similar lengths
            # reuse this decoder, and a compiled one its compile
            need = max(len(x) for x in ids) + max_new_tokens
            span = min(-(-need // 256) * 256, max_prompt_tokens + max_new_tokens)
            dec = backbone.slot_decoder(batch_size, max(need, span), decoder == "compiled")
            dec.run([seqs[i] for i in order], join_rows=max(1, batch_size // 8),
                    on_finish=(lambda s: on_batch(1)) if on_batch else None)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of {engine.device.type} memory generating {len(order)} prompts in "
                                f"{batch_size} slots of up to {max(len(x) for x in ids)} tokens: lower the "
                                "generation batch size or the prompt length",
                                ("GenerateConfig.batch_size", "GenerateConfig.max_prompt_tokens")) from None
        for i, s in seqs.items():
            out[i] = tokenizer.decode(s.tokens, skip_special_tokens=True)
        return out
    def one(idx: list[int], enc) -> None:
        batch_rows = None if rows is None else [rows[i] for i in idx]
        gen = hf_generate(engine, batch_rows, enc["input_ids"], enc["attention_mask"], **kwargs)
        for i, text in zip(idx, tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)):
            out[i] = text
        if on_batch:
            on_batch(len(idx))

    in_batches(engine, tokenizer, texts, order, batch_size, max_prompt_tokens, "generating", one)
    return out


def chat_texts(tokenizer, prompts: Sequence[str]) -> tuple[list[str], list[int]]:
    """``prompts`` in the chat template, and their order longest first (batches of similar
    lengths: little left padding). Sets the tokenizer to pad and truncate on the left."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return texts, sorted(range(len(texts)), key=lambda i: -lengths[i])


def in_batches(engine: AdapterEngine, tokenizer, texts: Sequence[str], order: Sequence[int], batch_size: int,
               max_prompt_tokens: int, doing: str, run: Callable[[list[int], dict], None]) -> None:
    """``run(indices, encoding)`` for ``texts`` in ``order``, ``batch_size`` at a time,
    left-padded (a text longer than ``max_prompt_tokens`` keeps its end: the question).
    A batch out of device memory is tried again at half its size, and the batches after
    it keep that size (``run`` must leave nothing done when it fails): a generation sharing
    its device, or near a memory cap, goes on slower instead of failing. Out of memory
    with one prompt: one line naming the settings to lower."""
    size, start = batch_size, 0
    while start < len(order):
        idx = list(order[start:start + size])
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False).to(engine.device)
        try:
            run(idx, enc)
            start += len(idx)
            continue
        except torch.OutOfMemoryError:
            pass
        # out of memory (handled here, past the except block: its traceback, and the tensors
        # its frames hold, are gone, so the cache can give their memory back)
        n, width = enc["input_ids"].shape
        if size == 1:
            raise ResourceError(f"out of {engine.device.type} memory {doing} a batch of {n} prompts of up to "
                                f"{width} tokens: lower the generation batch size or the prompt length",
                                ("GenerateConfig.batch_size", "GenerateConfig.max_prompt_tokens"))
        del enc
        size = max(1, size // 2)
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of %s memory %s %d prompts of up to %d tokens: again %d at a time",
                    engine.device.type, doing, n, width, size)


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
