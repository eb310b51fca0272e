"""TEMPORARY stand-in for ``CoLLM.engine()`` until the decoding engine lands on main; delete it then.

Implements the engine interface (add / step / drop / active) over ``CoLLM.generate``, one request at a time:
each ``step`` decodes one whole waiting request and returns all of its events. No batching, so it only lets
the HTTP layer be built and tested.
"""

from __future__ import annotations

import itertools
import threading

from collm.core.request import Request, TokenEvent
from collm.decoding.provenance import token_pieces


def engine_of(pair):
    """The pair's engine; the stand-in while ``CoLLM.engine`` does not exist."""
    return pair.engine() if hasattr(pair, "engine") else StandInEngine(pair)


class StandInEngine:
    def __init__(self, pair):
        self.pair = pair
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[list[int], Request]] = {}
        self._ids = itertools.count()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._waiting)

    def add(self, prompt_ids: list[int], request: Request) -> int:
        with self._lock:
            handle = next(self._ids)
            self._waiting[handle] = (list(prompt_ids), request)
            return handle

    def drop(self, handle: int) -> None:
        with self._lock:
            self._waiting.pop(handle, None)

    def step(self) -> list[TokenEvent]:
        with self._lock:
            if not self._waiting:
                return []
            handle = next(iter(self._waiting))
            ids, request = self._waiting[handle]
        s = request.sampling
        out = self.pair.generate([ids], max_new_tokens=request.max_new_tokens, threshold=request.threshold,
                                 do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p,
                                 stop=list(request.stop) or None, seed=s.seed, mode=request.mode)
        with self._lock:
            if self._waiting.pop(handle, None) is None:
                return []  # dropped while it ran
        return _events(handle, self.pair.tokenizer, out, request)


def _events(handle, tokenizer, out, request) -> list[TokenEvent]:
    ids, sources, probs, text = out.token_ids[0], out.sources[0], out.defer_probs[0], out.texts[0]
    stopped_by = out.stopped_by[0]
    eos = set(getattr(tokenizer, "all_special_ids", []) or [])
    if ids and ids[-1] in eos and not stopped_by:
        reason = "stop"
    else:
        reason = "stop" if stopped_by else "length" if len(ids) >= request.max_new_tokens else "stop"
    events, written = [], 0
    for i, (token, piece, source, p) in enumerate(zip(ids, token_pieces(tokenizer, ids), sources, probs)):
        piece = piece[: max(0, len(text) - written)]
        written += len(piece)
        last = i == len(ids) - 1
        events.append(TokenEvent(handle, token, piece, source, float(p), last, reason if last else None,
                                 stopped_by if last else None))
    return events
