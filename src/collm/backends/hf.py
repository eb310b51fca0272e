"""The in-process backbone: a ``transformers`` causal LM on a growing (dynamic) KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from collm.backends.base import Columns, Next
from collm.backends.models import plain_logits
from collm.errors import CollmError


def split_decoder(model) -> torch.nn.Module | None:
    """The model's decoder (its layers without the output embedding) where the logits are exactly the output
    embedding applied to the decoder's last hidden state, so the two may run apart; else None."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) and plain_logits(model) else None
    if isinstance(decoder, torch.nn.Module) and isinstance(model.get_output_embeddings(), torch.nn.Module):
        return decoder
    return None


def output_logits(model, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, vocab) float32 next-token logits from last hidden states (n, H), for a model ``split_decoder`` split."""
    return model.get_output_embeddings()(hidden)[:, :vocab].float()


class HFBackbone:
    """One ``transformers`` model with its own KV cache in the shared column layout (see collm.backends.base).

    ``reencode``: forget the cache and re-read the prefix at every read: the naive baseline for benchmarks.
    ``lazy_logits``: ``read(..., hidden=True, logits=False)`` runs the model without its output embedding and
    ``logits_for(hidden)`` applies it later, only if the logits are needed (models whose logits are exactly
    that product). The model object is only called, never modified.
    """

    picks = False

    def __init__(self, model: torch.nn.Module, vocab: int, reencode: bool = False, rows: int = 0):
        self.model, self.vocab, self.reencode = model, vocab, reencode
        self.rows = rows  # known before any read for a backbone made by ``fresh``, whose cache may stay empty
        self.cache = DynamicCache(config=model.config)
        self.seen = 0
        self.last: Next | None = None
        self.decoder = split_decoder(model)
        self.lazy_logits = self.decoder is not None

    def read(self, cols: Columns, end: int, *, hidden: bool = False, rows=None, sampling=None, step: int = 0,
             logits: bool = True, check=None) -> Next:
        """Consume columns [seen, end) in one forward. Where nothing is new (``end == seen``: a deferral right
        after the up-front prefill) the last read's answer is returned without a forward. ``logits=False``
        (with ``hidden``, where ``lazy_logits``): the hidden state only; ``logits_for`` gives the logits.
        ``check``: see the Backbone protocol; the output embedding runs only at the pairs asked for."""
        if check:
            return self._check(cols, end, list(check), hidden)
        lazy = not logits and hidden and self.lazy_logits
        if end == self.seen and self.last is not None and not self.reencode and (self.last.hidden is not None
                                                                                  or not hidden):
            if self.last.logits is None and not lazy:
                self.last = Next(logits=self.logits_for(self.last.hidden), hidden=self.last.hidden)
            return self.last
        if self.reencode:
            self.cache, self.seen = DynamicCache(config=self.model.config), 0
        start, self.seen = self.seen, end
        if lazy:
            out = self.decoder(input_ids=cols.seq[:, start:end], attention_mask=cols.mask[:, :end],
                               position_ids=cols.positions[:, start:end], cache=self.cache, use_cache=True)
            self.last = Next(hidden=out.last_hidden_state[:, -1])
            return self.last
        out = self.model(
            input_ids=cols.seq[:, start:end],
            attention_mask=cols.mask[:, :end],
            position_ids=cols.positions[:, start:end],
            cache=self.cache,
            use_cache=True,
            output_hidden_states=hidden,
            logits_to_keep=1,
        )
        self.last = Next(logits=out.logits[:, -1, : self.vocab].float(),
                         hidden=out.hidden_states[-1][:, -1] if hidden else None)
        return self.last

    def read_rows(self, cols: Columns, end: int, rows: list[int]) -> torch.Tensor | None:
        """Consume columns [seen, end) for ``rows`` only, in one forward over those rows; the other rows' new
        columns must be masked (their cache entries there are zeros, never attended to). Returns the rows'
        next-token logits (len(rows), vocab), or None where the cache cannot be split by rows (nothing read yet,
        or a layer whose length is not the matrix's, such as a sliding window): then call :meth:`read`.

        A read costs compute for every row it holds, masked or not, so where few rows of a batch have new
        tokens this is the cheaper forward; the copies of those rows' cache entries cost memory traffic only."""
        layers = [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]
        if self.reencode or not layers or end <= self.seen or \
                any(layer.keys.dim() != 4 or layer.keys.shape[2] != self.seen for layer in layers) or \
                len(layers) != len(self.cache.layers):
            return None
        index = torch.tensor(rows, dtype=torch.long, device=cols.seq.device)
        full = [(layer.keys, layer.values) for layer in layers]
        start = self.seen
        try:
            for layer, (keys, values) in zip(layers, full):
                layer.keys, layer.values = keys.index_select(0, index), values.index_select(0, index)
            out = self.model(input_ids=cols.seq[index, start:end], attention_mask=cols.mask[index, :end],
                             position_ids=cols.positions[index, start:end], cache=self.cache, use_cache=True,
                             logits_to_keep=1)
            def grown(old: torch.Tensor, read: torch.Tensor) -> torch.Tensor:  # all rows; zeros where masked
                new = old.new_zeros((old.shape[0], old.shape[1], end - start, old.shape[3]))
                new[index] = read[:, :, start:]
                return torch.cat([old, new], 2)

            for layer, (keys, values) in zip(layers, full):
                layer.keys, layer.values = grown(keys, layer.keys), grown(values, layer.values)
        except BaseException:
            for layer, (keys, values) in zip(layers, full):
                layer.keys, layer.values = keys, values
            raise
        self.seen, self.last = end, None
        return out.logits[:, -1, : self.vocab].float()

    def _check(self, cols: Columns, end: int, pairs: list[tuple[int, int]], hidden: bool) -> Next:
        """One forward over [seen, end) that keeps every column's output, for a draft's check. The verdict for
        column c is the output at column c - 1: this read's for c > seen, the previous read's for c = seen.
        Where the decoder and the output embedding run apart, the embedding runs at the pairs only."""
        if self.reencode:
            raise CollmError("the re-encoding baseline does not check drafts")
        start = self.seen
        outputs = last_hidden = None
        if end > start:
            kwargs = dict(input_ids=cols.seq[:, start:end], attention_mask=cols.mask[:, :end],
                          position_ids=cols.positions[:, start:end], cache=self.cache, use_cache=True)
            if self.decoder is not None:
                outputs = self.decoder(**kwargs).last_hidden_state  # (rows, L, H): hidden states
                last_hidden = outputs[:, -1]
            else:
                out = self.model(**kwargs, output_hidden_states=hidden, logits_to_keep=0)
                outputs = out.logits[:, :, : self.vocab].float()  # (rows, L, V): logits
                last_hidden = out.hidden_states[-1][:, -1] if hidden else None
            self.seen = end
        checked = torch.empty(len(pairs), self.vocab, dtype=torch.float32, device=cols.seq.device)
        fresh = [(i, row, c) for i, (row, c) in enumerate(pairs) if c > start]
        if fresh:
            index = [i for i, _, _ in fresh]
            found = outputs[[row for _, row, _ in fresh], [c - start - 1 for _, _, c in fresh]]
            checked[index] = self.logits_for(found) if self.decoder is not None else found
        old = [(i, row) for i, (row, c) in enumerate(pairs) if c == start]
        if old:
            if self.last is None:
                raise CollmError("internal: a check at the first unread column needs the previous read's output")
            rows = [row for _, row in old]
            logits = self.last.logits[rows] if self.last.logits is not None else self.logits_for(self.last.hidden[rows])
            checked[[i for i, _ in old]] = logits
        if outputs is not None:
            logits = None if self.decoder is not None else outputs[:, -1]
            self.last = Next(logits=logits, hidden=last_hidden)
        return Next(hidden=None if self.last is None else self.last.hidden, checked=checked)

    def cut(self, columns: int) -> None:
        if columns >= self.seen:
            return
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, :columns], layer.values[:, :, :columns]
        self.seen, self.last = columns, None

    @torch.inference_mode()
    def logits_for(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) float32 next-token logits from hidden states a lazy read returned."""
        return output_logits(self.model, hidden, self.vocab)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        if self.last is not None:
            self.last = Next(logits=None if self.last.logits is None else self.last.logits[rows],
                             hidden=None if self.last.hidden is None else self.last.hidden[rows])

    def pad_left(self, columns: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                if columns >= 0:
                    layer.keys = F.pad(layer.keys, (0, 0, columns, 0))
                    layer.values = F.pad(layer.values, (0, 0, columns, 0))
                else:
                    layer.keys, layer.values = layer.keys[:, :, -columns:], layer.values[:, :, -columns:]
        self.seen += columns

    def fresh(self, rows: int) -> "HFBackbone":
        return HFBackbone(self.model, self.vocab, self.reencode, rows)

    def extend(self, other: "HFBackbone") -> None:
        assert other.seen == self.seen, "rows join only in the same column layout"
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if getattr(theirs, "keys", None) is None:  # joining rows with nothing read yet: all padding so far
                empty = mine.keys.new_zeros((other.rows, *mine.keys.shape[1:]))
                theirs.keys, theirs.values = empty, empty
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        same_kind = self.last is not None and other.last is not None and \
            (self.last.logits is None) == (other.last.logits is None)
        if same_kind:
            hidden = None if self.last.hidden is None or other.last.hidden is None else \
                torch.cat([self.last.hidden, other.last.hidden])
            logits = None if self.last.logits is None else torch.cat([self.last.logits, other.last.logits])
            self.last = Next(logits=logits, hidden=hidden)
        else:
            self.last = None
