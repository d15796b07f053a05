"""The OpenAI chat-completions wire format: the request body (with the Persona-Mux extras) and the JSON sent back."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. OpenAI fields not listed (``user``, ``logprobs``, ...) are accepted, ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A persona name from GET /v1/models, or the base model's name.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0, description="Extra (as vLLM's): no end of turn before this many.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy. Default 1, as OpenAI's.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Extra (as vLLM's): keep the k most likely tokens; 0: off.")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="Extra (as vLLM's); 1: off.")
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer (not included).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request; send several requests instead.")
    bias_scale: float | None = Field(None, ge=0, le=10, description="Extra: 1 full bias, 0.5 half, 0 none.")
    text_persona: str | None = Field(None, description="Extra: a text description placed before the soft prompt.")

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stop if s)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def model_card(name: str, created: int, owned_by: str = "personamux") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def completion_body(
    id_: str, model: str, text: str, finish_reason: str | None, usage: dict[str, int] | None
) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def chunk_body(
    id_: str, model: str, delta: dict[str, str], finish_reason: str | None = None, usage: dict | None = None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body
