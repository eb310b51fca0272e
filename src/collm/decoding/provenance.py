"""Who wrote which token: per-token text pieces and their rendering for the terminal."""

from __future__ import annotations

from rich.text import Text

from collm.decoding.detok import Detokenizer

# expert k is drawn in STYLES[k]; the base keeps the terminal's own color
STYLES = ["", "bold magenta", "bold cyan", "bold green", "bold yellow", "bold blue"]


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, such that ``"".join(pieces)`` equals the decoded text (collm.decoding.detok)."""
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces


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
        self.detok = Detokenizer(tokenizer)

    def __call__(self, tokens: list[int], sources: list[int], done: list[bool]) -> None:
        if done[self.row]:
            return
        piece = self.detok.add(tokens[self.row])
        if piece:
            self.console.print(Text(piece, style=style_of(sources[self.row])), end="")
