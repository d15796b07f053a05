"""The OpenAI-compatible HTTP API (FastAPI) over a `BatchEngine` and a `PersonaStore`.

``GET /v1/models``, ``POST /v1/chat/completions`` (plain and server-sent events), ``POST /v1/personas`` and
``DELETE /v1/personas/{name}``. Every error is OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..conversation import encode_conversation, num_positions
from .engine import BatchEngine, Event, GenerationRequest, QueueFull
from .personas import PersonaStore, PersonaStoreError
from .sampling import SamplingParams
from .schemas import (
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    model_card,
)

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass
class ServerSettings:
    base_name: str  # the model id that means "no persona"
    max_context: int  # positions a prompt and its answer may take together
    default_max_tokens: int = 256  # when a request names no max_tokens
    retry_after_s: int = 1  # sent with 429


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = error_body(message, _ERROR_TYPES.get(status, "server_error"), code, param)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: BatchEngine, personas: PersonaStore, settings: ServerSettings) -> FastAPI:
    model, tokenizer = engine.model, engine.tokenizer
    config = model.adapter_config()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="personamux", lifespan=lifespan)
    app.state.engine, app.state.personas, app.state.settings = engine, personas, settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.status, err.message, err.code, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, "The request body is not valid JSON.", "invalid_json")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error_response(422, f"{where}: {first.get('msg', 'invalid value')}", "invalid_value", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail))

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "running": engine.running,
            "queued": engine.queued,
            "prefix_cache": {
                "entries": len(engine.prefix_cache),
                "hits": engine.prefix_cache.hits,
                "misses": engine.prefix_cache.misses,
            },
            **engine.stats,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [model_card(settings.base_name, created, "base")]
        cards += [model_card(name, created) for name in personas.names()]
        return {"object": "list", "data": cards}

    def prepare(body: ChatCompletionRequest) -> tuple[str | None, GenerationRequest]:
        persona = None if body.model == settings.base_name else body.model
        if persona is not None and persona not in personas:
            raise ApiError(
                404,
                f"The model {body.model!r} does not exist: GET /v1/models lists the personas "
                "(and the base model); POST /v1/personas uploads one.",
                "model_not_found",
                "model",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text_persona = body.text_persona if body.text_persona is not None else personas.text_persona(persona)
        try:
            encoded = encode_conversation(
                tokenizer,
                messages,
                config.placeholder_token_id,
                text_persona,
                personas.info.instruction,
                persona is not None,
            )
        except ValueError as err:
            raise ApiError(400, str(err), "invalid_messages", "messages") from None
        bias = float(model.bias_scale if body.bias_scale is None else body.bias_scale)
        virtual = 0 if persona is None else config.num_virtual(bias)
        prompt_tokens = num_positions(encoded.input_ids, config.placeholder_token_id, virtual)
        room = settings.max_context - prompt_tokens
        asked = body.max_completion_tokens or body.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"This model's maximum context length is {settings.max_context} tokens; the "
                f"messages take {prompt_tokens} (soft prompt included) and max_tokens asks for "
                f"{asked or 1}. Shorten the messages or lower max_tokens.",
                "context_length_exceeded",
                "messages",
            )
        if len(body.stop_strings()) > 4:
            raise ApiError(400, "`stop` takes at most 4 strings.", "invalid_value", "stop")
        prefix = encoded.prefix_length
        ids = encoded.input_ids
        if persona is not None and config.placeholder_token_id in ids[prefix:]:
            prefix = len(ids) - 1  # the soft prompt must be in the cached part; this prefix is this request's own
        prefix = max(1, min(prefix, len(ids) - 1))
        sampling = SamplingParams(
            max_tokens=asked or min(settings.default_max_tokens, room),
            min_tokens=body.min_tokens or 0,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
            stop=body.stop_strings(),
        )
        return persona, GenerationRequest(persona, bias, ids, prefix, prompt_tokens, sampling, emit=lambda e: None)

    def submit(request: GenerationRequest) -> asyncio.Queue[Event]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        request.emit = emit
        try:
            engine.submit(request)
        except QueueFull as err:
            raise ApiError(
                429,
                f"The server is busy: {err} Retry after {settings.retry_after_s} s.",
                "queue_full",
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from None
        return events

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _, generation = prepare(body)
        events = submit(generation)
        id_ = completion_id()
        if body.stream:
            usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(events, generation, id_, body.model, usage_wanted),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        parts: list[str] = []
        getter = asyncio.ensure_future(events.get())  # one pending get at a time: no event is ever dropped
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=0.5)
                if not done:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; the row is freed below
                    continue
                event = getter.result()
                if event.kind == "delta":
                    parts.append(event.text)
                    getter = asyncio.ensure_future(events.get())
                elif event.kind == "error":
                    raise ApiError(event.status, event.text)
                else:
                    return completion_body(id_, body.model, "".join(parts), event.finish_reason, event.usage)
        finally:
            getter.cancel()
            generation.cancelled.set()  # a no-op once finished; frees the row if the client left

    @app.post("/v1/personas", status_code=201)
    async def upload_persona(request: Request, name: str | None = None) -> dict:
        data = await request.body()
        try:
            stored = await asyncio.to_thread(personas.upload, data, name)
        except PersonaStoreError as err:
            raise ApiError(err.status, str(err), "invalid_persona" if err.status == 422 else None) from None
        return model_card(stored, int(time.time()))

    @app.delete("/v1/personas/{name:path}")
    async def delete_persona(name: str) -> dict:
        try:
            await asyncio.to_thread(personas.delete, name)
        except PersonaStoreError as err:
            raise ApiError(err.status, str(err), "model_not_found" if err.status == 404 else None) from None
        return {"id": name, "object": "model", "deleted": True}

    return app


async def _stream(
    events: asyncio.Queue[Event], generation: GenerationRequest, id_: str, model: str, usage_wanted: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield sse(chunk_body(id_, model, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event.kind == "delta":
                yield sse(chunk_body(id_, model, {"content": event.text}))
            elif event.kind == "error":
                yield sse(error_body(event.text, "server_error" if event.status >= 500 else "invalid_request_error"))
                break
            else:
                yield sse(chunk_body(id_, model, {}, event.finish_reason))
                if usage_wanted:
                    yield sse(chunk_body(id_, model, None, usage=event.usage))
                break
        yield "data: [DONE]\n\n"
    finally:
        generation.cancelled.set()  # the client went away mid-stream (or we are done): free the row
