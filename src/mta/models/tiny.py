"""A tiny random-init Llama and a byte-level tokenizer: unit tests need no weights.

The tokenizer maps every UTF-8 byte to a token (no merges), adds ChatML specials and
a ChatML chat template, so prompts go through the same code path as a real model.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:2]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, layers: int = 2, hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )


# Llama-3-8B's shape (vocab included): speed and memory at 8B without its weights. The
# byte tokenizer uses the first 259 ids; decoding skips the others.
LLAMA3_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256)


def random_llama(shape: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A seeded random Llama of the given shape, built directly on ``device`` in ``dtype``
    (an 8B model is never materialised in fp32 on the host), with the byte tokenizer."""
    tok = tiny_tokenizer()
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prev = torch.get_default_dtype()
    gen = torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else [])
    with gen:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model, tok


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2,
               hidden: int = 64, family: str = "llama") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A deterministic random Llama (seeded) and its byte tokenizer; ``family="qwen2"``
    builds the same dimensions as Qwen2 blocks (biased q/k/v projections: the registry's
    Qwen2.5-Coder family), for tests of family-specific paths such as ``mta.fused``."""
    tok = tiny_tokenizer()
    cfg = tiny_config(len(tok), layers=layers, hidden=hidden)
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps",
                "pad_token_id", "eos_token_id")
        cfg, build = Qwen2Config(**{k: getattr(cfg, k) for k in keys}), Qwen2ForCausalLM
    elif family == "llama":
        build = LlamaForCausalLM
    else:
        raise ValueError(f"tiny models are llama or qwen2, not {family!r}")
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = build(cfg)
    model.to(dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model, tok
