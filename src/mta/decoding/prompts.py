"""Prompts: the chat template around a task prompt, and the tokens a turn ends on.

Prompts go through the model's chat template when it has one (instruct models). The end of
an assistant turn is what an adapter learns to emit and what every decoder stops on.
"""

from __future__ import annotations


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
