"""A request's text as its tokens arrive, decoded incrementally.

The scheduler streams each running row's new text after every decode step. Decoding a
row's whole token list again at every step costs O(tokens) per row per step on the host,
beside a GPU step of a few milliseconds (docs/performance.md, run H). tokenizers'
``DecodeStream`` decodes only the new token, holding back bytes that do not yet make a
whole character; a slow (Python) tokenizer falls back to decoding the whole list.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class TextStream:
    """The text of one sequence's tokens so far, whole characters only (``text``): always a
    prefix of ``tokenizer.decode`` of the same tokens, which it may trail by the rest of a
    token that ends inside a character (a byte-level token such as "Ġ" + a lead byte holds
    back its space too, until the character is whole). At the end ``final`` is the
    tokenizer's own decode of every token (incomplete bytes as U+FFFD), so a finished
    answer is exactly what ``tokenizer.decode`` gives; a stop string is found once its
    characters are whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        fast = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._fast = fast
        self._stream = DecodeStream(skip_special_tokens=True) if fast is not None else None
        self._n = 0
        self.text = ""

    def update(self, tokens: list[int]) -> str:
        """Take the tokens added since the last call (``tokens`` is the whole list); the text."""
        if self._stream is None:
            self.text = self.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
        else:
            for t in tokens[self._n:]:
                piece = self._stream.step(self._fast, t)
                if piece:
                    self.text += piece
        self._n = len(tokens)
        return self.text

    def final(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
