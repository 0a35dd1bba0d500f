"""OpenAI-compatible HTTP API (FastAPI + pydantic) in front of one `Engine`.

Routes: POST /v1/chat/completions and /v1/completions (non-streaming JSON, or server-sent events with
`"stream": true`), GET /v1/models, /health, /metrics (Prometheus text). Every error is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, unknown fields, wrong types, empty or
too long prompts and out-of-range values; 404 for an unknown model or route; 413 for a body over `MAX_BODY_BYTES`;
429 with `Retry-After` when the waiting queue is full; 500 when the request itself failed (other requests go on).

Handlers run on the asyncio loop: they tokenize, submit `Sequence`s to the engine thread and read each sequence's
event queue; text is decoded and stop strings are found here (the engine only sees token ids). A client that
disconnects, or a stop string, cancels its sequences, and the engine frees their caches before its next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .accounting import NeverFits
from .metrics import ServerMetrics
from .schemas import ChatMessage, ChatRequest, CompletionRequest, SamplingFields
from .sequence import QueueFull, SamplingParams, Sequence
from .text_stream import TextStream

MAX_BODY_BYTES = 8 << 20
EVENT_POLL_SECONDS = 0.5  # how often a non-streaming handler checks that its client is still there


# ---- errors --------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type_,
            param,
            code,
            headers,
        )


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# ---- incremental text ------------------------------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: refuse bodies whose Content-Length exceeds the limit (413) before reading them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        too_big = int(value) > self.limit
                    except ValueError:
                        too_big = True
                    if too_big:
                        resp = _error_response(413, f"request body over {self.limit} bytes")
                        await resp(scope, receive, send)
                        return
        await self.app(scope, receive, send)


class EngineAPI(Protocol):
    """What the app needs from an engine: the local `Engine`, or `cluster.RemoteEngine` in a Ray ingress."""

    max_context: int
    metrics: ServerMetrics | None

    @property
    def prefix_block(self) -> int: ...

    def check(self, prompt_tokens: int, max_tokens: int) -> None: ...

    def submit(self, seqs: list[Sequence]) -> None: ...

    def wake(self) -> None: ...

    def snapshot(self) -> dict: ...


def create_app(
    engine: EngineAPI,
    tokenizer: Any,
    model_name: str,
    metrics: ServerMetrics | None = None,
    default_max_tokens: int = 256,
) -> FastAPI:
    """The FastAPI app serving `engine` (started and stopped by the caller) under the model id `model_name`."""
    metrics = metrics or engine.metrics or ServerMetrics()
    app = FastAPI(title="AttentionPack", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    created = int(time.time())
    chat_template = getattr(tokenizer, "chat_template", None) is not None

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        kind = first.get("type", "")
        if kind == "json_invalid":
            message = "the request body is not valid JSON"
        elif kind == "extra_forbidden":
            message = f"unknown field: {'.'.join(loc)}"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        metrics.rejected.labels("400").inc()
        return _error_response(400, message, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(
            exc.status_code,
            str(exc.detail),
            "invalid_request_error" if exc.status_code < 500 else "server_error",
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 429):
            metrics.rejected.labels(str(exc.status)).inc()
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.snapshot()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "attentionpack"}],
        }

    def _check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _max_tokens(req: SamplingFields, prompt_tokens: int, override: int | None = None) -> int:
        value = override or req.max_tokens
        if value is None:
            value = max(1, min(default_max_tokens, engine.max_context - prompt_tokens))
        return value

    def _usage(prompt_tokens: int, seqs: list[Sequence], counts: list[int]) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(counts),
            "total_tokens": prompt_tokens + sum(counts),
        }
        if engine.prefix_block:  # prompt tokens that came from a stored cache instead of a prefill
            usage["prompt_tokens_details"] = {"cached_tokens": max(s.cached_tokens for s in seqs)}
        return usage

    async def _run(
        request: Request, req: SamplingFields, prompt: list[int], max_tokens: int, kind: str, shared: int | None = None
    ) -> Response | dict[str, Any]:
        """Serve one request. `shared`: how many leading prompt tokens later requests are likely to repeat (the
        conversation before its last message); with a prefix store the cache is stored at the last block boundary
        inside it (default: inside the whole prompt but its last token)."""
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt" if kind == "text_completion" else "messages")
        try:
            engine.check(len(prompt), max_tokens)
        except NeverFits as err:
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        block = engine.prefix_block
        shared = len(prompt) - 1 if shared is None else min(shared, len(prompt) - 1)
        store_at = shared // block * block if block else 0
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        seqs = [
            Sequence(
                prompt,
                SamplingParams(**{**params.__dict__, "seed": None if req.seed is None else req.seed + i}),
                queue,
                loop,
                index=i,
                store_at=store_at,
            )
            for i in range(req.n)
        ]
        try:
            engine.submit(seqs)
        except QueueFull as err:
            raise APIError(
                429, str(err), "rate_limit_error", code="queue_full", headers={"Retry-After": str(err.retry_after)}
            ) from None
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            return StreamingResponse(
                _stream(request, req, seqs, queue, rid, kind, len(prompt)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(request, req, seqs, queue, rid, kind, len(prompt))

    async def _events(
        request: Request, seqs: list[Sequence], queue: asyncio.Queue, stops: list[str]
    ) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """Yield (index, text delta, finish_reason or None) until every sequence ended; cancels on exit."""
        texts = [TextStream(tokenizer, stops) for _ in seqs]
        open_ = set(range(len(seqs)))
        try:
            while open_:
                try:
                    event = await asyncio.wait_for(queue.get(), EVENT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                kind, idx, payload = event[0], event[1], event[2:]  # (kind, choice index, ...)
                if idx not in open_:
                    continue
                if kind == "token":
                    delta, stopped = texts[idx].push(payload[0])
                    if stopped:
                        seqs[idx].cancel()
                        engine.wake()
                        open_.discard(idx)
                        yield idx, delta, "stop", len(texts[idx].ids)
                    elif delta:
                        yield idx, delta, None, len(texts[idx].ids)
                elif kind == "end":
                    open_.discard(idx)
                    yield idx, texts[idx].flush(), payload[0], len(texts[idx].ids)
                elif kind == "error":
                    raise APIError(payload[0], payload[1], "server_error")
        finally:
            for s in seqs:
                s.cancel()
            engine.wake()

    async def _collect(
        request: Request,
        req: SamplingFields,
        seqs: list[Sequence],
        queue: asyncio.Queue,
        rid: str,
        kind: str,
        prompt_tokens: int,
    ) -> Response | dict[str, Any]:
        texts = ["" for _ in seqs]
        reasons: list[str | None] = [None for _ in seqs]
        counts = [0 for _ in seqs]
        async for idx, delta, reason, count in _events(request, seqs, queue, req.stops()):
            texts[idx] += delta
            counts[idx] = count
            if reason is not None:
                reasons[idx] = reason
        if any(r is None for r in reasons):  # the client went away
            return Response(status_code=499)
        usage = _usage(prompt_tokens, seqs, counts)
        if kind == "chat.completion":
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=False))
            ]
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=False))
            ]
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": seqs[0].server,
        }

    async def _stream(
        request: Request,
        req: SamplingFields,
        seqs: list[Sequence],
        queue: asyncio.Queue,
        rid: str,
        kind: str,
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        created_at = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        counts = [0 for _ in seqs]

        def chunk(idx: int, delta: str | None, reason: str | None, first: bool = False) -> str:
            if kind == "chat.completion":
                d = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": idx, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": idx, "text": delta or "", "logprobs": None, "finish_reason": reason}
            body = {
                "id": rid,
                "object": obj,
                "created": created_at,
                "model": model_name,
                "choices": [choice],
                "system_fingerprint": seqs[idx].server,
            }
            return f"data: {json.dumps(body)}\n\n"

        if kind == "chat.completion":
            for i in range(len(seqs)):
                yield chunk(i, None, None, first=True)
        try:
            async for idx, delta, reason, count in _events(request, seqs, queue, req.stops()):
                counts[idx] = count
                if delta:
                    yield chunk(idx, delta, None)
                if reason is not None:
                    yield chunk(idx, None, reason)
        except APIError as err:
            yield f"data: {json.dumps(error_body(err.message, err.type))}\n\n"
            yield "data: [DONE]\n\n"
            return
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = _usage(prompt_tokens, seqs, counts)
            body = {"id": rid, "object": obj, "created": created_at, "model": model_name, "choices": [], "usage": usage}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    def _chat_ids(messages: list[ChatMessage], reply: bool = True) -> list[int]:
        if chat_template:
            out = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in messages],
                add_generation_prompt=reply,
                tokenize=True,
                return_dict=False,
            )
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return list(out)
        text = "".join(f"{m.role}: {m.text()}\n" for m in messages) + ("assistant:" if reply else "")
        return tokenizer(text, add_special_tokens=True).input_ids

    def _shared(messages: list[ChatMessage], prompt: list[int]) -> int | None:
        """Prompt tokens of the conversation before its last message (what its next turn repeats), or None."""
        if not engine.prefix_block or len(messages) < 2:
            return None
        before = _chat_ids(messages[:-1], reply=False)
        return next((i for i, (a, b) in enumerate(zip(before, prompt, strict=False)) if a != b), len(before))

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest):
        _check_model(req.model)
        if all(not m.text().strip() for m in req.messages):
            raise APIError(400, "every message is empty", param="messages")
        prompt = _chat_ids(req.messages)
        max_tokens = _max_tokens(req, len(prompt), req.max_completion_tokens)
        return await _run(request, req, prompt, max_tokens, "chat.completion", _shared(req.messages, prompt))

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        _check_model(req.model)
        if isinstance(req.prompt, str):
            if not req.prompt.strip():
                raise APIError(400, "the prompt is empty", param="prompt")
            prompt = tokenizer(req.prompt, add_special_tokens=True).input_ids
        else:
            vocab = len(tokenizer)
            if any(t < 0 or t >= vocab for t in req.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt = list(req.prompt)
        return await _run(request, req, prompt, _max_tokens(req, len(prompt)), "text_completion")

    return app


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port unless given) in a background thread (tests, bench)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
