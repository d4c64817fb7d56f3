"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
streamed as server-sent events or not, and /health. Generation happens on the model's thread (the
scheduler's loop); a handler only renders the prompt, submits it, and relays its events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktjax.runtime.generation import SamplingOptions, chat_prompt, encode
from ktjax.runtime.model import LoadedModel
from ktjax.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ValidationError, error_body,
                                  validation_message)
from ktjax.serve.reasoning import ReasoningSplitter
from ktjax.serve.requests import Event, QueueFull, Request, ShuttingDown
from ktjax.serve.scheduler import Scheduler
from ktjax.text.reasoning import THINK_OPEN

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
MAX_BODY_BYTES = 32 << 20  # far above any context's worth of text; a bigger body is refused unread


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_id: str
    api_key: str | None = None
    separate_reasoning: bool = True  # R1's reasoning as `reasoning_content` (False: inline in `content`)
    max_queue: int = 64


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the scheduler."""

    prompt_ids: list[int]
    opts: SamplingOptions
    stream: bool
    include_usage: bool
    reasoning: str | None = None  # R1-style chat: "separate" or "inline"
    ignore_eos: bool = False


def create_app(model: LoadedModel, config: ServeConfig, scheduler: Scheduler | None = None, *,
               start_scheduler: bool = True) -> FastAPI:
    """The app. With start_scheduler, its lifespan starts the scheduler (owning `model`) on a thread of its
    own and stops it after; without, the caller runs `scheduler.run()` on a thread of its choosing (`ktjax
    serve`: the main thread) and the app waits for it to be ready, then tells it to stop at shutdown."""
    scheduler = scheduler or Scheduler(model, max_queue=config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(scheduler.start if start_scheduler else scheduler.wait_ready)
        try:
            yield
        finally:
            if start_scheduler:
                await asyncio.to_thread(scheduler.stop)
            else:
                scheduler.stop_soon()

    app = FastAPI(title="ktjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", type="server_error"), status_code=500)

    def authorize(request: HTTPRequest) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    async def parse(request: HTTPRequest, kind):
        authorize(request)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        try:
            parsed = kind.model_validate_json(body)
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param=param) from None
        if parsed.model != config.model_id:
            raise APIError(404, f"model {parsed.model!r} does not exist; this server serves {config.model_id!r}",
                           param="model", code="model_not_found")
        return parsed

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": scheduler.active, "waiting": scheduler.waiting,
                "max_batch": scheduler.max_batch, "stats": dict(scheduler.stats)}

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [model_card(config.model_id, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: HTTPRequest):
        authorize(request)
        if model_id != config.model_id:
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card(config.model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        prepared = await asyncio.to_thread(prepare_chat, model, scheduler, body, config)
        return await respond(request, prepared, ChatFormat(config.model_id, prepared))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body: CompletionRequest = await parse(request, CompletionRequest)
        prepared = await asyncio.to_thread(prepare_completion, model, scheduler, body)
        return await respond(request, prepared, CompletionFormat(config.model_id))

    async def respond(request: HTTPRequest, prepared: Prepared, fmt):
        loop = asyncio.get_running_loop()
        events = Events(request)
        job = Request(prepared.prompt_ids, prepared.opts, lambda e: loop.call_soon_threadsafe(events.put, e),
                      ignore_eos=prepared.ignore_eos)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        usage = {"prompt_tokens": len(prepared.prompt_ids), "completion_tokens": 0,
                 "total_tokens": len(prepared.prompt_ids)}
        if prepared.stream:
            return StreamingResponse(stream_events(job, events, fmt, usage, prepared.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await collect(request, job, events, fmt, usage))

    async def collect(request: HTTPRequest, job: Request, events: Events, fmt, usage) -> dict[str, Any] | None:
        pieces = []
        try:
            while True:
                event = await events.next()
                if event is None:
                    return None  # nobody to answer; the slot is freed below
                if event.error is not None:
                    raise APIError(503 if scheduler.stopping else 500, event.error, type="server_error")
                pieces.append(event.text)
                if event.final:
                    break
        finally:
            events.close()
            scheduler.cancel(job)  # no-op once finished; frees the slot of a client that left
        usage.update(completion_tokens=event.completion_tokens,
                     total_tokens=usage["prompt_tokens"] + event.completion_tokens)
        return fmt.whole("".join(pieces), event.finish_reason, usage)

    async def stream_events(job: Request, events: Events, fmt, usage, include_usage: bool
                            ) -> AsyncIterator[str]:
        def sse(payload: dict[str, Any]) -> str:
            if include_usage:
                payload.setdefault("usage", None)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            opening = fmt.opening()
            for chunk in opening:
                yield sse(chunk)
            if not opening:
                yield ": accepted\n\n"  # an SSE comment: the response starts now, not at the first token
            while True:
                event = await events.next()
                if event is None:
                    return  # the client went away while its request waited or ran
                if event.error is not None:
                    yield sse(error_body(event.error, type="server_error"))
                    break
                for chunk in fmt.pieces(event.text, final=event.final):
                    yield sse(chunk)
                if event.final:
                    yield sse(fmt.finish(event.finish_reason))
                    if include_usage:
                        usage.update(completion_tokens=event.completion_tokens,
                                     total_tokens=usage["prompt_tokens"] + event.completion_tokens)
                        yield sse(fmt.usage_chunk(usage))
                    break
            yield "data: [DONE]\n\n"
        finally:
            events.close()
            scheduler.cancel(job)  # a client that disconnects frees its slot at the next step

    return app


class Events:
    """A request's events as the model's thread sends them, and whether its client is still there
    (a waiting request sends nothing, so a client that left is noticed by asking, every
    DISCONNECT_POLL_S)."""

    def __init__(self, request: HTTPRequest):
        self._request = request
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._get: asyncio.Future | None = None  # kept across polls: cancelling a get could drop an event

    def put(self, event: Event) -> None:
        self._queue.put_nowait(event)

    async def next(self) -> Event | None:
        """The next event, or None once the client has disconnected."""
        while True:
            self._get = self._get or asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({self._get}, timeout=DISCONNECT_POLL_S)
            if done:
                event, self._get = self._get.result(), None
                return event
            if await self._request.is_disconnected():
                return None

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ktjax"}


def sampling_options(model: LoadedModel, body, max_new_tokens: int) -> SamplingOptions:
    """The request's settings; what it leaves out comes from the checkpoint's generation_config.json,
    else OpenAI's defaults (temperature 1, top_p 1)."""
    defaults = model.generation_defaults
    temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
    top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
    top_k = body.top_k if body.top_k is not None else defaults.get("top_k", 0)
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    return SamplingOptions(max_new_tokens, float(temperature), float(top_p), max(int(top_k), 0), seed,
                           body.stop_strings())


def max_new_tokens(scheduler: Scheduler, asked: int | None, prompt_tokens: int, default: int | None) -> int:
    """What was asked, else `default`, else the rest of the context (at least 1: a prompt that fills
    the context is then refused by the scheduler's limits, with the numbers)."""
    if asked is not None:
        return asked
    rest = max(scheduler.context - prompt_tokens, 1)
    return rest if default is None else min(default, rest)


def prepare_chat(model: LoadedModel, scheduler: Scheduler, body: ChatCompletionRequest, config: ServeConfig
                 ) -> Prepared:
    messages = [m.as_template_input() for m in body.messages]
    try:
        ids = chat_prompt(model, messages, thinking=body.thinking())
    except Exception as e:  # the checkpoint's template rejected the conversation (roles, order, ...)
        raise APIError(400, f"messages: the chat template cannot render them ({e})", param="messages") from None
    n = max_new_tokens(scheduler, body.max_new_tokens(), len(ids), None)
    rendered_tail = model.tokenizer.decode(ids[-8:], skip_special_tokens=False)
    separate = config.separate_reasoning if body.separate_reasoning is None else body.separate_reasoning
    reasoning = ("separate" if separate else "inline") if rendered_tail.endswith(THINK_OPEN) else None
    return Prepared(ids, sampling_options(model, body, n), body.stream, include_usage(body), reasoning,
                    body.ignore_eos)


def prepare_completion(model: LoadedModel, scheduler: Scheduler, body: CompletionRequest) -> Prepared:
    try:
        ids = encode(model, body.the_prompt())
    except ValueError as e:
        raise APIError(400, f"prompt: {e}", param="prompt") from None
    if not ids:
        raise APIError(400, "prompt: empty (it encodes to no tokens)", param="prompt")
    n = max_new_tokens(scheduler, body.max_tokens, len(ids), 16)  # OpenAI's documented default for completions
    return Prepared(ids, sampling_options(model, body, n), body.stream, include_usage(body),
                    ignore_eos=body.ignore_eos)


def include_usage(body) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


class ChatFormat:
    """chat.completion objects and chat.completion.chunk deltas (role first; R1's reasoning apart)."""

    def __init__(self, model_id: str, prepared: Prepared):
        self.id, self.model_id, self.created = f"chatcmpl-{uuid.uuid4().hex}", model_id, int(time.time())
        self.reasoning = prepared.reasoning
        self.splitter = ReasoningSplitter() if self.reasoning == "separate" else None
        self._inline_opening = THINK_OPEN if self.reasoning == "inline" else ""

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.splitter is None:
            opening, self._inline_opening = self._inline_opening, ""
            return "", opening + text
        reasoning, content = self.splitter.feed(text)
        if final:
            r, c = self.splitter.finish()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def pieces(self, text: str, final: bool) -> list[dict[str, Any]]:
        reasoning, content = self._split(text, final)
        out = []
        if reasoning:
            out.append(self._chunk({"reasoning_content": reasoning}))
        if content:
            out.append(self._chunk({"content": content}))
        return out

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason)

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": [], "usage": usage}

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        reasoning, content = self._split(text, final=True)
        message = {"role": "assistant", "content": content}
        if self.splitter is not None:
            message["reasoning_content"] = reasoning
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "usage": usage,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]}


class CompletionFormat:
    """text_completion objects, streamed as chunks of the same object."""

    def __init__(self, model_id: str):
        self.id, self.model_id, self.created = f"cmpl-{uuid.uuid4().hex}", model_id, int(time.time())

    def _obj(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": choices}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def pieces(self, text: str, final: bool) -> list[dict[str, Any]]:
        return [self._obj([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])] if text else []

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._obj([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._obj([]), "usage": usage}

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._obj([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]),
                "usage": usage}
