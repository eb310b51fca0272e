"""The decoding engine: one step at a time over a batch of rows that may join and leave between steps.

Layout: one token matrix ``cols.seq`` (rows, width) shared by every model, prompts left-padded. The writer
(the base; the expert in mode "expert") has consumed ``n`` columns; each expert has consumed ``seen <= n``.
On a deferral expert k runs *one* read over columns ``[seen, n)`` of every row (its KV cache is append-only,
so the prefix is never re-encoded), which keeps all caches in the same column layout. Rows that do not defer
ride along: at batch 1 that is free and at small batches nearly so, since a decoding step is bound by reading
the weights, not by the rows.

Rows join at a step boundary: the experts first catch up to ``n``, the new rows' prompts are read by fresh
backbones, and the two blocks are aligned by padding the shorter on the left, then concatenated. Finished or
dropped rows leave at a step boundary (``elastic``) and free their cache rows; leading columns that are
padding in every row are cut. ``decode`` (collm.decoding.decode) runs a fixed batch instead: finished rows
ride along writing padding, which keeps a router's per-row tables and the static GPU runners in place.

Where is what: an expert is called in :meth:`Engine._expert_read` at a deferral (and reads the prompt up
front in :meth:`Engine._read_prompts`); the threshold is applied by :func:`collm.core.routing.route`, called
from :meth:`Engine._route`; a new kind of backbone implements :class:`collm.backends.base.Backbone`.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from collm.backends.base import Backbone, Columns
from collm.backends.hf import HFBackbone
from collm.backends.prepack import prepacked
from collm.core.head import DeferralHead
from collm.core.request import Request, Router, TokenEvent
from collm.core.routing import defer_prob, route
from collm.core.sampling import distribution, generator_for, pick, pick_log_probs, sample
from collm.decoding.detok import Detokenizer
from collm.errors import CollmError

GROW = 256  # the token matrix grows by this many columns at a time


@dataclass
class Stats:
    """Counters of one engine, owned and written by its loop only."""

    steps: int = 0
    expert_calls: int = 0
    """Expert reads at deferrals (and, in mode "expert", every read of the expert that writes)."""
    expert_tokens: int = 0
    """Real token positions those reads covered (padding excluded)."""
    expert_prefill_tokens: int = 0
    """Prompt positions the experts read up front, with the base."""
    drafted: int = 0
    """Deferred positions where the base wrote a stand-in token and went on (a row with ``lookahead`` > 1)."""
    checked: int = 0
    """Deferred positions whose token an expert gave or judged (every deferral, drafted or not)."""
    drafts_cut: int = 0
    """Checks that ended a row's draft at a stand-in token the expert did not keep."""
    discarded: int = 0
    """Drafted tokens dropped after such a cut (the base's wasted work)."""
    rewritten: int = 0
    """Base tokens an expert re-wrote after reading them (``rewind``)."""
    yielded: int = 0
    """Deferred positions where the base's token was written instead of an unsure expert's (``yield_below``)."""
    seam_windows: int = 0
    """Windows an expert with another tokenizer re-tokenized where the base's text met its own."""
    seam_cutbacks: int = 0
    """Of those, the windows where its tokens differed and its cache was cut back."""
    cross_forwards: int = 0
    """Forward passes of an expert with another tokenizer (its reads at a seam are part of the next one)."""
    seam_seconds: float = 0.0
    """Time such an expert spent on the text rather than its model: decoding, re-tokenizing, mapping spans."""
    seconds: float = 0.0


@dataclass
class _Entry:
    """One position of a row's pending draft: the column it was written in, who is to write it (0 = the base,
    whose token stands), the head's P(defer) there, the base's token there (None at a deferred position the
    check reaches at once), and for a sampling row the base's distribution the stand-in was drawn from."""

    column: int
    writer: int
    defer_prob: float
    guess: int | None
    base_probs: torch.Tensor | None = None


@dataclass
class _Row:
    handle: int
    request: Request
    prompt_len: int
    lead: int  # leading padding columns of this row in the token matrix
    detok: Detokenizer
    generator: torch.Generator | None
    override: int  # -1: the head routes; else the fixed writer (a row asking for "base" or "expert" alone)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent in events
    done: bool = False
    draft: list[_Entry] = field(default_factory=list)  # positions written since the row's first unchecked deferral
    rewinds: int = 0  # rewinds used (Request.max_rewinds)

    def judges_base(self) -> bool:
        """Whether the expert judges this row's base tokens (they stay pending until it has read them)."""
        return self.request.rewind > 0 and self.rewinds < self.request.max_rewinds

    def yields(self) -> bool:
        return self.request.yield_below > 0 and self.rewinds < self.request.max_rewinds


class Engine:
    """Decodes rows together; see the module docstring. ``add``/``drop`` may be called from any thread, ``step``
    from one thread at a time (it holds the models).

    ``mode``: the batch's mode (collm.core.request.MODES). In mode "collm" a row may ask for "base" or "expert"
    alone (it is then routed to that writer at every step). ``router``: replaces the threshold rule (its step
    index counts the batch's steps). ``backbones``: a function (model, role) -> Backbone, to put the models on
    other runners (static caches); default: in-process growing caches, or the object itself where a model
    already is a Backbone (a remote engine). ``elastic``: drop finished rows between steps. ``prepack``: run
    the large CPU linear layers on prepacked oneDNN weights while a batch is open (collm.backends.prepack).
    """

    def __init__(self, base, experts: list, head: DeferralHead, *, vocab: int, eos_ids: tuple[int, ...] = (),
                 pad_id: int = 0, tokenizer=None, mode: str = "collm", router: Router | None = None,
                 reencode_experts: bool = False, backbones=None, elastic: bool = True, prepack: bool = False):
        self.base, self.experts, self.head, self.vocab = base, list(experts), head, vocab
        self.eos_ids, self.pad_id, self.tokenizer = tuple(eos_ids), pad_id, tokenizer
        self.mode, self.router, self.elastic = mode, router, elastic
        self.reencode = reencode_experts
        self.make = backbones or self._default_backbone
        writer = self.experts[0] if mode == "expert" else base
        self.expert_models = [] if mode in ("base", "expert") else self.experts
        self.writer_model = writer
        self.use_head = mode in ("collm", "compose")
        # compose and proxy run their experts every step; the naive baseline re-reads the prefix at every call
        self.up_front = mode == "collm" and not reencode_experts
        self.stats = Stats()
        self._lock = threading.Lock()
        self._pending: list[tuple[int, list[int], Request]] = []
        self._dropped: set[int] = set()
        self._next_handle = 0
        self.prepack = prepack
        self._packing = ExitStack()  # the prepacked block, open while the engine has rows
        self._reset()

    # ---------------------------------------------------------------- the public surface

    def add(self, prompt_ids: list[int], request: Request) -> int:
        """Queue a row; it joins at the next step boundary. Returns its handle (the ``row`` of its events)."""
        if not prompt_ids:
            raise CollmError("the prompt is empty")
        bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab), None)
        if bad is not None:
            raise CollmError(f"the prompt holds token id {bad!r}, outside the vocabulary [0, {self.vocab})")
        if request.mode != self.mode and not (self.mode == "collm" and request.mode in ("base", "expert")):
            raise CollmError(f"a row in mode {request.mode!r} cannot join a batch in mode {self.mode!r}")
        if request.mode == "expert" and not self.experts:
            raise CollmError("mode 'expert' needs an expert")
        if any(getattr(e, "translates", False) for e in self.experts):
            if request.lookahead > 1 or request.rewind or request.yield_below:
                raise CollmError("lookahead and rewinds need an expert that shares the base's tokenizer: leave "
                                 "them at their defaults for this pair")
            if request.mode == "expert" and self.mode == "expert":
                raise CollmError("an expert with another tokenizer writes alone through the base's tokens: "
                                 "ask for mode 'expert' in a batch in mode 'collm'")
        if request.lookahead > 1:
            remote = [e for e in self.experts if getattr(e, "remote", False) or isinstance(e, Backbone)]
            if request.sampling.do_sample and remote:
                raise CollmError("a served expert gives tokens, not its distribution, so a sampling row cannot "
                                 "draft with it: use lookahead 1 or greedy decoding")
        if (request.rewind or request.yield_below) and any(getattr(e, "remote", False) or isinstance(e, Backbone)
                                                           for e in self.experts):
            raise CollmError("rewind and yield_below read the expert's probabilities; a served expert gives tokens: "
                             "leave them at 0")
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._pending.append((handle, list(prompt_ids), request))
        return handle

    def drop(self, handle: int) -> None:
        """The row leaves at the next step boundary (its client is gone); it gets no more events."""
        with self._lock:
            self._dropped.add(handle)

    @property
    def active(self) -> int:
        with self._lock:
            pending = len(self._pending)
        return pending + sum(not r.done for r in self.rows)

    def step(self) -> list[TokenEvent]:
        """One column for every active row; rows queued by ``add`` join first. Returns this step's events: one
        per row whose token there is final, several for a row whose draft a check kept, none for a row that is
        drafting ([] also when no row is active: loop while ``active``)."""
        started = time.perf_counter()
        with torch.inference_mode():
            self._boundary()
            if not any(not r.done for r in self.rows):
                return []
            events = self._step()
        self.stats.seconds += time.perf_counter() - started
        return events

    # ---------------------------------------------------------------- one step

    def _step(self) -> list[TokenEvent]:
        if self.mode == "collm":
            return self._step_collm()
        n, rows = self.n, self.rows
        choice, defer_probs = self._route()
        choice_host = choice.tolist()  # the one sync before the pick: which experts must run is control flow
        token, choice = self._write(choice, choice_host)
        if self._finished_rows:
            token = token.masked_fill(self.done, self.pad_id)
        self._ensure_width(n + 1)
        self.cols.seq[:, n] = token
        # the step's tokens for the host's work (text pieces, stop strings, events); on CPU a copy, not a stall
        token_host, p_host = token.tolist(), defer_probs.tolist()
        if self.mode == "compose":
            choice_host = choice.tolist()
        self.n = n + 1
        self.stats.steps += 1
        self.step_index += 1
        events = [self._event(row, token_host[i], choice_host[i], p_host[i])
                  for i, row in enumerate(rows) if not row.done]
        alive = [i for i, row in enumerate(rows) if not row.done]
        if len(alive) < len(rows):
            if self.elastic:
                self._keep(alive)  # finished rows leave now, so the writer reads only what goes on
            else:
                self.done = torch.tensor([row.done for row in rows], dtype=torch.bool, device=self.device)
                self._finished_rows = True
        if alive:
            self._read_writer()
        return events

    def _step_collm(self) -> list[TokenEvent]:
        """One column in mode collm. A row's token there is final (the base's, or an expert's at a deferral
        checked now) or part of a draft (the row drafts past a deferral, ``lookahead`` > 1). A check settles
        every pending draft of every row at once, with one read per expert; events go out for final tokens only."""
        n, rows = self.n, self.rows
        choice, defer_probs = self._route()
        choice_host, p_host = choice.tolist(), defer_probs.tolist()  # the one sync: the routing is control flow
        alive = [i for i, row in enumerate(rows) if not row.done]
        plain, drafting, check = [], [], False
        for i in alive:
            row = rows[i]
            if not choice_host[i] and not row.draft and not row.judges_base():
                plain.append(i)  # the base writes and nothing before it is pending: final now
                continue
            drafting.append(i)
            length = len(row.draft) + 1
            if length >= row.request.lookahead or len(row.ids) + length >= row.request.max_new_tokens:
                check = True  # this row's draft is full: check now
        # the base's tokens where it writes, and its stand-ins where a draft goes on past a deferral
        deferred = {i for i in drafting if choice_host[i]}
        wanted = plain + [i for i in drafting if i not in deferred or not check or rows[i].yields()]
        picked = self._base_tokens(wanted, deferred) if wanted else {}
        for i in drafting:
            guess, probs = picked.get(i, (None, None))
            rows[i].draft.append(_Entry(n, choice_host[i], p_host[i], guess, probs))
            self.stats.drafted += guess is not None and i in deferred
            check = check or guess in self.eos_ids  # a draft does not go on past its end
        final = {i: [(picked[i][0], 0, p_host[i])] for i in plain}
        column = n
        if check:
            settled, column = self._check(drafting)
            final.update(settled)
        tokens = [self.pad_id] * len(rows)
        for i in alive:
            tokens[i] = final[i][-1][0] if i in final else rows[i].draft[-1].guess
        self._ensure_width(column + 1)
        self.cols.seq[:, column] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.n = column + 1
        self.stats.steps += 1
        self.step_index += 1
        events = []
        for i in sorted(final):
            for token, source, p in final[i]:
                if rows[i].done:
                    break  # it ended (EOS, a stop string, its length) inside a draft: the rest is not written
                events.append(self._event(rows[i], token, source, p))
        alive = [i for i, row in enumerate(rows) if not row.done]
        if len(alive) < len(rows):
            if self.elastic:
                self._keep(alive)
            else:
                self.done = torch.tensor([row.done for row in rows], dtype=torch.bool, device=self.device)
                self._finished_rows = True
        if alive:
            self._read_writer()
        return events

    def _base_tokens(self, wanted: list[int], deferred: set[int]) -> dict[int, tuple[int, torch.Tensor | None]]:
        """The base's token for each row in ``wanted`` (greedy or drawn with the row's generator), and where it
        stands in for a deferred position of a sampling row, the distribution it was drawn from."""
        logits = self._writer_logits()
        greedy = logits.argmax(-1).tolist()
        out = {}
        for i in wanted:
            row = self.rows[i]
            settings = row.request.sampling
            if not settings.do_sample:
                out[i] = (greedy[i], None)
                continue
            probs = distribution(logits[i], settings)
            token = int(torch.multinomial(probs, 1, generator=row.generator)[0])
            out[i] = (token, probs if i in deferred else None)
        return out

    def _check(self, drafting: list[int]) -> tuple[dict[int, list[tuple[int, int, float]]], int]:
        """Settle the drafts of ``drafting`` rows: each expert reads once and gives its verdict at every pending
        position routed to it; a row keeps its draft up to the first stand-in its expert does not keep, where
        the expert's token goes. Returns each row's final (token, writer, P(defer)) and the column the step's
        tokens go in: where every row's draft was cut, the caches are cut back and the step writes there;
        a row cut earlier than the others keeps its dropped columns as masked holes (see ``_hole``)."""
        n, rows = self.n, self.rows
        sampling = [r.request.sampling for r in rows]
        wanted: dict[int, list[tuple[int, int]]] = {}
        for i in drafting:
            judged = rows[i].judges_base()
            for entry in rows[i].draft:
                if entry.writer or judged:  # a base token, where it is judged, by the first expert
                    wanted.setdefault(entry.writer or 1, []).append((i, entry.column))
        verdicts = {}
        for k, pairs in sorted(wanted.items()):
            self.stats.checked += len(pairs)
            expert = self.expert_backbones[k - 1]
            # deferrals at this column alone, or rows that sample on a server: the plain read (tokens or logits)
            now = [(i, c) for i, c in pairs if c == n and (expert.picks and sampling[i].do_sample
                                                         or all(c2 == n for _, c2 in pairs))]
            later = [pair for pair in pairs if pair not in now]
            if now:
                nxt = self._expert_read(k, rows=[i for i, _ in now], sampling=sampling)
                for i, c in now:
                    verdicts[k, i, c] = nxt.logits[i] if nxt.tokens is None else nxt.tokens[i]
            if later:
                nxt = self._expert_read(k, rows=sorted({i for i, _ in later}), sampling=sampling, check=later)
                for (i, c), verdict in zip(later, nxt.checked):
                    verdicts[k, i, c] = verdict
        settled, cuts = {}, {}
        for i in drafting:
            row, out, cut = rows[i], [], n
            for entry in row.draft:
                verdict = verdicts.get((entry.writer or 1, i, entry.column))
                if not entry.writer:
                    token, source, kept = (entry.guess, 0, True) if verdict is None or not row.judges_base() else \
                        self._rewind(row, entry, verdict)
                elif row.yields() and entry.guess is not None and \
                        float(_probs(verdict, row.request.sampling).max()) < row.request.yield_below:
                    token, source, kept = entry.guess, 0, True  # the expert is unsure: the base's token stands
                    row.rewinds += 1
                    self.stats.yielded += 1
                else:
                    token, kept = self._judge(row, entry, verdict)
                    source = entry.writer
                out.append((token, source, entry.defer_prob))
                if not kept:
                    cut = entry.column
                    self.stats.drafts_cut += entry.guess is not None
                    break
                if token in self.eos_ids:
                    break
            self.stats.discarded += len(row.draft) - len(out)
            row.draft = []
            settled[i] = out
            if out[-1][0] not in self.eos_ids:
                cuts[i] = cut
        live = [i for i, row in enumerate(rows) if not row.done and (i not in settled or i in cuts)]
        column = max((cuts.get(i, n) for i in live), default=n)
        if column < n:  # every row goes on from column ``column`` or before it: cut every cache back
            for backbone in (self.writer, *self.expert_backbones):
                backbone.cut(column)
        for i, cut in cuts.items():
            if cut < column:
                self._hole(i, cut, column)
        return settled, column

    def _judge(self, row: _Row, entry: _Entry, verdict: torch.Tensor) -> tuple[int, bool]:
        """The token at a deferred position from its expert's verdict (its logits there, or the token a server
        picked), and whether the base's stand-in stays. Greedy: the expert's argmax, kept where it is the
        stand-in. Sampling: speculative sampling's rule (Leviathan et al., 2023): keep the stand-in g drawn from
        the base's q with probability min(1, p(g) / q(g)), else draw from max(0, p - q), so the token follows
        the expert's p exactly as when the expert writes it at once."""
        if verdict.dim() == 0:  # a server's token
            token = int(verdict)
            return token, token == entry.guess
        settings = row.request.sampling
        if not settings.do_sample:
            token = int(verdict.argmax())
            return token, token == entry.guess
        if entry.guess is None:  # nothing drafted here: the expert's token, drawn as without drafting
            return int(sample(F.log_softmax(verdict[None] / settings.temperature, -1), settings.top_p,
                              row.generator)[0]), False
        p, q, g = distribution(verdict, settings), entry.base_probs, entry.guess
        if float(torch.rand((), generator=row.generator, device=p.device)) * float(q[g]) < float(p[g]):
            return g, True
        residual = (p - q).clamp_min(0)
        residual = residual if float(residual.sum()) > 0 else p
        return int(torch.multinomial(residual, 1, generator=row.generator)[0]), False

    def _rewind(self, row: _Row, entry: _Entry, verdict: torch.Tensor) -> tuple[int, int, bool]:
        """A base token the expert has read: where the expert gives it a probability below ``rewind``, the
        expert writes there instead (its greedy token, or one drawn from its distribution) and the draft is cut.
        Returns (token, writer, whether the base's token stays)."""
        settings = row.request.sampling
        probs = _probs(verdict, settings)
        if float(probs[entry.guess]) >= row.request.rewind:
            return entry.guess, 0, True
        row.rewinds += 1
        self.stats.rewritten += 1
        token = int(torch.multinomial(probs, 1, generator=row.generator)[0]) if settings.do_sample else \
            int(verdict.argmax())
        return token, 1, token == entry.guess

    def _hole(self, i: int, start: int, end: int) -> None:
        """Row ``i``'s columns [start, end) held a draft that was cut: they are masked for every model from now
        on (their cache entries stay but are never attended to), and the row's next token takes the position
        the first of them had."""
        self.cols.mask[i, start:end] = 0
        width = self.cols.positions.shape[1]
        self.cols.positions[i, end:] = self.cols.positions[i, start] + torch.arange(width - end,
                                                                                    device=self.device)

    def _route(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Who writes each row's next token (0 = the writer, k = expert k) and the head's P(Z != base)."""
        rows = len(self.rows)
        if not self.use_head:
            zero = torch.zeros(rows, dtype=torch.long, device=self.device)
            return zero, torch.zeros(rows, device=self.device)
        log_pz = self.head.log_probs(self._head_inputs())  # (B, M+1)
        defer_probs = defer_prob(log_pz)
        if self.router is None:
            rule = route(log_pz, self.thresholds, defer_probs)
        elif getattr(self.router, "reads_tokens", False):  # each row's newest token (what the head just read)
            rule = self.router(self.step_index, log_pz, self.cols.seq[:, self.n - 1])
        else:
            rule = self.router(self.step_index, log_pz)
        if self._overrides:
            rule = torch.where(self.override >= 0, self.override, rule)
        if self._finished_rows:
            rule = rule.masked_fill(self.done, 0)
        return rule, defer_probs

    def _write(self, choice: torch.Tensor, choice_host: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick each row's token from the model that writes it; experts catch up only where chosen."""
        sampling = [r.request.sampling for r in self.rows]
        generators = [r.generator for r in self.rows]
        if self.mode == "compose":
            return self._compose(sampling, generators)
        if self.mode == "proxy":
            return self._proxy(sampling, generators), choice
        # the writer's logits (its output embedding) are computed only if a row takes its token
        logits, picked = (self._writer_logits() if 0 in choice_host else self.logits), {}
        for k in sorted({c for c, row in zip(choice_host, self.rows) if c and not row.done}):
            rows_k = [i for i, c in enumerate(choice_host) if c == k and not self.rows[i].done]
            nxt = self._expert_read(k, rows=rows_k, sampling=sampling)
            if nxt.tokens is not None:
                picked[k] = nxt.tokens
            elif logits is None:  # every row's token comes from an expert
                logits = nxt.logits
            else:
                logits = torch.where((choice == k)[:, None], nxt.logits, logits)
        token = pick(self._writer_logits() if logits is None else logits, sampling, generators)
        for k, tokens in picked.items():
            token = torch.where(choice == k, tokens.to(token.device), token)
        return token, choice

    def _head_inputs(self) -> torch.Tensor:
        """The head's input: the writer's hidden state, and for a head that reads the base's next-token
        distribution its features too (then the writer's logits are computed at every step)."""
        if not self.head.needs_logits:
            return self.hidden
        return self.head.inputs(self.hidden, self._writer_logits())

    def _writer_logits(self) -> torch.Tensor:
        """The writer's next-token logits; after a lazy read (hidden state only) computed now, once."""
        if self.logits is None:
            self.logits = self.writer.logits_for(self.hidden)
        return self.logits

    def _expert_read(self, k: int, **kwargs):
        """Expert k (1-based) catches up to the writer's column: the one place a deferral calls an expert."""
        expert = self.expert_backbones[k - 1]
        start = 0 if getattr(expert, "reencode", False) else expert.seen  # the naive baseline re-reads all
        nxt = expert.read(self.cols, self.n, step=self.step_index, **kwargs)
        if nxt.seams is not None:
            self.stats.seam_windows += nxt.seams[0]
            self.stats.seam_cutbacks += nxt.seams[1]
            self.stats.cross_forwards += nxt.seams[2]
            self.stats.seam_seconds += nxt.seams[3]
        if self.n > start or expert.picks:
            self.stats.expert_calls += 1
            self.stats.expert_tokens += self._real(start, self.n)
        return nxt

    def _compose(self, sampling, generators):
        """Pick from the mixture sum_k pi_k P_k; every expert runs every step. Source: argmax_k pi_k P_k(token)."""
        temperature = torch.tensor([s.temperature if s.do_sample else 1.0 for s in sampling],
                                   device=self.device)[:, None]
        parts = [F.log_softmax(self.logits / temperature, -1)]
        for k in range(1, len(self.expert_backbones) + 1):
            parts.append(F.log_softmax(self._logits_of(self._expert_read(k)) / temperature, -1))
        joint = self.head.log_probs(self._head_inputs())[:, :, None] + torch.stack(parts, 1)  # (B, M+1, V)
        token = pick_log_probs(joint.logsumexp(1), sampling, generators)
        source = joint.gather(2, token[:, None, None].expand(-1, joint.shape[1], 1)).squeeze(-1).argmax(-1)
        return token, source.masked_fill(self.done, 0)

    def _proxy(self, sampling, generators):
        """Proxy tuning (Liu et al., 2024): log p_expert + log p_tuned - log p_untuned, where the writer (the
        pair's base) is the tuned small model, expert 1 the large expert, expert 2 the untuned small model."""
        temperature = torch.tensor([s.temperature if s.do_sample else 1.0 for s in sampling],
                                   device=self.device)[:, None]
        expert = self._logits_of(self._expert_read(1))
        untuned = self._logits_of(self._expert_read(2))
        scores = sum(sign * F.log_softmax(x / temperature, -1)
                     for sign, x in ((1, expert), (1, self.logits), (-1, untuned)))
        return pick_log_probs(F.log_softmax(scores, -1), sampling, generators)

    @staticmethod
    def _logits_of(nxt):
        if nxt.logits is None:
            raise CollmError("modes compose and proxy need each expert's full distribution: "
                             "a remote expert cannot serve them")
        return nxt.logits

    def _event(self, row: _Row, token: int, source: int, p: float) -> TokenEvent:
        """Host bookkeeping for one new token: its text piece, and whether it ends the row. Text that could be
        the start of a stop string is held back until it is known not to be one, so no piece is ever taken back."""
        row.ids.append(token)
        text = row.text + row.detok.add(token)
        reason = stopped_by = None
        if token in self.eos_ids or len(row.ids) >= row.request.max_new_tokens:
            text += row.detok.flush()
        if row.request.stop and (hit := _find_stop(row.text, text[len(row.text):], row.request.stop)):
            stopped_by, cut = hit
            text, reason = text[:cut], "stop"
        elif token in self.eos_ids:
            reason = "stop"
        elif len(row.ids) >= row.request.max_new_tokens:
            reason = "length"
        row.text = text
        row.done = reason is not None
        end = len(text) if row.done else len(text) - _held_back(text, row.request.stop)
        piece, row.sent = text[row.sent : end], max(row.sent, end)
        source = 1 if self.mode == "expert" else source
        consulted = self.use_head and row.override < 0  # a row asking for one writer alone is not routed
        return TokenEvent(row.handle, token, piece, source, p if consulted else 0.0, row.done, reason, stopped_by)

    # ---------------------------------------------------------------- joining and leaving

    def _boundary(self) -> None:
        """Apply what ``add`` and ``drop`` queued, and let finished rows go (elastic)."""
        with self._lock:
            pending, self._pending = self._pending, []
            dropped, self._dropped = self._dropped, set()
        pending = [p for p in pending if p[0] not in dropped]
        for row in self.rows:
            if row.handle in dropped:
                row.done = True
        if self.elastic and self.rows:
            keep = [i for i, r in enumerate(self.rows) if not r.done]
            if len(keep) < len(self.rows):
                self._keep(keep)
        if pending:
            self._join(pending)
        if self.elastic and not self.rows:
            self._reset()

    def _reset(self) -> None:
        self._packing.close()
        self.rows: list[_Row] = []
        self.writer: Backbone | None = None
        self.expert_backbones: list[Backbone] = []
        self.n = 0
        self.step_index = 0
        self.cols = self.logits = self.hidden = None
        self.done = self.thresholds = self.override = None
        self.device = next(self.base.parameters()).device

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        for backbone in (self.writer, *self.expert_backbones):
            backbone.keep(index)
        self.cols = Columns(*(t.index_select(0, index) for t in (self.cols.seq, self.cols.mask,
                                                                    self.cols.positions)))
        self.logits = None if self.logits is None else self.logits.index_select(0, index)
        self.hidden = None if self.hidden is None else self.hidden.index_select(0, index)
        for name in ("done", "thresholds", "override"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self._overrides = any(r.override >= 0 for r in self.rows)
        self._finished_rows = False
        self._trim()

    def _trim(self) -> None:
        """Cut leading columns that are padding in every row (rows with long prompts have left)."""
        cut = min(r.lead for r in self.rows)
        if cut <= 0:
            return
        for backbone in (self.writer, *self.expert_backbones):
            backbone.pad_left(-cut)
        self.cols = Columns(*(t[:, cut:] for t in (self.cols.seq, self.cols.mask, self.cols.positions)))
        self.n -= cut
        for row in self.rows:
            row.lead -= cut
            for entry in row.draft:
                entry.column -= cut

    def _join(self, pending: list[tuple[int, list[int], Request]]) -> None:
        """New rows read their prompts with fresh backbones; then both blocks are aligned and concatenated."""
        new_rows, cols = self._new_rows(pending)
        width = cols.seq.shape[1]
        if not self.rows:
            if self.prepack:
                self._packing.enter_context(prepacked(m for m in (self.base, *self.experts)
                                                      if isinstance(m, torch.nn.Module)))
            self.cols, self.n, self.rows = cols, width, new_rows
            self.writer = self.make(self.writer_model, "writer")
            self.expert_backbones = [self.make(m, "expert") for m in self.expert_models]
            self.logits, self.hidden = self._read_prompts(self.writer, self.expert_backbones, cols, width)
            self._set_row_tensors()
            return
        writer = self.writer.fresh(len(new_rows))
        lazy = self.logits is None  # the batch's writer logits wait until a row needs them: the new rows' too
        nxt = writer.read(cols, width, hidden=self.use_head, **({"logits": False} if lazy else {}))
        logits, hidden = nxt.logits, nxt.hidden
        compact, n = cols, max(self.n, width)
        if n > self.n:
            self._pad_left(self.writer, self.expert_backbones, n - self.n, self.rows)
            self.cols = _pad_columns(self.cols, n - self.n, self.pad_id)
            self.n = n
        if n > width:
            self._pad_left(writer, [], n - width, new_rows)
            cols = _pad_columns(cols, n - width, self.pad_id)
        expert_backbones = [self._join_expert(expert, compact, n - width, len(new_rows))
                            for expert in self.expert_backbones]
        cols = _widen(cols, self.cols.seq.shape[1], self.pad_id)
        self.cols = Columns(*(torch.cat([a, b]) for a, b in zip(
            (self.cols.seq, self.cols.mask, self.cols.positions), (cols.seq, cols.mask, cols.positions))))
        self.writer.extend(writer)
        for mine, theirs in zip(self.expert_backbones, expert_backbones):
            mine.extend(theirs)
        self.logits = None if lazy else torch.cat([self.logits, logits])
        self.hidden = None if hidden is None else torch.cat([self.hidden, hidden])
        self.rows += new_rows
        self._set_row_tensors()

    def _join_expert(self, expert, compact: Columns, shift: int, rows: int):
        """Joining rows' cache for ``expert``, read as far as the batch's expert has read (``expert.seen``), so
        the blocks align without making the expert catch up first. ``compact``: the new rows' prompts, to be
        placed at column ``shift``; what lies past ``seen`` is read with the next catch-up, with everyone's."""
        new = expert.fresh(rows)
        upto = expert.seen - shift  # the compact columns the batch's expert has read
        if upto > 0 and not expert.picks:
            new.read(compact, upto)
            self.stats.expert_prefill_tokens += _real_tokens(compact, 0, upto)
        new.pad_left(expert.seen - new.seen)
        return new

    @staticmethod
    def _pad_left(writer, expert_backbones, columns: int, rows: list[_Row]) -> None:
        for backbone in (writer, *expert_backbones):
            backbone.pad_left(columns)
        for row in rows:
            row.lead += columns
            for entry in row.draft:
                entry.column += columns

    def _new_rows(self, pending) -> tuple[list[_Row], Columns]:
        cols = layout([ids for _, ids, _ in pending], self.pad_id, self.device)
        width = cols.seq.shape[1]
        rows = []
        for handle, ids, request in pending:
            override = {"base": 0, "expert": 1}.get(request.mode, -1) if self.mode == "collm" else -1
            rows.append(_Row(handle, request, len(ids), width - len(ids), Detokenizer(self.tokenizer),
                             generator_for(request.sampling, self.device), override))
        return rows, cols

    def _set_row_tensors(self) -> None:
        self.done = torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=self.device)
        self.thresholds = torch.tensor([r.request.threshold for r in self.rows], device=self.device)
        self.override = torch.tensor([r.override for r in self.rows], dtype=torch.long, device=self.device)
        # host flags that let a step skip work no row needs
        self._overrides = any(r.override >= 0 for r in self.rows)
        self._finished_rows = any(r.done for r in self.rows)

    def _read_prompts(self, writer, expert_backbones, cols: Columns, end: int):
        """The writer reads the prompts, and in mode collm so do the experts, up front: a deferral then costs
        one catch-up over the tokens written since, not a prompt-length prefill in the middle of decoding."""
        nxt = writer.read(cols, end, hidden=self.use_head)
        if self.mode == "expert":
            self.stats.expert_calls += 1
            self.stats.expert_tokens += _real_tokens(cols, 0, end)
        if self.up_front:
            for expert in expert_backbones:
                if not expert.picks:
                    expert.read(cols, end)
                self.stats.expert_prefill_tokens += _real_tokens(cols, 0, end)
        return nxt.logits, nxt.hidden

    def _read_writer(self) -> None:
        start = self.writer.seen
        # in mode collm the head decides first; the writer's output embedding runs only for rows it writes
        lazy = self.mode == "collm" and self.use_head and getattr(self.writer, "lazy_logits", False)
        nxt = self.writer.read(self.cols, self.n, hidden=self.use_head, **({"logits": False} if lazy else {}))
        self.logits, self.hidden = nxt.logits, nxt.hidden
        if self.mode == "expert":
            self.stats.expert_calls += 1
            self.stats.expert_tokens += self._real(start, self.n)

    def _real(self, start: int, end: int) -> int:
        """Real (non-padding) token positions in columns [start, end), summed over rows, from the host layout."""
        return sum(max(0, end - max(start, row.lead)) for row in self.rows)

    def _ensure_width(self, width: int) -> None:
        if self.cols.seq.shape[1] < width:
            self.cols = _widen(self.cols, width + GROW, self.pad_id)

    def _default_backbone(self, model, role: str) -> Backbone:
        """A model that already is a backbone (a remote engine) as it is; a ``transformers`` model in process."""
        if isinstance(model, Backbone):
            return model
        if getattr(model, "remote", False) or getattr(model, "translates", False):
            return model.backbone()  # an expert on a serving engine, or with another tokenizer (collm.backends)
        return HFBackbone(model, self.vocab, reencode=self.reencode and role == "expert")


def _probs(logits: torch.Tensor, settings) -> torch.Tensor:
    """(V,) the distribution a row would draw from given a model's logits (greedy rows: temperature 1)."""
    return distribution(logits, settings) if settings.do_sample else logits.float().softmax(-1)


def layout(prompts: list[list[int]], pad_id: int, device, extra: int = 0) -> Columns:
    """Left-pad prompts into one (B, P + extra) matrix; mask and positions cover the extra columns too."""
    prompt_len = max(len(p) for p in prompts)
    rows, width = len(prompts), prompt_len + extra
    seq = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.ones(rows, width, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        seq[row, prompt_len - len(ids) : prompt_len] = torch.tensor(ids, dtype=torch.long)
        mask[row, : prompt_len - len(ids)] = 0
    # The same positions `transformers` gives left-padded rows, so outputs match its `generate` exactly.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return Columns(seq, mask, positions)


def _real_tokens(cols: Columns, start: int, end: int) -> int:
    return int(cols.mask[:, start:end].sum())


def _pad_columns(cols: Columns, columns: int, pad_id: int) -> Columns:
    """Prepend ``columns`` padding columns."""
    return Columns(F.pad(cols.seq, (columns, 0), value=pad_id), F.pad(cols.mask, (columns, 0), value=0),
                   F.pad(cols.positions, (columns, 0), value=1))


def _widen(cols: Columns, width: int, pad_id: int) -> Columns:
    """Append columns (not yet written) up to ``width``, their positions laid out ahead (each row's counts on)."""
    extra = width - cols.seq.shape[1]
    if extra <= 0:
        return cols
    ahead = cols.positions[:, -1:] + torch.arange(1, extra + 1, device=cols.positions.device)
    return Columns(F.pad(cols.seq, (0, extra), value=pad_id), F.pad(cols.mask, (0, extra), value=1),
                   torch.cat([cols.positions, ahead], 1))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (and so must not be sent yet)."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


def _find_stop(text: str, piece: str, stops: tuple[str, ...]) -> tuple[str, int] | None:
    """The stop string that the new ``piece`` completes, and where it starts in ``text + piece``."""
    full = text + piece
    hits = []
    for stop in stops:
        at = full.find(stop, max(0, len(text) - len(stop) + 1))
        if at >= 0:
            hits.append((at, stop))
    if not hits:
        return None
    at, stop = min(hits)
    return stop, at
