"""One worker thread owns the engine; requests join its running batch and read their events from queues.

The worker loops ``engine.step()`` while rows are active and hands each step's events to the event loop
with one ``call_soon_threadsafe``; there they are routed to per-request asyncio queues. The worker never
waits on a client, so a slow reader only lets its own queue grow (bounded by its ``max_tokens``) and never
stalls the batch. A request that is cancelled (client gone, timeout) drops its rows from the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from collm.core.request import Request, TokenEvent

log = logging.getLogger("collm.serve")


class Busy(Exception):
    """The server already holds as many waiting requests as it accepts (HTTP 429)."""


class EngineFailed(Exception):
    """The engine raised while decoding this request's rows."""


@dataclass(frozen=True)
class Row:
    """One prompt of a request: its token ids and decoding settings."""

    prompt_ids: list[int]
    request: Request


class Submission:
    """One request's rows in the engine; iterate it for ``(choice_index, TokenEvent)`` until every row ends."""

    def __init__(self, scheduler: "Scheduler", rows: list[Row]):
        self.scheduler, self.rows = scheduler, rows
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: dict[int, int] = {}  # engine handle -> choice index
        self.open = 0  # rows added and not yet finished
        self.closed = False

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while self.open or not self.queue.empty():
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def _put(self, event: TokenEvent) -> None:
        if self.closed:
            return
        if event.finished:
            self.open -= 1
            self.scheduler._forget(event.row)
        self.queue.put_nowait((self.handles[event.row], event))

    def _fail(self, error: BaseException) -> None:
        self.open = 0
        self.queue.put_nowait(error)

    def close(self) -> None:
        """Drop whatever rows are still decoding and give back their slots; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.scheduler._release(self)


class Scheduler:
    """Admits requests (at most ``max_concurrent`` rows decode at once, ``max_waiting`` requests queue for a
    slot, more get :class:`Busy`) and runs the engine on one worker thread."""

    def __init__(self, engine, *, max_concurrent: int = 16, max_waiting: int = 64):
        self.engine = engine
        self.max_concurrent, self.max_waiting = max_concurrent, max_waiting
        self.loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._admit: asyncio.Lock | None = None  # whole requests take their slots in arrival order
        self._waiting = 0
        self._owner: dict[int, Submission] = {}  # engine handle -> submission (event-loop thread only)
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle (event-loop thread)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self._admit = asyncio.Lock()
        self._thread = threading.Thread(target=self._work, name="collm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the worker; rows still decoding are dropped and one last step lets the engine free them."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                return  # a step still runs: the engine is not ours to touch
        for handle in list(self._owner):
            self.engine.drop(handle)
        if self.engine.active:
            self.engine.step()

    @property
    def running(self) -> int:
        """Rows still served (decoding or about to join). A row whose request ended (timeout, client gone) no
        longer counts, though the engine frees its cache only at its next step boundary."""
        return len(self._owner)

    # ---------------------------------------------------------------- requests (event-loop thread)

    async def submit(self, rows: list[Row]) -> Submission:
        """Wait for slots for every row (FIFO), then add them to the engine. Raises :class:`Busy` when
        ``max_waiting`` requests already wait; the caller's cancellation while waiting takes nothing."""
        if len(rows) > self.max_concurrent:
            raise ValueError(f"a request may hold at most {self.max_concurrent} prompts")
        if self._waiting >= self.max_waiting and (self._admit.locked() or self._slots.locked()):
            raise Busy(f"the server is busy: {self.max_waiting} requests already wait; retry later")
        submission = Submission(self, rows)
        self._waiting += 1
        taken = 0
        try:
            async with self._admit:
                for _ in rows:
                    await self._slots.acquire()
                    taken += 1
        except BaseException:
            for _ in range(taken):
                self._slots.release()
            raise
        finally:
            self._waiting -= 1
        try:
            for index, row in enumerate(rows):
                handle = self.engine.add(row.prompt_ids, row.request)
                submission.handles[handle] = index
                self._owner[handle] = submission
                submission.open += 1
                taken -= 1
        except BaseException:  # the engine refused a row: take back the others and every slot
            submission.close()
            for _ in range(taken):
                self._slots.release()
            raise
        self._wake.set()
        return submission

    def _forget(self, handle: int) -> None:
        if self._owner.pop(handle, None) is not None:
            self._slots.release()

    def _release(self, submission: Submission) -> None:
        for handle in submission.handles:
            if self._owner.get(handle) is submission:
                self.engine.drop(handle)
                self._forget(handle)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            owner = self._owner.get(event.row)
            if owner is not None:  # None: dropped while this step ran
                owner._put(event)

    def _fail_all(self, error: BaseException) -> None:
        for submission in {id(s): s for s in self._owner.values()}.values():
            submission._fail(EngineFailed(f"the engine failed: {error}"))
            self._release(submission)

    # ---------------------------------------------------------------- the worker thread

    def _work(self) -> None:
        while not self._stopping:
            if not self.engine.active:
                self._wake.wait()
                self._wake.clear()  # active is read again after clearing, so no add is missed
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - report to the requests, keep the worker alive
                log.exception("engine step failed")
                self.loop.call_soon_threadsafe(self._fail_all, e)
                self._wake.wait(0.1)  # let the drops land before stepping again
                continue
            if events:
                self.loop.call_soon_threadsafe(self._dispatch, events)
