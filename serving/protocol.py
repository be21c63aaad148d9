"""The OpenAI-compatible wire format as vLLM serves it: request parsing, error bodies, SSE frames.

Shared by the twin (which answers requests) and the router (which only reads what it needs to route and
forwards the body unchanged), so both refuse the same bad input with the same OpenAI error body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from servegym.serving.tokens import PromptError, count_messages, count_prompt

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
DONE_FRAME = b"data: [DONE]\n\n"
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An error answered with the OpenAI error body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ERROR_TYPES.get(status, "InternalServerError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=headers)

    def frame(self) -> bytes:
        """The error as an SSE event (an error after a stream was committed stays HTTP 200)."""
        return sse(self.body())


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event: exactly ``data: <json>\\n\\n``."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def unknown_model(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", "model")


def context_too_long(max_model_len: int, prompt_tokens: int) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
        f"{prompt_tokens} input tokens. Please reduce the length of the input prompt.",
        "prompt",
    )


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the twin and the router read of a completions or chat request body."""

    chat: bool
    model: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    max_tokens: int | None  # None: completions default 16, chat the remaining context
    min_tokens: int
    ignore_eos: bool
    body: dict[str, Any]


def _optional_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}, got {value!r}", name)
    return value


def parse_request(raw: bytes, chat: bool) -> ParsedRequest:
    """Parse a request body, raising :class:`ApiError` (400) naming what is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string; GET /v1/models lists the served names)", "model")
    try:
        if chat:
            if "messages" not in body:
                raise ApiError(400, "messages is required for a chat completion", "messages")
            prompt_tokens = count_messages(body["messages"])
        else:
            if "prompt" not in body:
                raise ApiError(400, "prompt is required for a completion", "prompt")
            prompt_tokens = count_prompt(body["prompt"])
    except PromptError as error:
        raise ApiError(400, str(error), error.param) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "stream_options can only be set when stream is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    options = options or {}
    max_tokens = _optional_int(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    if not chat and max_tokens is None:
        max_tokens = 16
    min_tokens = _optional_int(body, "min_tokens", 0) or 0
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"only n=1 is supported, got {n!r}", "n")
    return ParsedRequest(
        chat=chat,
        model=model,
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        continuous_usage=bool(options.get("continuous_usage_stats", False)),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        body=body,
    )
