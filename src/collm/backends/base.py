"""The one seam between the decoding loop and a model: a backbone reads columns of the shared token matrix.

Layout (see collm.decoding.engine): one token matrix ``Columns.seq`` (rows, width) is shared by every model;
prompts are left-padded, so a column means the same thing to every model and every row. A backbone has
consumed ``seen`` columns; ``read(cols, end)`` consumes ``[seen, end)`` in one call and returns what the model
says about the next token. A new kind of backbone (in-process, static-cache, remote engine, ...) implements
this protocol and nothing in the loop changes. Counters live with the loop (``collm.decoding.engine.Stats``),
which knows from its own layout how many real tokens each read covered; a backbone keeps no counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from collm.core.request import Sampling


@dataclass
class Columns:
    """The shared token matrix and what every model needs to read it."""

    seq: torch.Tensor
    """(rows, width) long: token ids; padding columns hold the pad id."""
    mask: torch.Tensor
    """(rows, width) long: 1 for a real token, 0 for left padding (columns not yet written count as 1)."""
    positions: torch.Tensor
    """(rows, width) long: each token's position in its own row (``transformers``' left-padding positions)."""

    @property
    def rows(self) -> int:
        return self.seq.shape[0]

    def row_ids(self, row: int, end: int) -> list[int]:
        """Row ``row``'s real tokens in columns [0, end) (padding dropped): what a stateless backbone sends."""
        ids = self.seq[row, :end]
        return ids[self.mask[row, :end].bool()].tolist()


@dataclass
class Next:
    """What a backbone says about the next token of every row after a read."""

    logits: torch.Tensor | None = None
    """(rows, vocab) float32 next-token logits; None from a backbone that picks tokens itself (``picks``)."""
    hidden: torch.Tensor | None = None
    """(rows, hidden) last hidden state at the last column read, where ``hidden=True`` was asked."""
    tokens: torch.Tensor | None = None
    """(rows,) long: the tokens a picking backbone chose (-1 for rows it was not asked about)."""
    checked: torch.Tensor | None = None
    """For a read with ``check`` pairs (row, column): the model's next-token logits at each pair, (N, vocab)
    float32, i.e. its distribution for the token in that column given the columns before it; from a picking
    backbone its greedy token there, (N,) long."""
    seams: tuple[int, int, int, float] | None = None
    """From an expert with another tokenizer (collm.backends.cross): the seams this read re-tokenized, how many of
    them cut its cache back, the forward passes its model ran (one per token of its own it wrote), and the
    seconds spent on the text (decoding the base's tokens, re-tokenizing seams, writing spans as base tokens)."""


@runtime_checkable
class Backbone(Protocol):
    """A model the loop can read from. ``picks``: True where the backbone returns chosen tokens (a remote
    engine samples on its side) instead of logits; such a backbone cannot serve modes that need the full
    distribution (compose, proxy).

    Optional: a backbone with ``lazy_logits = True`` accepts ``read(..., hidden=True, logits=False)``, which
    returns the hidden state only, and ``logits_for(hidden)``, which gives the logits from it. The loop then
    runs the writer's output embedding only at steps where some row takes the writer's token."""

    seen: int
    picks: bool

    def read(self, cols: Columns, end: int, *, hidden: bool = False, rows: Sequence[int] | None = None,
             sampling: Sequence[Sampling] | None = None, step: int = 0,
             check: Sequence[tuple[int, int]] | None = None) -> Next:
        """Consume columns ``[seen, end)`` (every row, in one call; ``end == seen`` repeats the last answer) and
        set ``seen = end``. ``rows``: the rows whose next token is needed (a remote backbone sends only these;
        None = all). ``sampling``: each row's settings, for a backbone that picks; ``step`` the row's new-token
        index, for seeding. ``check``: (row, column) pairs, ``seen_before <= column <= end``, whose next-token
        verdicts to return as ``Next.checked`` (a draft's check: one read gives them all). Raises CollmError
        when the model cannot be reached or refuses the input."""
        ...

    def cut(self, columns: int) -> None:
        """Forget every column from ``columns`` on, in every row (a draft was cut back); ``seen`` drops to it."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (a 1-D long tensor of row indices, in order): the others finished or left."""
        ...

    def pad_left(self, columns: int) -> None:
        """Prepend ``columns`` padding columns to every row (the token matrix grew on the left); a negative
        number drops that many leading columns, which are padding in every row (the matrix shrank)."""
        ...

    def fresh(self, rows: int) -> "Backbone":
        """An empty backbone over the same model for ``rows`` rows about to join (it may be padded to the
        batch's ``seen`` without reading anything: those rows' tokens all lie past it)."""
        ...

    def extend(self, other: "Backbone") -> None:
        """Append ``other``'s rows (read to the same ``seen``, in the same column layout) after this one's."""
        ...
