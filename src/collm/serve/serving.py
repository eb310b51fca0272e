"""Completions and chat over the scheduler: OpenAI requests in, engine rows out, events back to responses.

Nothing here knows HTTP beyond raising :class:`ApiError` with a status; ``app.py`` turns those into OpenAI
error objects and the async generators here into server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field

from collm.core.request import Request, check_threshold
from collm.errors import CollmError
from collm.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    TokenProvenance,
    Usage,
)
from collm.serve.scheduler import Busy, EngineFailed, Row, Scheduler

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
"""Host names a server always answers."""
WILDCARD = ("0.0.0.0", "::")
"""Addresses that listen on every interface (they name no host a client sends)."""


@dataclass(frozen=True)
class ServeConfig:
    """Where the server listens, its name for the pair, and the limits it enforces on every request (the options
    of ``collm serve`` besides the models)."""

    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port."""
    model_name: str = "collm"
    """The model name clients send (GET /v1/models lists it)."""
    max_prompt_tokens: int = 4096
    """Longest prompt accepted, in tokens (the models' context is checked as well)."""
    max_tokens: int = 1024
    """Largest max_tokens a request may ask for; also the default where a chat request gives none."""
    max_body_bytes: int = 1 << 20
    """Largest request body; a bigger one gets 413."""
    max_concurrent: int = 16
    """Rows decoding together in one engine batch; later requests wait for a slot."""
    max_waiting: int = 64
    """Requests waiting for a slot; beyond that a request gets 429 at once."""
    request_timeout: float = 600.0
    """Seconds a request may take, waiting included; then its rows are dropped and it fails with 408."""
    threshold: float | None = None
    """The deferral threshold for requests that give none, in [0, 1]. Default: the pair's (a run's calibrated
    one, else 0.5)."""
    lookahead: int = 1
    """Draft past deferrals for requests that give no lookahead: up to this many tokens per check (1: none).
    Rows that sample do not draft with a served expert (it gives no distribution)."""
    rewind: float = 0.0
    """Backtracking default: the expert re-writes a base token it gives a probability below this (0: off)."""
    yield_below: float = 0.0
    """Backtracking default: the base's token stands where the expert's own is less probable than this (0: off)."""
    max_rewinds: int = 8
    """Most rewinds per answer, for requests that give none."""
    allowed_hosts: list[str] = field(default_factory=list, metadata={"flag": "--allowed-host"})
    """Host names (the Host header, port aside) clients may reach this server by, besides localhost, 127.0.0.1,
    [::1] and --host itself; others get 400, which keeps web pages out through DNS rebinding. "*" answers any
    (repeatable)."""
    api_key: str | None = field(default=None, metadata={"envvar": "COLLM_API_KEY"})
    """When set, every /v1/ request must send 'Authorization: Bearer KEY' (the openai client's api_key); others get
    401. Also read from $COLLM_API_KEY."""

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_tokens", "max_body_bytes", "max_concurrent"):
            if getattr(self, name) < 1:
                raise CollmError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0 or not self.request_timeout > 0:
            raise CollmError("max_waiting must be >= 0 and request_timeout > 0")
        if not 0 < self.port < 65536:
            raise CollmError(f"port must be in 1..65535, got {self.port}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        Request(lookahead=self.lookahead, rewind=self.rewind, yield_below=self.yield_below,
                max_rewinds=self.max_rewinds)  # checks them
        hosts = [self.allowed_hosts] if isinstance(self.allowed_hosts, str) else list(self.allowed_hosts)
        if not all(isinstance(h, str) and h.strip() for h in hosts):
            raise CollmError("allowed_hosts must be host names (or '*')")
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        if self.api_key is not None and not self.api_key.strip():
            raise CollmError("api_key must not be empty: give a secret, or leave it out")

    @property
    def served_hosts(self) -> tuple[str, ...]:
        """Every host name this server answers: loopback, the address it listens on, and allowed_hosts."""
        own = () if self.host in WILDCARD else (self.host,)
        return tuple(dict.fromkeys([*LOOPBACK, *own, *self.allowed_hosts]))


class ApiError(Exception):
    """A request the server refuses: an HTTP status, an OpenAI error type and a message saying what to fix."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "invalid_request_error")


@dataclass
class _Choice:
    """One choice's events gathered: the text and its provenance."""

    pieces: list[str] = field(default_factory=list)
    provenance: list[TokenProvenance] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event) -> TokenProvenance:
        token = TokenProvenance(token_id=event.token_id, text=event.text, source=event.source,
                                defer_prob=event.defer_prob)
        self.pieces.append(event.text)
        self.provenance.append(token)
        if event.finished:
            self.finish_reason = event.finish_reason or "stop"
        return token

    @property
    def sources(self) -> list[int]:
        return [t.source for t in self.provenance]


class Serving:
    """The completions and chat endpoints' logic, over one pair's tokenizer and one scheduler."""

    def __init__(self, pair, scheduler: Scheduler, config: ServeConfig):
        self.pair, self.scheduler, self.config = pair, scheduler, config

    # ---------------------------------------------------------------- requests -> rows

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           "model", "model_not_found")

    def rows(self, body, prompts_ids: list[list[int]], max_tokens: int | None) -> list[Row]:
        """Check limits and build one engine row per prompt; raises ApiError(400) with what to fix."""
        self.check_model(body.model)
        if (message := body.unsupported()) is not None:
            raise ApiError(400, message)
        if len(prompts_ids) > self.config.max_concurrent:
            raise ApiError(400, f"at most {self.config.max_concurrent} prompts per request", "prompt")
        longest = max(len(ids) for ids in prompts_ids)
        if longest > self.config.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {longest} tokens; this server accepts at most "
                                f"{self.config.max_prompt_tokens}", "prompt", "context_length_exceeded")
        if max_tokens is not None and max_tokens > self.config.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {self.config.max_tokens}",
                           "max_tokens")
        if max_tokens is None:  # as much as the limit and the context allow
            max_tokens = max(1, min(self.config.max_tokens, self._context() - longest))
        try:
            self.pair._check_context(longest + max_tokens)
            greedy = body.temperature == 0  # OpenAI's convention; collm's sampler wants a temperature > 0
            lookahead = body.lookahead
            served = any(getattr(e, "remote", False) for e in self.pair.experts)
            if lookahead is None:  # the server's default, where the row can draft
                lookahead = 1 if served and not greedy else self.config.lookahead
            elif lookahead > 1 and served and not greedy:
                raise ApiError(400, "a sampling request cannot draft with a served expert (it gives tokens, not its "
                               "distribution): send temperature 0, or lookahead 1", "lookahead")
            request = self.pair.request(
                max_new_tokens=max_tokens,
                threshold=self.config.threshold if body.threshold is None else body.threshold,
                do_sample=not greedy, temperature=1.0 if greedy else body.temperature, top_p=body.top_p,
                stop=body.stop, seed=secrets.randbits(32) if body.seed is None else body.seed, mode=body.mode,
                lookahead=lookahead,
                **{name: getattr(self.config, name) if getattr(body, name) is None else getattr(body, name)
                   for name in ("rewind", "yield_below", "max_rewinds")})
        except CollmError as e:
            raise ApiError(400, str(e)) from None
        if served and (request.rewind or request.yield_below):
            raise ApiError(400, "rewind and yield_below read the expert's probabilities; this server's expert is "
                           "served elsewhere and gives tokens: send them as 0", "rewind")
        return [Row(ids, request) for ids in prompts_ids]

    def _context(self) -> int:
        config = self.pair.base.config.get_text_config()
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30

    def completion_ids(self, body: CompletionRequest) -> list[list[int]]:
        """Raw text (no chat template, as OpenAI's completions endpoint) or token ids, checked."""
        try:
            return self.pair.encode(body.prompts(), chat=False)
        except CollmError as e:
            raise ApiError(400, str(e), "prompt") from None

    def chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        """The messages through the base's chat template, tokenised as ``CoLLM.encode`` does a chat prompt."""
        tokenizer = self.pair.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the base model has no chat template: use /v1/completions", "messages")
        if not any(m["content"].strip() for m in messages):
            raise ApiError(400, "every message is empty", "messages")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - templates raise what they like (e.g. a role they refuse)
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        return self.pair.encode([tokenizer(text, add_special_tokens=False)["input_ids"]])[0]

    # ---------------------------------------------------------------- running

    def _timeout(self) -> ApiError:
        return ApiError(408, f"the request took longer than the server's {self.config.request_timeout:g} s timeout")

    async def admit(self, rows: list[Row]) -> tuple:
        """Wait for the rows' slots (before any response is sent, so 429 and 408 keep their status);
        returns (submission, deadline)."""
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout
        try:
            async with asyncio.timeout_at(deadline):
                return await self.scheduler.submit(rows), deadline
        except Busy as e:
            raise ApiError(429, str(e)) from None
        except TimeoutError:
            raise self._timeout() from None
        except CollmError as e:  # the engine refused a row
            raise ApiError(400, str(e)) from None

    async def run(self, rows: list[Row]) -> list[_Choice]:
        """Decode the rows to the end; raises ApiError(408) past the request timeout."""
        choices = [_Choice() for _ in rows]
        submission, deadline = await self.admit(rows)
        try:
            async with asyncio.timeout_at(deadline):
                async for index, event in submission:
                    choices[index].add(event)
        except TimeoutError:
            raise self._timeout() from None
        except EngineFailed as e:
            raise ApiError(500, str(e)) from None
        finally:
            submission.close()  # drops unfinished rows (timeout, or the client went away)
        return choices

    async def stream(self, submission, rows: list[Row], deadline: float):
        """Yield (choice index, token, the choice so far) per event; past the deadline raises ApiError(408)."""
        choices = [_Choice() for _ in rows]
        events = aiter(submission)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):  # not around the yield: the client's pace is its own
                        index, event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._timeout() from None
                except EngineFailed as e:
                    raise ApiError(500, str(e)) from None
                yield index, choices[index].add(event), choices[index]
        finally:
            await events.aclose()
            submission.close()  # drops unfinished rows when the client goes away

    # ---------------------------------------------------------------- endpoints

    async def completions(self, body: CompletionRequest):
        """A CompletionResponse, or (for ``stream``) an async iterator of SSE ``data:`` payloads."""
        ids = self.completion_ids(body)
        rows = self.rows(body, ids, body.max_tokens)
        if body.stream:
            return self._completion_chunks(body, rows, sum(map(len, ids)), *await self.admit(rows))
        choices = await self.run(rows)
        return CompletionResponse(
            model=self.config.model_name, usage=_usage(sum(map(len, ids)), choices),
            choices=[CompletionChoice(index=i, text="".join(c.pieces), finish_reason=c.finish_reason,
                                      provenance=c.provenance) for i, c in enumerate(choices)])

    async def chat(self, body: ChatCompletionRequest):
        """A ChatCompletionResponse, or (for ``stream``) an async iterator of SSE ``data:`` payloads."""
        if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ: give one", "max_completion_tokens")
        ids = self.chat_ids(body)
        rows = self.rows(body, [ids], body.new_tokens)
        if body.stream:
            return self._chat_chunks(body, rows, len(ids), *await self.admit(rows))
        (choice,) = await self.run(rows)
        return ChatCompletionResponse(
            model=self.config.model_name, usage=_usage(len(ids), [choice]),
            choices=[ChatChoice(index=0, message=ChatMessage(content="".join(choice.pieces)),
                                finish_reason=choice.finish_reason, provenance=choice.provenance)])

    async def _completion_chunks(self, body, rows, prompt_tokens, submission, deadline):
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.model_name}
        choices = {}
        async for event in self._guarded(self.stream(submission, rows, deadline)):
            if isinstance(event, str):
                yield event
                continue
            index, token, choice = event
            choices[index] = choice
            yield _sse(head | {"choices": [{"index": index, "text": token.text, "logprobs": None,
                                            "finish_reason": choice.finish_reason,
                                            "provenance": [token.model_dump()]}]})
        done = len(choices) == len(rows) and all(c.finish_reason for c in choices.values())
        if done and body.stream_options and body.stream_options.include_usage:
            yield _sse(head | {"choices": [], "usage": _usage(prompt_tokens, list(choices.values())).model_dump()})
        yield "data: [DONE]\n\n"

    async def _chat_chunks(self, body, rows, prompt_tokens, submission, deadline):
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.config.model_name}
        yield _sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
        last = None
        async for event in self._guarded(self.stream(submission, rows, deadline)):
            if isinstance(event, str):
                yield event
                continue
            _, token, last = event
            yield _sse(head | {"choices": [{"index": 0, "delta": {"content": token.text}, "logprobs": None,
                                            "finish_reason": last.finish_reason,
                                            "provenance": [token.model_dump()]}]})
        if last is not None and last.finish_reason and body.stream_options and body.stream_options.include_usage:
            yield _sse(head | {"choices": [], "usage": _usage(prompt_tokens, [last]).model_dump()})
        yield "data: [DONE]\n\n"

    @staticmethod
    async def _guarded(events):
        """The events; an error after the stream began (the status is sent) becomes an error event."""
        try:
            async for event in events:
                yield event
        except ApiError as e:
            yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})


def _usage(prompt_tokens: int, choices: list[_Choice]) -> Usage:
    return Usage.of(prompt_tokens, [s for c in choices for s in c.sources])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
