"""The FastAPI app: routes, OpenAI error objects, the body-size limit, the playground page.

Routes only parse, call :class:`~collm.serve.serving.Serving` and wrap what it returns (a response model, or
an async iterator of server-sent events in a ``StreamingResponse``).
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from collm.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from collm.serve.scheduler import Scheduler
from collm.serve.serving import ApiError, ServeConfig, Serving

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429)}


def build_app(pair, config: ServeConfig | None = None, engine=None) -> FastAPI:
    """An app serving ``pair`` under ``config``'s name and limits. ``engine``: the engine to drive (default
    ``pair.engine()``; tests pass a scripted one)."""
    config = config or ServeConfig()
    scheduler = Scheduler(engine if engine is not None else pair.engine(),
                          max_concurrent=config.max_concurrent, max_waiting=config.max_waiting)
    serving = Serving(pair, scheduler, config)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="collm", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat; every token says which model wrote it.")
    app.state.serving = serving
    _errors(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Guard, hosts=config.served_hosts, api_key=config.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_rows": scheduler.running}

    info = getattr(pair, "specs", None) or getattr(pair, "info", {}) or {}
    card = ModelCard(id=config.model_name, base=str(info.get("base", "")),
                     experts=[str(e) for e in info.get("experts", [])])

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[card])

    @app.get("/v1/models/{name}", response_model=ModelCard, responses=ERRORS)
    async def model(name: str):
        serving.check_model(name)
        return card

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(request, serving.completions(body))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _respond(request, serving.chat(body))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(resources.files("collm.serve").joinpath("static/playground.html").read_text())

    return app


async def _respond(request: Request, work):
    """Run the endpoint's work, abandoning it (and so dropping its rows) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed"}}, 499)
    result = task.result()
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return result


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _where(error: dict) -> list[str]:
    return [str(x) for x in error.get("loc", ()) if x != "body"]


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          "invalid_request_error")
        # a field of several accepted types fails once per type: name the field once (the path its errors
        # share), with each reason
        mine = [x for x in e.errors() if _where(x)[:1] == loc[:1]]
        path = [part for part, *others in zip(*map(_where, mine)) if all(o == part for o in others)]
        reasons = dict.fromkeys(x["msg"] for x in mine)
        # a value of the right type that a check refused says more than "or it should have been a list"
        checked = [r.removeprefix("Value error, ") for r in reasons if r.startswith("Value error, ")]
        reasons = dict.fromkeys(checked) if checked else reasons
        return _error(400, f"{'.'.join(path) or 'body'}: {'; or '.join(reasons)}", "invalid_request_error",
                      loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0
        utf8 = codecs.getincrementaldecoder("utf-8")()  # JSON bodies are UTF-8 (RFC 8259): say so, not "parse error"

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen += len(body)
                if seen > self.limit:
                    raise _TooLarge(self.limit)
                try:
                    utf8.decode(body, final=not message.get("more_body", False))
                except UnicodeDecodeError as e:
                    raise _NotText(seen - len(body) + e.start) from None
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        await _error(413, _TooLarge(self.limit).detail, "invalid_request_error")({"type": "http"}, None, send)


class _NotText(StarletteHTTPException):
    """Raised from ``receive`` for a body that is not UTF-8, answered by the error handlers with a 400."""

    def __init__(self, at: int):
        super().__init__(400, f"the request body is not UTF-8 text (byte {at}): send JSON encoded as UTF-8")


class Guard:
    """Answer only requests for the host names this server serves (a browser page on another site that rebinds
    its DNS name to 127.0.0.1 sends its own name as Host) and, with an API key, only requests that carry it as
    ``Authorization: Bearer KEY`` on /v1/ (as vLLM's --api-key); the playground page and /health stay open."""

    def __init__(self, app, hosts: tuple[str, ...], api_key: str | None):
        self.app, self.hosts, self.api_key = app, {h.lower() for h in hosts}, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.hosts and host not in self.hosts:
            return await _error(400, f"host {host!r} is not served here: start collm serve with --allowed-host "
                                     f"{host or 'NAME'} to serve it",
                                "invalid_request_error", "host")(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            if not secrets.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
                return await _error(401, "this server needs an API key: send it as 'Authorization: Bearer KEY' "
                                         "(the openai client's api_key)", "authentication_error",
                                    code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '[::1]'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _TooLarge(StarletteHTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTP exceptions met while reading a body (others become a
    generic 400), so the error handlers answer it with a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes")
