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


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 8,
    max_prompt_tokens: int = 1024, on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions of chat-formatted ``prompts``, decoded without special tokens.

    Prompts longer than ``max_prompt_tokens`` keep their END (the question), since
    truncation on the right would cut off the instruction being answered.
    """
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    out: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = [chat_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        if on_batch:
            on_batch(len(chunk))
    return out


@torch.no_grad()
def generate_routed(
    engine, tokenizer, prompts: Sequence[str], rows: Sequence, mode: str = "delta",
    max_new_tokens: int = 16, batch_size: int = 8, max_prompt_tokens: int = 1024,
    on_batch: Callable[[int], None] | None = None, **gen_kwargs,
) -> list[str]:
    """Like ``generate_texts``, but row i goes through ``rows[i]`` (its own users' adapters)."""
    if len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [chat_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_tokens, add_special_tokens=False).to(engine.device)
        gen = engine.generate(list(rows[start:start + batch_size]), enc["input_ids"], enc["attention_mask"],
                              mode=mode, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        if on_batch:
            on_batch(len(chunk))
    return out
