"""Who wrote which token: per-token text pieces and their rendering for the terminal."""

from __future__ import annotations

from rich.text import Text

# expert k is drawn in STYLES[k]; the base keeps the terminal's own color
STYLES = ["", "bold magenta", "bold cyan", "bold green", "bold yellow", "bold blue"]


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, such that ``"".join(pieces)`` equals the decoded text.

    Decoding tokens one at a time breaks characters split across byte-level tokens and drops the spaces
    some tokenizers attach to the next token, so each piece is the difference of two prefix decodings.
    """
    pieces, text = [], ""
    for end in range(1, len(ids) + 1):
        piece, text = _extend(tokenizer, ids[:end], text)
        pieces.append(piece)
    return pieces


def _extend(tokenizer, ids: list[int], previous: str) -> tuple[str, str]:
    """(what decoding ``ids`` adds to ``previous``, the text so far); the piece is "" while the last token
    holds only part of a character, which then belongs to the token that completes it."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return (text[len(previous):], text) if text.startswith(previous) else ("", previous)


def style_of(source: int) -> str:
    return STYLES[source] if source < len(STYLES) else "bold red"


def colored(tokenizer, ids: list[int], sources: list[int]) -> Text:
    """A rich Text with each token in the style of the model that wrote it."""
    text = Text()
    for piece, source in zip(token_pieces(tokenizer, ids), sources):
        text.append(piece, style=style_of(source))
    return text


def legend(expert_names: list[str]) -> Text:
    text = Text("base", style=style_of(0) or "default")
    for k, name in enumerate(expert_names, start=1):
        text.append("  ")
        text.append(f"expert {k}: {name}", style=style_of(k))
    return text


class Stream:
    """Prints one row's tokens as they are written, each in its writer's style (for ``on_token``)."""

    def __init__(self, console, tokenizer, row: int = 0):
        self.console, self.tokenizer, self.row = console, tokenizer, row
        self.ids: list[int] = []
        self.text = ""

    def __call__(self, tokens: list[int], sources: list[int], done: list[bool]) -> None:
        if done[self.row]:
            return
        self.ids.append(tokens[self.row])
        piece, self.text = _extend(self.tokenizer, self.ids, self.text)
        if piece:
            self.console.print(Text(piece, style=style_of(sources[self.row])), end="")
