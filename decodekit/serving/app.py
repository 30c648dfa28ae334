"""The HTTP layer: a FastAPI app with OpenAI's routes over an :class:`~.engine.EngineLoop`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streamed as
server-sent events when ``stream`` is true, ending with ``data: [DONE]``), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). With an API key every
``/v1/`` route needs ``Authorization: Bearer KEY`` (401 otherwise, compared in constant
time); ``/health`` and ``/metrics`` stay open. Errors are OpenAI-style bodies: 400 bad
input (the message names the field), 401, 404 unknown model or route, 413 body too large,
429 queue full (with ``Retry-After``), 500 a request that failed inside the engine, 503
shutting down. A client that disconnects has its request cancelled at the next step.

May call: the protocol (parsing, responses), the engine loop, the metrics; FastAPI.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineLoop, Failed, Finished, Job, Output, QueueFull, ShuttingDown, Started
from .metrics import CONTENT_TYPE
from .protocol import ParsedRequest, RequestError, ResponseBuilder, parse_chat, parse_completion

__all__ = ["MAX_BODY_BYTES", "build_app"]

#: Request bodies larger than this are refused with 413.
MAX_BODY_BYTES = 4 << 20
_MAX_DEPTH = 64  # nesting of JSON bodies
#: decodekit's names in the model's messages -> the request fields they come from
_FIELD_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "steering_": "steering."}


def _short(text: str) -> str:
    return repr(text[:200])


def _error(exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping past ``limit``."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


async def _json_body(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past ``limit`` bytes, 400 when it is not JSON."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(f"request body of {size} bytes is over the limit of {limit}", status=413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}"[:300]) from None
    if _depth(body, _MAX_DEPTH) > _MAX_DEPTH:
        raise RequestError(f"the request body is nested deeper than {_MAX_DEPTH} levels")
    return body


class _Server:
    """What the routes share: the engine, the served name, the tokenizer."""

    def __init__(self, engine: EngineLoop, model_name: str, api_key: str | None, max_body_bytes: int,
                 steering_dir: str | os.PathLike[str] | None) -> None:
        self.engine, self.model_name, self.max_body_bytes = engine, model_name, max_body_bytes
        self.steering_dir = None if steering_dir is None else Path(steering_dir).resolve()
        self.api_key = api_key.encode() if api_key else None
        self.tokenizer = engine.llm.tokenizer
        self.metrics = engine.metrics

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return hmac.compare_digest(token.strip().encode(), self.api_key) and scheme.lower() == "bearer"

    async def parse(self, request: Request, chat: bool) -> ParsedRequest:
        body = await _json_body(request, self.max_body_bytes)
        parsed = parse_chat(body) if chat else parse_completion(body)
        if parsed.model is not None and parsed.model != self.model_name:
            raise RequestError(f"model {parsed.model!r} does not exist; this server serves "
                               f"{self.model_name!r}", "model", status=404, type_="not_found_error")
        if parsed.options.get("steering_vector") is not None:
            parsed.options["steering_vector"] = self.steering_file(parsed.options["steering_vector"])
        return parsed

    def steering_file(self, name: str) -> str:
        """The steering vector file ``name`` inside the server's steering directory (clients
        never name other files of the machine)."""
        if self.steering_dir is None:
            raise RequestError("steering.vector files are off on this server (start it with --steering-dir "
                               "DIR; presets work without)", "steering")
        path = (self.steering_dir / name).resolve()
        if not path.is_relative_to(self.steering_dir) or not path.is_file():
            raise RequestError(f"steering.vector {_short(name)}: no such file in the steering directory",
                               "steering")
        return str(path)

    def submit(self, parsed: ParsedRequest) -> tuple[Job, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(parsed.prompts, parsed.params, parsed.options, emit, parsed.fit_to_context)
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            self.metrics.rejected("queue_full")
            raise RequestError(f"too many requests: {exc}; retry later", status=429,
                               type_="rate_limit_error") from None
        except ShuttingDown as exc:
            self.metrics.rejected("shutting_down")
            raise RequestError(str(exc), status=503, type_="service_unavailable") from None
        return job, events

    async def first(self, job: Job, events: asyncio.Queue, request: Request) -> Started | None:
        """Wait for the job to start: its :class:`Started` (None: the client left), or its
        failure as a RequestError."""
        event = await self.next_event(job, events, request)
        if isinstance(event, Failed):
            if event.status != 400:
                raise RequestError(event.message, status=event.status, type_="server_error")
            message = event.message
            for ours, theirs in _FIELD_NAMES.items():
                message = message.replace(ours, theirs)
            param = next((f for f in ("prompt", "messages", "steering", "lora") if message.startswith(f)),
                         None)
            raise RequestError(message, param)
        return event

    async def next_event(self, job: Job, events: asyncio.Queue, request: Request) -> Any:
        """The job's next event; None (the job cancelled) when the client left first."""
        get = asyncio.ensure_future(events.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if get in done:
            return get.result()
        get.cancel()
        self.engine.cancel(job)
        return None


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _complete(server: _Server, request: Request, chat: bool) -> Response:
    parsed = await server.parse(request, chat)
    job, events = server.submit(parsed)
    try:
        if await server.first(job, events, request) is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        builder = ResponseBuilder(parsed, server.model_name, server.tokenizer)
        if parsed.stream:
            return _JobStream(server, job, _stream(server, job, events, builder))
        finals: dict[int, list] = {}
        while True:
            event = await server.next_event(job, events, request)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, Output):
                finals.setdefault(event.prompt_index, []).append(event.output)
            elif isinstance(event, Failed):
                raise RequestError(event.message, status=event.status, type_="server_error")
            elif isinstance(event, Finished):
                break
        return JSONResponse(builder.body([_merge(finals[i]) for i in sorted(finals)]))
    except BaseException:
        server.engine.cancel(job)
        raise


def _merge(deltas: list) -> Any:
    """One output from a prompt's DELTA outputs (texts, tokens and logprobs concatenated)."""
    from ..outputs import CompletionOutput

    last = deltas[-1]
    merged = []
    for k, c in enumerate(last.outputs):
        parts = [d.outputs[k] for d in deltas if len(d.outputs) > k]
        lps = None if c.logprobs is None else [lp for p in parts for lp in (p.logprobs or [])]
        merged.append(CompletionOutput(c.index, "".join(p.text for p in parts),
                                       [t for p in parts for t in p.token_ids], c.finish_reason, lps,
                                       c.cumulative_logprob))
    return type(last)(last.request_id, last.prompt_token_ids, merged[0].text, merged[0].token_ids,
                      merged[0].finish_reason, merged[0].logprobs, merged, last.prompt_logprobs, True)


class _JobStream(StreamingResponse):
    """Server-sent events of a job; however the response ends (done, client gone, server
    stopping), the job is cancelled then (a no-op once it finished). Not left to the event
    generator's ``finally``: a generator interrupted inside ``send`` is closed only when
    garbage-collected."""

    def __init__(self, server: _Server, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.server, self.job = server, job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.server.engine.cancel(self.job)


async def _stream(server: _Server, job: Job, events: asyncio.Queue, builder: ResponseBuilder
                  ) -> AsyncIterator[str]:
    """Server-sent events of a running job (:class:`_JobStream` cancels the job when it ends)."""
    first: set[int] = set()
    offsets: dict[int, int] = {}
    completion = 0
    try:
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                body = RequestError(event.message, status=event.status, type_="server_error").body()
                yield f"data: {json.dumps(body)}\n\n"
                break
            if isinstance(event, Finished):
                break
            choices = []
            for c in event.output.outputs:
                index = builder.choice_index(event.prompt_index, c.index)
                completion += len(c.token_ids)
                if not c.text and not c.finish_reason and index in first and not c.logprobs:
                    continue  # tokens without text (special tokens, text held back at a stop string)
                choices.append(builder.choice(index, c.text, c.token_ids, c.logprobs, c.finish_reason,
                                              delta=True, first=index not in first,
                                              offset=offsets.get(index, 0)))
                first.add(index)
                offsets[index] = offsets.get(index, 0) + len(c.text)
            if choices:
                yield f"data: {json.dumps(builder.chunk(choices))}\n\n"
        if builder.request.include_usage:
            usage = builder.usage(job_prompt_tokens(job), completion)
            yield f"data: {json.dumps(dict(builder.chunk([], usage), usage=usage))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        server.engine.cancel(job)  # also here: the response may be dropped before it is sent


def job_prompt_tokens(job: Job) -> int:
    return sum(len(g.contexts[0].prompt_token_ids) for g in job.groups)


def build_app(engine: EngineLoop, model_name: str, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, steering_dir: str | os.PathLike[str] | None = None
              ) -> FastAPI:
    """The app serving ``engine`` under ``model_name`` (start the engine before serving).
    ``steering_dir``: the folder whose files requests may steer with (None: presets only)."""
    server = _Server(engine, model_name, api_key, max_body_bytes, steering_dir)
    app = FastAPI(title="decodekit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202
        if request.url.path.startswith("/v1/") and not server.authorized(request):
            server.metrics.rejected("unauthorized")
            return _error(RequestError("invalid or missing API key (Authorization: Bearer KEY)",
                                       status=401, type_="authentication_error"))
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404) and methods (405) get OpenAI-style bodies too."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}",
                                   status=exc.status_code, type_=kind))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        if exc.status in (400, 404, 413):
            server.metrics.rejected({400: "invalid", 404: "not_found", 413: "too_large"}[exc.status])
        return _error(exc)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(server, request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        gen = engine.gen
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "decodekit", "max_model_len": gen.max_seq_len}]}

    @app.get("/health")
    async def health() -> Response:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app
