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
from collm.core.request import Sampling
from collm.core.sampling import distribution
from collm.errors import CollmError

_SENTINEL = "\u2063collm-turn\u2063"  # an invisible separator no chat template or user text contains
WINDOW = 2  # expert tokens re-tokenized with the new text at a seam
MAX_SPAN = 4  # expert tokens one deferral may take to complete a character


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

    def __init__(self, model, tokenizer, base_tokenizer, *, window: int = WINDOW):
        self.model, self.tokenizer, self.base_tokenizer = model, tokenizer, base_tokenizer
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


@dataclass
class _Own:
    """One row as the expert sees it: its tokens of the row's text, where each ends in that text, how many its
    cache holds, and the text of a deferral still being written (its tokens, their text, chars written)."""

    ids: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    text: str = ""  # the expert's text the ids cover
    cache: object = None
    cached: int = 0
    span: list[int] = field(default_factory=list)
    span_text: str = ""
    span_base: list[int] = field(default_factory=list)  # the span's text as the base's tokens
    span_start: int = 0  # the row's base tokens when the span was written (its base tokens follow)
    base_len: int = 0  # the base's tokens the ids hold (one vocabulary: the ids are the base's tokens)


class CrossBackbone:
    """The :class:`~collm.backends.base.Backbone` of a :class:`CrossExpert`: one cache per row, tokens picked on
    this side (``picks``), returned in the base's vocabulary."""

    picks = True

    def __init__(self, expert: CrossExpert, rows: int = 0):
        self.expert = expert
        self.seen = 0
        self.rows = [_Own() for _ in range(rows)]
        self.windows = self.cutbacks = self.forwards = 0
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
        self._ensure(cols.rows)
        self.seen = end
        windows, cutbacks, forwards, seconds = self.windows, self.cutbacks, self.forwards, self.seconds
        tokens = torch.full((cols.rows,), -1, dtype=torch.long)
        for r in range(cols.rows) if rows is None else rows:
            r = int(r)
            settings = sampling[r] if sampling is not None else Sampling()
            started, model = time.perf_counter(), self.model_seconds
            tokens[r] = self._next(self.rows[r], cols.row_ids(r, end), settings, step)
            self.seconds += time.perf_counter() - started - (self.model_seconds - model)
        return Next(tokens=tokens, seams=(self.windows - windows, self.cutbacks - cutbacks, self.forwards - forwards,
                                               self.seconds - seconds))

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[int(i)] if int(i) < len(self.rows) else _Own() for i in rows]

    def cut(self, columns: int) -> None:
        if columns < self.seen:
            raise CollmError("an expert with another tokenizer cannot take back columns (no drafting or rewinds)")

    def pad_left(self, columns: int) -> None:
        self.seen += columns

    def fresh(self, rows: int = 0) -> "CrossBackbone":
        return CrossBackbone(self.expert, rows)

    def extend(self, other: "CrossBackbone") -> None:
        self.rows += other.rows

    def _ensure(self, rows: int) -> None:
        self.rows += [_Own() for _ in range(rows - len(self.rows))]

    # ---------------------------------------------------------------- one row

    def _next(self, own: _Own, base_ids: list[int], settings: Sampling, step: int) -> int:
        """The row's next token in the base's vocabulary: the next base token of a deferral being written, or
        the first of a new one the expert writes now."""
        expert = self.expert
        if expert.same:  # one vocabulary: the expert reads the base's tokens as they are (no seam)
            own.ids += base_ids[own.base_len:]
            own.base_len = len(base_ids)
            self._write(own, settings, step)
            return own.span[0]
        if own.span:
            written = base_ids[own.span_start:]
            if written == own.span_base[:len(written)] and len(written) < len(own.span_base):
                return own.span_base[len(written)]  # still being written: the expert has nothing new to read
        text, templated = expert.chat(expert.base_tokenizer.decode(base_ids, skip_special_tokens=False))
        text = text.rstrip("\ufffd")  # a character the base has only begun waits for its other bytes
        if own.span:
            covered = own.ends[-1] if own.ends else 0
            if base_ids[own.span_start:] == own.span_base and text[covered:].startswith(own.span_text):
                own.ids += own.span  # written out: the expert's own tokens go in, as it wrote them
                own.ends += [covered + len(own.span_text)] * len(own.span)
                own.text = text
            else:  # the base wrote on inside the expert's text: only what was written counts
                self._truncate(own, len(own.ids))
            own.span = []
        self._sync(own, text, templated)
        if not own.ids:
            raise CollmError("the expert's prompt is empty in its own tokenization")
        self._write(own, settings, step)
        if own.span[-1] in expert.eos:
            return expert.base_eos
        own.span_base, own.span_start = expert.base_ids(own.span_text), len(base_ids)
        if not own.span_base:  # only tokens without text (special tokens that are not EOS): the end
            return expert.base_eos
        return own.span_base[0]

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
        """Keep the row's first ``keep`` tokens; the cache forgets the rest."""
        del own.ids[keep:], own.ends[keep:]
        if own.cached > keep:
            for layer in own.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys, layer.values = layer.keys[:, :, :keep], layer.values[:, :, :keep]
            own.cached = keep

    def _write(self, own: _Own, settings: Sampling, step: int) -> None:
        """The expert writes: its next token (and more while the text holds only part of a character). The
        span's tokens stay in the cache; they join the row's ids once the matrix holds their text."""
        expert = self.expert
        generator = None
        if settings.do_sample:
            generator = torch.Generator(device=next(expert.model.parameters()).device)
            generator.manual_seed((settings.seed * 1_000_003 + step) % (2**63 - 1))
        context = own.ids[-8:]
        before = expert.tokenizer.decode(context, skip_special_tokens=True)
        span, text = [], ""
        for _ in range(1 if expert.same else MAX_SPAN):
            logits = self._logits(own, span)
            token = int(logits.argmax()) if not settings.do_sample else \
                int(torch.multinomial(distribution(logits, settings), 1, generator=generator)[0])
            span.append(token)
            if token in expert.eos:
                break
            # special tokens add no text (as in a decode that skips them): the expert writes on after them
            after = expert.tokenizer.decode(context + span, skip_special_tokens=True)
            text = after[len(before):] if after.startswith(before) else ""
            if text and not text.endswith("\ufffd"):
                break
        own.span, own.span_text = span, "" if span[-1] in expert.eos else text.rstrip("\ufffd")

    def _logits(self, own: _Own, span: list[int]) -> torch.Tensor:
        """The expert's next-token logits after the row's ids and ``span``, reading only what its cache lacks."""
        from transformers import DynamicCache

        model = self.expert.model
        if own.cache is None:
            own.cache = DynamicCache()
        pending = (own.ids + span)[own.cached:]
        device = next(model.parameters()).device
        started = time.perf_counter()
        out = model(input_ids=torch.tensor([pending], dtype=torch.long, device=device), cache=own.cache,
                    use_cache=True)
        own.cached += len(pending)
        self.forwards += 1
        self.model_seconds += time.perf_counter() - started
        return out.logits[0, -1].float()
