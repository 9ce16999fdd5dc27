"""Prompting and batched generation with a plain Hugging Face causal LM.

Prompts go through the model's chat template when it has one (instruct models), with
left padding so every row's answer starts at the same position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def chat_prompt(tokenizer, user_text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text + "\n"


def _in_length_batches(tokenizer, prompts: Sequence[str], batch_size: int, max_prompt_tokens: int, device,
                       generate: Callable, on_batch: Callable[[int], None] | None) -> list[str]:
    """Chat-format ``prompts``, batch them longest first (little left padding), call
    ``generate(indices, encoding)`` per batch and return the decoded answers in the
    order of ``prompts``.

    Prompts longer than ``max_prompt_tokens`` keep their END (the question), since
    truncation on the right would cut off the instruction being answered.
    """
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False).to(device)
        gen = generate(idx, enc)
        for i, text in zip(idx, tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)):
            out[i] = text
        if on_batch:
            on_batch(len(idx))
    return out


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 8,
    max_prompt_tokens: int = 1024, on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions of chat-formatted ``prompts``, decoded without special tokens."""
    def gen(_idx, enc):
        return model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)

    device = next(model.parameters()).device
    return _in_length_batches(tokenizer, prompts, batch_size, max_prompt_tokens, device, gen, on_batch)


@torch.no_grad()
def generate_routed(
    engine, tokenizer, prompts: Sequence[str], rows: Sequence, mode: str = "delta",
    max_new_tokens: int = 16, batch_size: int = 8, max_prompt_tokens: int = 1024,
    on_batch: Callable[[int], None] | None = None, **gen_kwargs,
) -> list[str]:
    """Like ``generate_texts``, but prompt i goes through ``rows[i]`` (its own user's adapters)."""
    if len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")

    def gen(idx, enc):
        return engine.generate([rows[i] for i in idx], enc["input_ids"], enc["attention_mask"], mode=mode,
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, **gen_kwargs)

    return _in_length_batches(tokenizer, prompts, batch_size, max_prompt_tokens, engine.device, gen, on_batch)
