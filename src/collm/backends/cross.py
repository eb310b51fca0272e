"""An expert with its own tokenizer: collaboration across model families, through the text.

The shared state is the text. The token matrix holds the base's tokens (the head decides at the base's
positions); the expert keeps its own tokens of the same text, in its own KV cache, one per row. When it is
asked for a token (a deferral) it first reads what it has not seen:

- **The seam.** Text the base wrote after the expert's last token is tokenized by the expert's tokenizer
  together with the expert's last ``window`` tokens (a token boundary of the base need not be one of the
  expert's: the base's " 4" + "2" is the expert's " 42"); where that re-tokenization differs from what the
  expert had read, its cache is cut back to the last token both agree on and the rest is read anew. So the
  expert reads the text as its own tokenizer writes it, up to a window.
- **A deferral** lets the expert write one of its own tokens (several, where one holds only part of a
  character). Its text is written into the matrix as the base's tokenizer writes it, one base token per step:
  while the head keeps deferring, the next base token of the same expert text follows without another call to
  the expert; when the text is complete the expert's own token goes into its cache as it wrote it (never
  re-tokenized). Where the head stops deferring inside it, the base writes on and only the text written counts.

Exact where it can be stated: a head that never defers gives the base's own greedy text (the expert is not
called); one that always defers gives the expert's own greedy text, tokenized as the expert wrote it; with one
tokenizer for both the expert reads the base's tokens as they are (today's path). Chat prompts are mapped from
the base's chat template to the expert's (one user turn; other text is passed as it is).

The base's side of a seam is not re-tokenized: the base reads the expert's text as its tokenizer writes that
span alone, so at a seam it may read a tokenization it would not itself produce (it reads; it does not need to
be exact where the expert writes). Drafting (``lookahead``), rewinds, and the modes that need the expert's full
distribution over the base's vocabulary (compose, proxy) are refused with such an expert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from collm.backends.base import Columns, Next
from collm.backends.hf import HFBackbone
from collm.backends.models import vocab_size
from collm.core.request import Sampling
from collm.core.sampling import distribution
from collm.errors import CollmError

_SENTINEL = "\u2063collm-turn\u2063"  # an invisible separator no chat template or user text contains
WINDOW = 2  # expert tokens re-tokenized with the new text at a seam
MAX_SPAN = 4  # expert tokens one deferral may take to complete a character
COMPACT_AT = 32  # masked columns in the longest row's part of the matrix before the matrix is compacted


def same_vocab(a, b) -> bool:
    """Whether two tokenizers map every token string to the same id (one vocabulary)."""
    return a is b or a.get_vocab() == b.get_vocab()


class ChatMap:
    """Maps a prompt rendered with the base's chat template (one user turn, generation prompt) to the same turn
    in the expert's template; any other text passes unchanged (minus the base's BOS text)."""

    def __init__(self, base_tokenizer, expert_tokenizer):
        self.base = _turn(base_tokenizer)
        self.expert = _turn(expert_tokenizer)
        self.base_bos = getattr(base_tokenizer, "bos_token", None) or ""

    def __call__(self, text: str) -> tuple[str, bool]:
        """(the expert's text, whether it came from a chat template: then no special tokens are added)."""
        if self.base is not None:
            prefix, suffix = self.base
            end = text.find(suffix, len(prefix)) if text.startswith(prefix) else -1
            if end >= 0:
                content, rest = text[len(prefix):end], text[end + len(suffix):]
                if self.expert is None:
                    return content + "\n" + rest, False
                return self.expert[0] + content + self.expert[1] + rest, True
        if self.base_bos and text.startswith(self.base_bos):
            text = text[len(self.base_bos):]
        return text, False


def _turn(tokenizer) -> tuple[str, str] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                             tokenize=False)
    prefix, found, suffix = rendered.partition(_SENTINEL)
    return (prefix, suffix) if found and prefix else None


class CrossExpert:
    """An in-process expert whose tokenizer differs from the base's. ``CrossExpert(model, tokenizer,
    base_tokenizer)``; the engine takes it as an expert and decodes through :meth:`backbone`."""

    translates = True

    def __init__(self, model, tokenizer, base_tokenizer, *, window: int = WINDOW, row_reads: bool = True):
        """``row_reads``: in a batch, each forward runs over only the rows with new tokens (False: over every
        row, the others masked; the same tokens, slower: for benchmarks)."""
        self.model, self.tokenizer, self.base_tokenizer = model, tokenizer, base_tokenizer
        self.row_reads = row_reads
        self.config = model.config
        self.name_or_path = getattr(model, "name_or_path", "")
        self.window = window
        self.same = same_vocab(tokenizer, base_tokenizer)
        self.chat = ChatMap(base_tokenizer, tokenizer)
        self.eos = _eos_ids(tokenizer, model)
        base_eos = getattr(base_tokenizer, "eos_token_id", None)
        if base_eos is None:
            raise CollmError("the base's tokenizer has no EOS token: an expert's end of text cannot be written")
        self.base_eos = int(base_eos)

    def parameters(self):
        return self.model.parameters()

    def backbone(self) -> "CrossBackbone":
        return CrossBackbone(self)

    def base_ids(self, text: str) -> list[int]:
        """``text`` as the base's tokenizer writes it (a span on its own)."""
        return self.base_tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


def _next_of_span(span_base: list[int], start: int, ids: list[int]) -> int | None:
    """The next base token of a deferral's text while it is still being written (the row's tokens since
    ``start`` are the first of ``span_base``); None where it is written out or the base wrote on inside it."""
    written = ids[start:]
    if len(written) < len(span_base) and written == span_base[:len(written)]:
        return span_base[len(written)]
    return None


class _ThroughText:
    """What both backbones of an expert with another tokenizer share: they follow the base's columns
    (``seen``) but can never take them back."""

    seen: int

    def cut(self, columns: int) -> None:
        if columns < self.seen:
            raise CollmError("an expert with another tokenizer cannot take back columns (no drafting or rewinds)")

    def pad_left(self, columns: int) -> None:
        self.seen += columns


@dataclass
class _Own:
    """One row as the expert sees it: its tokens of the row's text (``ids``) and where each ends in that text,
    the text of a deferral still being written (its tokens, their text, and the same text in the base's tokens),
    and where the row stands in the expert's own token matrix (the tokens there, their columns, the next
    position, and the expert's next-token logits after them, while they are valid)."""

    ids: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    text: str = ""  # the expert's text the ids cover
    span: list[int] = field(default_factory=list)
    span_text: str = ""
    span_base: list[int] = field(default_factory=list)
    span_start: int = 0  # the row's base tokens when the span was written (its base tokens follow)
    base_len: int = 0  # the base's tokens the ids hold (one vocabulary: the ids are the base's tokens)
    placed: list[int] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)
    position: int = 0
    logits: torch.Tensor | None = None


class CrossBackbone(_ThroughText):
    """The :class:`~collm.backends.base.Backbone` of a :class:`CrossExpert`: tokens picked on this side
    (``picks``), returned in the base's vocabulary.

    The expert runs on its own token matrix (rows x columns, in its vocabulary) through an in-process
    :class:`~collm.backends.hf.HFBackbone`, so the rows that need its next token in one step share one forward
    pass. Rows advance by different numbers of the expert's tokens: a row with fewer new tokens than the
    others gets masked columns before them (never attended to), and a cut-back masks the columns it drops."""

    picks = True

    def __init__(self, expert: CrossExpert, rows: int = 0):
        self.expert = expert
        self.seen = 0
        self.rows = [_Own() for _ in range(rows)]
        self.device = next(expert.model.parameters()).device
        self.inner = HFBackbone(expert.model, vocab_size(expert.model), rows=rows)
        self.cols = Columns(*(torch.zeros((rows, 0), dtype=torch.long, device=self.device) for _ in range(3)))
        self.windows = self.cutbacks = self.forwards = self.compactions = 0
        self.subset_forwards = 0  # forwards over only the rows with new tokens (HFBackbone.read_rows)
        self.seconds = 0.0  # on the text, not the model (see Next.seams)
        self.model_seconds = 0.0

    # ---------------------------------------------------------------- the Backbone protocol

    def read(self, cols: Columns, end: int, *, hidden: bool = False, rows: Sequence[int] | None = None,
             sampling: Sequence[Sampling] | None = None, step: int = 0,
             check: Sequence[tuple[int, int]] | None = None) -> Next:
        if hidden:
            raise CollmError("an expert with another tokenizer gives no hidden states at the base's positions")
        if check:
            raise CollmError("drafting (lookahead) needs an expert that shares the base's tokenizer")
        if cols.rows != len(self.rows):
            self._ensure(cols.rows)
        self.seen = end
        windows, cutbacks, forwards, seconds = self.windows, self.cutbacks, self.forwards, self.seconds
        started, model = time.perf_counter(), self.model_seconds
        asked = list(range(cols.rows)) if rows is None else [int(r) for r in rows]
        settings = {r: sampling[r] if sampling is not None else Sampling() for r in asked}
        tokens = torch.full((cols.rows,), -1, dtype=torch.long)
        writers = []
        for r in asked:
            token = self._follow(self.rows[r], cols.row_ids(r, end))
            if token is None:
                writers.append(r)
            else:
                tokens[r] = token
        if writers:
            self._write(writers, settings, step)
            for r in writers:
                tokens[r] = self._first_base_token(self.rows[r], cols.row_ids(r, end))
        self.seconds += time.perf_counter() - started - (self.model_seconds - model)
        return Next(tokens=tokens, seams=(self.windows - windows, self.cutbacks - cutbacks,
                                          self.forwards - forwards, self.seconds - seconds))

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[int(i)] for i in rows]
        index = rows.to(self.device)
        if self.inner.seen:
            self.inner.keep(index)
        self.inner.rows = len(self.rows)
        self.cols = Columns(*(t.index_select(0, index) for t in (self.cols.seq, self.cols.mask, self.cols.positions)))

    def fresh(self, rows: int = 0) -> "CrossBackbone":
        return CrossBackbone(self.expert, rows)

    def extend(self, other: "CrossBackbone") -> None:
        """Append the joining rows: they have read nothing yet, so their part of the matrix is all masked."""
        width = self.cols.seq.shape[1]
        if other.cols.seq.shape[1]:
            raise CollmError("internal: joining rows of an expert with another tokenizer have read already")
        count = len(other.rows)
        blank = torch.zeros((count, width), dtype=torch.long, device=self.device)
        self.cols = Columns(torch.cat([self.cols.seq, blank]), torch.cat([self.cols.mask, blank]),
                            torch.cat([self.cols.positions, blank]))
        other.inner.pad_left(self.inner.seen)
        other.inner.rows = count
        if self.inner.seen:
            self.inner.extend(other.inner)
        else:
            self.inner = HFBackbone(self.expert.model, self.inner.vocab, rows=len(self.rows) + count)
        self.inner.rows = len(self.rows) + count
        self.rows += other.rows

    def _ensure(self, rows: int) -> None:
        """The rows of the batch this backbone was made for before it knew them (the engine's first block)."""
        if self.inner.seen or rows < len(self.rows):
            raise CollmError(f"internal: {rows} rows read by an expert that holds {len(self.rows)}")
        self.rows += [_Own() for _ in range(rows - len(self.rows))]
        self.inner = HFBackbone(self.expert.model, self.inner.vocab, rows=rows)
        self.cols = Columns(*(torch.zeros((rows, 0), dtype=torch.long, device=self.device) for _ in range(3)))

    # ---------------------------------------------------------------- one row's text

    def _follow(self, own: _Own, base_ids: list[int]) -> int | None:
        """Bring the row's expert tokens up to its text. Returns the next base token of a deferral still being
        written, or None: the expert writes a new one (its tokens, ``own.ids``, are then what it must read)."""
        expert = self.expert
        if expert.same:  # one vocabulary: the expert reads the base's tokens as they are (no seam)
            own.ids += base_ids[own.base_len:]
            own.base_len = len(base_ids)
            return None
        if own.span:
            following = _next_of_span(own.span_base, own.span_start, base_ids)
            if following is not None:
                return following  # still being written: the expert has nothing new to read
        text, templated = expert.chat(expert.base_tokenizer.decode(base_ids, skip_special_tokens=False))
        text = text.rstrip("\ufffd")  # a character the base has only begun waits for its other bytes
        if own.span:
            covered = own.ends[-1] if own.ends else 0
            if base_ids[own.span_start:] == own.span_base and text[covered:].startswith(own.span_text):
                own.ids += own.span  # written out: the expert's own tokens go in, as it wrote them
                own.ends += [covered + len(own.span_text)] * len(own.span)
                own.text = text
            own.span = []  # else the base wrote on inside the expert's text: only what was written counts
        self._sync(own, text, templated)
        if not own.ids:
            raise CollmError("the expert's prompt is empty in its own tokenization")
        return None

    def _first_base_token(self, own: _Own, base_ids: list[int]) -> int:
        """The first base token of the span the expert just wrote (its EOS as the base's)."""
        expert = self.expert
        if expert.same:
            return own.span[-1]
        if own.span[-1] in expert.eos:
            return expert.base_eos
        own.span_base, own.span_start = expert.base_ids(own.span_text), len(base_ids)
        return own.span_base[0] if own.span_base else expert.base_eos  # tokens without text only: the end

    def _sync(self, own: _Own, text: str, templated: bool) -> None:
        """Bring the row's expert tokens up to ``text`` (the expert's view of the whole row): re-tokenize the
        seam (the expert's last ``window`` tokens and the new text) and cut the cache back where it differs."""
        covered = own.ends[-1] if own.ends else 0
        if text[:covered] != own.text[:covered]:  # an earlier character changed (a split one was completed)
            keep = next((i for i, e in enumerate(own.ends) if text[:e] != own.text[:e]), len(own.ends))
            self._truncate(own, keep)
            covered = own.ends[-1] if own.ends else 0
        own.text = text
        if len(text) == covered:
            return
        start_tok = max(0, len(own.ids) - self.expert.window)
        start = own.ends[start_tok - 1] if start_tok else 0
        enc = self.expert.tokenizer(text[start:], add_special_tokens=start_tok == 0 and not templated,
                                    return_offsets_mapping=True)
        ids, ends = enc["input_ids"], [start + e for _, e in enc["offset_mapping"]]
        old, old_ends = own.ids[start_tok:], own.ends[start_tok:]
        same = 0
        while same < min(len(ids), len(old)) and ids[same] == old[same] and ends[same] == old_ends[same]:
            same += 1
        if own.ids:
            self.windows += 1
        if same < len(old):
            self.cutbacks += 1
        self._truncate(own, start_tok + same)
        own.ids += ids[same:]
        own.ends += ends[same:]

    def _truncate(self, own: _Own, keep: int) -> None:
        """Keep the row's first ``keep`` tokens (the matrix masks the rest at the next forward)."""
        del own.ids[keep:], own.ends[keep:]

    # ---------------------------------------------------------------- the expert writes

    def _write(self, writers: list[int], settings: dict[int, Sampling], step: int) -> None:
        """Rows ``writers`` get the expert's next token (more while the text holds only part of a character),
        in one forward pass per token for all of them. Sets each row's span and its text."""
        expert = self.expert
        spans: dict[int, list[int]] = {r: [] for r in writers}
        texts: dict[int, str] = {r: "" for r in writers}
        context = {r: self.rows[r].ids[-8:] for r in writers}
        before = {r: expert.tokenizer.decode(context[r], skip_special_tokens=True) for r in writers}
        generators = {}
        for r in writers:
            if settings[r].do_sample:
                generators[r] = torch.Generator(device=self.device)
                generators[r].manual_seed((settings[r].seed * 1_000_003 + step) % (2**63 - 1))
        going = list(writers)
        for _ in range(1 if expert.same else MAX_SPAN):
            self._place({r: self.rows[r].ids + spans[r] for r in going})
            still = []
            for r in going:
                logits = self.rows[r].logits
                token = int(logits.argmax()) if not settings[r].do_sample else \
                    int(torch.multinomial(distribution(logits, settings[r]), 1, generator=generators[r])[0])
                spans[r].append(token)
                if token in expert.eos:
                    continue
                # special tokens add no text (as in a decode that skips them): the expert writes on after them
                after = expert.tokenizer.decode(context[r] + spans[r], skip_special_tokens=True)
                texts[r] = after[len(before[r]):] if after.startswith(before[r]) else ""
                if not texts[r] or texts[r].endswith("\ufffd"):
                    still.append(r)
            going = still
            if not going:
                break
        for r in writers:
            own = self.rows[r]
            own.span = spans[r]
            own.span_text = "" if spans[r][-1] in expert.eos else texts[r].rstrip("\ufffd")

    def _compact(self, at: int | None = None) -> None:
        """Drop the masked columns once there are ``at`` of them beside the row with the most tokens.

        Every forward adds columns to every row (masked where a row reads less or nothing), and a cut-back masks
        the columns it drops, so the matrix outgrows its rows by the number of forwards. Each row keeps its
        tokens' columns in their order, right-aligned, and its cache entries with them: positions are explicit,
        and a row's keys keep their order, so every later query sees exactly the keys it saw before."""
        rows, width = self.cols.seq.shape
        keep = max((len(own.columns) for own in self.rows), default=0)
        layers = [layer for layer in self.inner.cache.layers
                  if getattr(layer, "keys", None) is not None and layer.keys.numel()]
        if not rows or width - keep < (COMPACT_AT if at is None else at) or self.inner.seen != width \
                or any(layer.keys.shape[2] != width for layer in layers):  # a sliding-window layer: left as is
            return
        index = torch.zeros((rows, keep), dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, keep), dtype=torch.long, device=self.device)
        for r, own in enumerate(self.rows):
            if own.columns:
                index[r, keep - len(own.columns):] = torch.tensor(own.columns, dtype=torch.long)
                mask[r, keep - len(own.columns):] = 1
                own.columns = list(range(keep - len(own.columns), keep))
        self.cols = Columns(self.cols.seq.gather(1, index), mask, self.cols.positions.gather(1, index))
        for layer in layers:
            at_rows = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, at_rows), layer.values.gather(2, at_rows)
        self.inner.seen = keep
        self.compactions += 1

    def _place(self, wants: dict[int, list[int]]) -> None:
        """Make the matrix hold ``wants[r]`` for each row r (cutting back where it differs, masking the columns
        dropped) and run the expert once over the new columns; each row's ``logits`` are then the expert's
        next-token logits after its tokens."""
        new: dict[int, list[int]] = {}
        for r, want in wants.items():
            own = self.rows[r]
            same = 0
            while same < min(len(own.placed), len(want)) and own.placed[same] == want[same]:
                same += 1
            if same == len(want) and same == len(own.placed) and own.logits is not None:
                continue  # already read, and its answer is known
            if same == len(want):  # nothing new but the answer is not known: read the last token again
                same -= 1
            if same < len(own.placed):
                self.cols.mask[r, own.columns[same:]] = 0
                own.position = int(self.cols.positions[r, own.columns[same]])
                del own.placed[same:], own.columns[same:]
            new[r] = want[same:]
        if not new:
            return
        self._compact()
        width, extra = self.cols.seq.shape[1], max(len(t) for t in new.values())
        rows = len(self.rows)
        seq = torch.full((rows, extra), 0, dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, extra), dtype=torch.long, device=self.device)
        positions = torch.zeros((rows, extra), dtype=torch.long, device=self.device)
        for r, tokens in new.items():
            own, start = self.rows[r], extra - len(tokens)
            seq[r, start:] = torch.tensor(tokens, dtype=torch.long)
            mask[r, start:] = 1
            positions[r, start:] = own.position + torch.arange(len(tokens))
            own.placed += tokens
            own.columns += list(range(width + start, width + extra))
            own.position += len(tokens)
        for r, own in enumerate(self.rows):  # masked columns: any position; a row with tokens keeps counting
            if r not in new:
                positions[r] = own.position
        self.cols = Columns(torch.cat([self.cols.seq, seq], 1), torch.cat([self.cols.mask, mask], 1),
                            torch.cat([self.cols.positions, positions], 1))
        started = time.perf_counter()
        readers = sorted(new)
        # A forward costs compute for every row it holds, masked or not: where only some rows have new
        # tokens (most steps of a batch: the rows that defer), only they go through the model.
        logits = self.inner.read_rows(self.cols, width + extra, readers) \
            if self.expert.row_reads and len(readers) < rows else None
        if logits is None:
            logits = self.inner.read(self.cols, width + extra).logits[readers]
        else:
            self.subset_forwards += 1
        self.model_seconds += time.perf_counter() - started
        self.forwards += 1
        for r, answer in zip(readers, logits):  # other rows keep theirs: masked columns change nothing after them
            self.rows[r].logits = answer


# ---------------------------------------------------------------- an expert on a server, through its text


class RemoteTextExpert:
    """An expert on a completions server (collm.backends.remote) whose tokenizer differs from the base's: it
    reads each row's text (the server tokenizes it; its prefix cache keeps the part it has read) and writes
    text. ``RemoteTextExpert(RemoteExpert(spec, tokenizer, check=False), tokenizer)``; CoLLM.load makes one
    where a served expert's vocabulary is not the base's.

    The server reads the whole text as its own tokenizer writes it, every time (not only a window at the
    seam); where the expert wrote a token its tokenizer would not produce for that text, it reads the
    canonical one. A deferral is one request for the rows that defer in that step (per sampling setting)."""

    translates = True
    remote = True

    def __init__(self, served, base_tokenizer):
        self.served, self.base_tokenizer = served, base_tokenizer
        self.config, self.name_or_path = served.config, served.name_or_path
        self.chat = ChatMap(base_tokenizer, None)
        rendered = served.chat_turn(_SENTINEL)
        if rendered is not None:
            prefix, found, suffix = rendered.partition(_SENTINEL)
            self.chat.expert = (prefix, suffix) if found and prefix else None
        base_eos = getattr(base_tokenizer, "eos_token_id", None)
        if base_eos is None:
            raise CollmError("the base's tokenizer has no EOS token: an expert's end of text cannot be written")
        self.base_eos = int(base_eos)

    @property
    def identity(self) -> str:
        return self.served.identity

    @property
    def url(self) -> str:
        return self.served.url

    def backbone(self) -> "TextBackbone":
        return TextBackbone(self)

    def base_ids(self, text: str) -> list[int]:
        return self.base_tokenizer(text, add_special_tokens=False)["input_ids"]

    def close(self) -> None:
        self.served.close()


@dataclass
class _Span:
    """The text of a row's last deferral in the base's tokens, and the row's base tokens when it was written."""

    base: list[int] = field(default_factory=list)
    start: int = 0


class TextBackbone(_ThroughText):
    """The :class:`~collm.backends.base.Backbone` of a :class:`RemoteTextExpert`: tokens picked on the server,
    returned in the base's vocabulary, one base token per step while the head keeps deferring (as
    :class:`CrossBackbone` does). Nothing is cached on this side."""

    picks = True

    def __init__(self, expert: RemoteTextExpert, rows: int = 0):
        self.expert = expert
        self.seen = 0
        self.rows = [_Span() for _ in range(rows)]
        self.requests = 0
        self.seconds = 0.0  # on the text (decoding, mapping, the base's tokenization), not the server

    def read(self, cols: Columns, end: int, *, hidden: bool = False, rows: Sequence[int] | None = None,
             sampling: Sequence[Sampling] | None = None, step: int = 0,
             check: Sequence[tuple[int, int]] | None = None) -> Next:
        if hidden:
            raise CollmError(f"the remote expert at {self.expert.url} has no hidden states to give")
        if check:
            raise CollmError("drafting (lookahead) needs an expert that shares the base's tokenizer")
        self.rows += [_Span() for _ in range(cols.rows - len(self.rows))]
        self.seen = end
        started, requests, waited = time.perf_counter(), self.requests, 0.0
        asked = list(range(cols.rows)) if rows is None else [int(r) for r in rows]
        tokens = torch.full((cols.rows,), -1, dtype=torch.long)
        groups: dict[tuple[Sampling, bool], list[tuple[int, str]]] = {}
        for r in asked:
            ids, span = cols.row_ids(r, end), self.rows[r]
            following = _next_of_span(span.base, span.start, ids)
            if following is not None:
                tokens[r] = following  # the deferral's text is still being written
                continue
            text, templated = self.expert.chat(self.expert.base_tokenizer.decode(ids, skip_special_tokens=False))
            setting = sampling[r] if sampling is not None else Sampling()
            groups.setdefault((setting, templated), []).append((r, text.rstrip("\ufffd")))
        for (setting, templated), group in groups.items():
            asking = time.perf_counter()
            texts = self._write([t for _, t in group], setting, step, templated)
            waited += time.perf_counter() - asking
            for (r, _), (text, ended) in zip(group, texts):
                span = self.rows[r]
                span.base, span.start = ([], 0) if ended or not text else \
                    (self.expert.base_ids(text), len(cols.row_ids(r, end)))
                tokens[r] = span.base[0] if span.base else self.expert.base_eos
        seconds = time.perf_counter() - started - waited
        self.seconds += seconds
        return Next(tokens=tokens, seams=(0, 0, self.requests - requests, seconds))

    def _write(self, prompts: list[str], setting: Sampling, step: int, templated: bool) -> list[tuple[str, bool]]:
        """The expert's next token's text after each prompt; where a token holds only part of a character (or
        no text), up to MAX_SPAN tokens, so that whole characters come back; an empty text ends the row."""
        served = self.expert.served
        out = served.complete_text(prompts, setting, step, add_special_tokens=not templated)
        self.requests += 1
        short = [i for i, (text, ended) in enumerate(out) if not ended and not text.rstrip("\ufffd")]
        if short:
            more = served.complete_text([prompts[i] for i in short], setting, step, max_tokens=MAX_SPAN,
                                        add_special_tokens=not templated)
            self.requests += 1
            for i, answer in zip(short, more):
                out[i] = answer
        return [(text.rstrip("\ufffd"), ended) for text, ended in out]

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[int(i)] for i in rows]

    def fresh(self, rows: int = 0) -> "TextBackbone":
        return TextBackbone(self.expert, rows)

    def extend(self, other: "TextBackbone") -> None:
        self.rows += other.rows
