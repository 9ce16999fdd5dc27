"""Prompting and batched generation through the backbone's engine.

Prompts go through the model's chat template when it has one (instruct models), with
left padding so every row's answer starts at the same position. Each prompt has a
routing row (its user's adapters), or none for the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mta.errors import ResourceError


def end_of_turn(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (ChatML's <|im_end|>),
    which is what an adapter must learn to emit and what generation stops on. Qwen's
    tokenizer names <|endoftext|> its eos while its turns end with <|im_end|>: training on
    the eos taught adapters an answer that never stops. Falls back to the eos token."""
    cached = getattr(tokenizer, "_mta_end_of_turn", None)
    if cached is not None:
        return cached
    eot = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        marker = "MTA-ANSWER-MARKER"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant",
                                              "content": marker}], tokenize=False)
        tail = text.split(marker, 1)[1] if marker in text else ""
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        # the first control token after the answer (added tokens: ChatML's <|im_end|> is one
        # even when the tokenizer names another token its eos)
        control = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        eot = next((i for i in ids if i in control), eot)
    tokenizer._mta_end_of_turn = eot
    return eot


def stop_ids(tokenizer) -> list[int]:
    """Generation stops at the end of the turn or at the eos, whichever comes."""
    return list(dict.fromkeys(i for i in (end_of_turn(tokenizer), tokenizer.eos_token_id) if i is not None))


def chat_prompt(tokenizer, user_text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text + "\n"


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

    ``decoder="graph"``: the batches go through the backbone's ``DecoderPool``
    (mta.engine.graphs: the decode step captured in a CUDA graph on CUDA), which gives
    the same greedy tokens; it takes no extra generation arguments. ``"compiled"``: the
    same, the step through torch.compile before it is captured.
    """
    if rows is not None and len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    if decoder not in ("generate", "graph", "compiled"):
        raise ValueError(f"unknown decoder {decoder!r} (generate, graph, compiled)")
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
                gen = engine.generate(batch_rows, enc["input_ids"], enc["attention_mask"], **kwargs)
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

