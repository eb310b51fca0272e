"""Scheduling over a scripted engine (no models): requests join the running batch, a disconnected client's row
is dropped, a slow reader stalls nobody, limits give 429 and 408, an engine failure fails only its requests."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import httpx
import pytest
from serve_live import live, tiny_pair

from collm.core.request import Request, TokenEvent
from collm.serve.app import build_app
from collm.serve.scheduler import Row, Scheduler
from collm.serve.serving import ServeConfig


class ScriptedEngine:  # (the tiny models' context, 512, still bounds max_tokens)
    """The engine interface; each row writes max_new_tokens tokens 'a', one per ``step``, which takes
    ``delay`` seconds. Records which rows each step decoded, and which were dropped."""

    def __init__(self, delay: float = 0.01, fail_at: int | None = None):
        self.delay, self.fail_at = delay, fail_at
        self.lock = threading.Lock()
        self.rows: dict[int, list] = {}  # handle -> [request, tokens written]
        self.ids = itertools.count()
        self.steps: list[set[int]] = []
        self.dropped: list[int] = []

    @property
    def active(self) -> int:
        with self.lock:
            return len(self.rows)

    def add(self, prompt_ids: list[int], request: Request) -> int:
        with self.lock:
            handle = next(self.ids)
            self.rows[handle] = [request, 0]
            return handle

    def drop(self, handle: int) -> None:
        with self.lock:
            if self.rows.pop(handle, None) is not None:
                self.dropped.append(handle)

    def step(self) -> list[TokenEvent]:
        with self.lock:
            if not self.rows:
                return []
        time.sleep(self.delay)
        with self.lock:
            self.steps.append(set(self.rows))
            if self.fail_at is not None and len(self.steps) == self.fail_at:
                raise RuntimeError("out of memory (scripted)")
            events = []
            for handle, row in list(self.rows.items()):
                row[1] += 1
                last = row[1] >= row[0].max_new_tokens
                events.append(TokenEvent(handle, 30, "a", row[1] % 2, 0.5, last, "length" if last else None))
                if last:
                    del self.rows[handle]
            return events


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def _serve(pair, engine, **limits):
    return live(build_app(pair, ServeConfig(model_name="tiny", **limits), engine=engine))


def _body(max_tokens, stream=False):
    return {"model": "tiny", "prompt": "hi", "max_tokens": max_tokens, "stream": stream}


def test_a_request_joins_the_running_batch(pair):
    engine = ScriptedEngine(delay=0.02)
    with _serve(pair, engine) as url:
        async def both():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/completions", json=_body(40)))
                await asyncio.sleep(0.3)  # the first is decoding by now
                second = await client.post("/v1/completions", json=_body(5))
                return await first, second

        first, second = asyncio.run(both())
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["text"] == "a" * 40 and second.json()["usage"]["completion_tokens"] == 5
    joint = [s for s in engine.steps if len(s) == 2]
    assert len(joint) == 5, "the second request's 5 steps ran in the same batch as the first's"
    assert engine.steps[-1] == {0}, "and the first went on alone once the second finished"


def test_a_disconnected_client_stops_its_row(pair):
    engine = ScriptedEngine(delay=0.02)
    with _serve(pair, engine, max_tokens=400) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=_body(400, stream=True), timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 10
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.active == 0 and engine.dropped == [0]
        steps = len(engine.steps)
        assert steps < 100, "it was dropped long before its 400 tokens"
        assert httpx.post(f"{url}/v1/completions", json=_body(3), timeout=30).status_code == 200


def test_a_disconnected_non_streaming_client_stops_its_row(pair):
    engine = ScriptedEngine(delay=0.02)
    with _serve(pair, engine, max_tokens=400) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=_body(400), timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.active == 0 and engine.dropped == [0]


def test_a_slow_reader_does_not_stall_the_others(pair):
    engine = ScriptedEngine(delay=0.005)
    with _serve(pair, engine, max_tokens=400) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=_body(400, stream=True), timeout=30) as slow:
            lines = slow.iter_lines()
            next(lines)  # then read nothing more while the others run
            started = time.monotonic()
            for _ in range(3):
                fast = httpx.post(f"{url}/v1/completions", json=_body(20), timeout=30)
                assert fast.status_code == 200 and fast.json()["choices"][0]["text"] == "a" * 20
            assert time.monotonic() - started < 5
            tokens = 1 + sum(1 for line in lines if line.startswith("data: {"))
        assert tokens == 400, "the slow reader still gets every token, afterwards"


def test_over_the_waiting_limit_is_429_and_past_the_timeout_is_408(pair):
    engine = ScriptedEngine(delay=0.02)
    with _serve(pair, engine, max_concurrent=1, max_waiting=0, request_timeout=1.0, max_tokens=400) as url:
        async def crowd():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                long = asyncio.create_task(client.post("/v1/completions", json=_body(400)))
                await asyncio.sleep(0.3)
                busy = await client.post("/v1/completions", json=_body(2))
                return await long, busy

        long, busy = asyncio.run(crowd())
        assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
        assert long.status_code == 408 and "timeout" in long.json()["error"]["message"]
        assert engine.dropped == [0]
        assert httpx.post(f"{url}/v1/completions", json=_body(3), timeout=30).status_code == 200


def test_requests_queue_for_a_slot(pair):
    engine = ScriptedEngine(delay=0.01)
    with _serve(pair, engine, max_concurrent=2, max_waiting=8) as url:
        async def many():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=_body(10)) for _ in range(6)))

        replies = asyncio.run(many())
    assert [r.status_code for r in replies] == [200] * 6
    assert max(len(s) for s in engine.steps) == 2


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(pair):
    engine = ScriptedEngine(delay=0.01, fail_at=3)
    with _serve(pair, engine) as url:
        failed = httpx.post(f"{url}/v1/completions", json=_body(10), timeout=30)
        assert failed.status_code == 500 and "out of memory" in failed.json()["error"]["message"]
        with httpx.stream("POST", f"{url}/v1/completions", json=_body(10, stream=True), timeout=30) as r:
            assert r.status_code == 200 and sum(1 for line in r.iter_lines() if '"text": "a"' in line) == 10


def test_a_stream_past_the_timeout_ends_with_an_error_event(pair):
    engine = ScriptedEngine(delay=0.02)
    with _serve(pair, engine, request_timeout=0.5, max_tokens=400) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=_body(400, stream=True), timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert '"error"' in lines[-2] and "timeout" in lines[-2] and lines[-1] == "data: [DONE]"
        assert engine.dropped == [0]


def test_stopping_the_scheduler_drops_rows_still_decoding():
    engine = ScriptedEngine(delay=0.02)

    async def run():
        scheduler = Scheduler(engine)
        scheduler.start()
        submission = await scheduler.submit([Row([5, 6], Request(max_new_tokens=400))])
        events = aiter(submission)
        await anext(events)  # one token in, then the server shuts down with the row still decoding
        scheduler.stop()
        assert engine.dropped == [0]
        await events.aclose()

    asyncio.run(run())
    assert engine.active == 0 and engine.dropped == [0]


def test_a_timed_out_row_leaves_the_count_at_once(pair):
    """Two 408s under --max-concurrent 1, each step slow: /health counts no row right after each, though the
    engine frees a dropped row only at its next step boundary."""
    engine = ScriptedEngine(delay=0.4)
    with _serve(pair, engine, max_concurrent=1, request_timeout=0.5, max_tokens=400) as url:
        for _ in range(2):
            r = httpx.post(f"{url}/v1/completions", json=_body(400), timeout=30)
            assert r.status_code == 408
            assert httpx.get(f"{url}/health", timeout=30).json()["active_rows"] == 0
