"""Incremental detokenisation: the text each new token adds, at a cost that does not grow with the answer."""

from __future__ import annotations

# How many tokens before the newest are decoded with it: enough context for tokenizers that attach spaces
# to the next token or split a character across byte-level tokens (a UTF-8 character spans at most 4).
CONTEXT = 6


class Detokenizer:
    """Feed one row's tokens one at a time; each call returns the text that token adds.

    Decoding tokens alone breaks characters split across byte-level tokens and drops the spaces some
    tokenizers attach to the next token, so each piece is the difference of two decodings of a short window
    ending at the newest token (``prefix`` is where the window starts, ``read`` where the emitted text ends).
    A piece is "" while the last token holds only part of a character; the token that completes it carries
    it. The pieces join to exactly ``tokenizer.decode(all_ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start (token index)
        self.read = 0  # tokens whose text has been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # an incomplete character: wait for the token that completes it
        piece = after[len(before) :]
        self.read = len(self.ids)
        self.prefix = max(0, self.read - CONTEXT)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def flush(self) -> str:
        """The text still held back (a row that ends inside a character), as a full decode would show it."""
        if self.tokenizer is None or self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.read = len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""
