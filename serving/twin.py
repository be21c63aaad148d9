"""An engine twin: an OpenAI-compatible server whose timing is one simulated ``servegym.envs.sim`` engine.

    python -m servegym.serving.twin --port 8001 --gpu H100-SXM --model Llama-3-8B --time-scale 1 --seed 0

Tokens stream when the simulated engine (same scheduler, KV cache, preemption and performance model as
the environments) produces them, against the wall clock slowed by ``--time-scale`` (simulated time =
wall time / K). Serves ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health`` and
``/metrics`` with vLLM's semantics (docs/serving.md), tags every response with ``X-ServeGym-Twin``, and
injects faults for tests: fail the first N requests, fail at random, stall, die. Test-only endpoints:
``GET /admin/last_request`` (the last body and headers received), ``POST /admin/die``, ``POST /admin/revive``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from aiohttp import web
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.errors import ClusterConfigError
from servegym.perfmodel.errors import PerfModelError
from servegym.serving.http_server import LOOPBACK, Server
from servegym.serving.protocol import (
    CHAT,
    COMPLETIONS,
    DONE_FRAME,
    ApiError,
    ParsedRequest,
    context_too_long,
    parse_request,
    sse,
    unknown_model,
)
from servegym.serving.tokens import output_tokens, prefix_hashes, prompt_tokens_of
from servegym.serving.twin_metrics import METRIC_NAMES, TwinMetrics
from servegym.serving.wall_clock_engine import EngineRejected, TokenStream, WallClockEngine

TWIN_HEADER = "X-ServeGym-Twin"


@dataclass(frozen=True)
class TwinConfig:
    """A twin's engine, identity, clock and faults (the CLI flags, one field each)."""

    gpu: str = "H100-SXM"
    model: str = "Llama-3-8B"
    tp: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    profile: str = "default"
    num_gpu_blocks: int | None = None  # KV blocks (None: from the model's memory budget, as the simulator does)
    served_model_name: str | None = None  # the name clients send; default: ``model``
    time_scale: float = 1.0  # wall seconds per simulated second
    seed: int = 0  # output text and natural output lengths
    engine_index: int = 0  # the ``engine`` label of its metrics
    name: str | None = None  # the X-ServeGym-Twin header; default: the engine index
    eos_mean_tokens: float = 128.0  # mean natural output length when EOS is not ignored (geometric)
    metric_names: str = "current"  # KV-usage gauge: current, deprecated or both names
    fail_first: int = 0  # the first N generation requests answer 500
    fail_rate: float = 0.0  # then each fails with this probability...
    fail_status: int = 500  # ...answering this status (500 or 429)
    stall_s: float = 0.0  # wall seconds every generation request waits before it is handled
    die_after: int | None = None  # die once this many generation requests have arrived

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            gpu=self.gpu,
            model=self.model,
            tp=self.tp,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            profile=self.profile,
            num_gpu_blocks=self.num_gpu_blocks,
        )


@dataclass(eq=False)
class _Live:
    """One request being answered: where to abort it if the twin dies."""

    request: web.Request
    stream: TokenStream | None = None
    aborted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Twin:
    """The twin's application and state; :meth:`serve` runs it on a socket.

    ``engine`` replaces the engine the config's flags describe by a whole :class:`EngineConfig` (what a
    ``conf/cluster`` group holds: dtype, noise, prefix caching, ... besides the flags), so the twin of a
    simulated cluster's engine is that engine; its ``model`` is then the served model name's default.
    """

    def __init__(self, config: TwinConfig, engine: EngineConfig | None = None) -> None:
        if engine is not None:
            config = replace(config, model=engine.model)
        self.config = config
        self.model_name = config.served_model_name or config.model
        self.tag = config.name or str(config.engine_index)
        engine_config = engine or config.engine_config()
        self.engine = WallClockEngine(engine_config, config.engine_index, config.time_scale, config.seed)
        self.max_model_len = self.engine.engine.max_model_len
        self.metrics = TwinMetrics(self.model_name, config.engine_index, config.metric_names)
        self.dead = False
        self.received = 0
        self.last_request: dict[str, Any] = {}
        self._failures_left = config.fail_first
        self._fault_rng = random.Random(config.seed)
        self._live: set[_Live] = set()
        self.app = web.Application()
        self.app.on_response_prepare.append(self._tag)
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self.app.add_routes(
            [
                web.post(COMPLETIONS, self._completions),
                web.post(CHAT, self._chat),
                web.get("/v1/models", self._models),
                web.get("/health", self._health),
                web.get("/metrics", self._metrics),
                web.get("/admin/last_request", self._last_request),
                web.post("/admin/die", self._die),
                web.post("/admin/revive", self._revive),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------------------
    async def _on_startup(self, app: web.Application) -> None:
        self.engine.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.die()
        await self.engine.stop()

    async def _tag(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[TWIN_HEADER] = self.tag

    def die(self) -> None:
        """Stop serving as a crashed engine does: in-flight connections are cut, /health answers 503."""
        self.dead = True
        for live in list(self._live):
            live.aborted = True
            if live.stream is not None:
                live.stream.changed.set()
            live.done.set()

    # -- small endpoints -------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "servegym",
            "root": self.config.model,
            "max_model_len": self.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.dead else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.engine.advance()
        return web.Response(body=self.metrics.render(self.engine.engine), content_type="text/plain", charset="utf-8")

    async def _last_request(self, request: web.Request) -> web.Response:
        return web.json_response(self.last_request)

    async def _die(self, request: web.Request) -> web.Response:
        self.die()
        return web.json_response({"dead": True})

    async def _revive(self, request: web.Request) -> web.Response:
        self.dead = False
        return web.json_response({"dead": False})

    # -- generation --------------------------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _fault(self) -> ApiError | None:
        """The injected failure for this request, if any (checked in the order of the CLI's fault menu)."""
        if self.config.die_after is not None and self.received > self.config.die_after:
            self.die()
        if self.dead:
            return ApiError(503, "the engine is dead (fault injection)", kind="EngineDeadError")
        if self._failures_left > 0:
            self._failures_left -= 1
            return ApiError(500, "injected failure (--fail-first)", kind="InternalServerError")
        if self.config.fail_rate and self._fault_rng.random() < self.config.fail_rate:
            return ApiError(self.config.fail_status, "injected failure (--fail-rate)")
        return None

    def _output_length(self, parsed: ParsedRequest, request_id: int) -> tuple[int, str]:
        """Tokens to generate and the finish reason: exactly ``max_tokens`` when EOS is ignored (or
        ``min_tokens`` reaches it), else a natural length drawn from the seed, ended by ``stop``."""
        room = self.max_model_len - parsed.prompt_tokens
        limit = min(parsed.max_tokens or room, room)  # beyond the context: clamped, as vLLM 0.33 does
        if parsed.ignore_eos or parsed.min_tokens >= limit:
            return limit, "length"
        rng = random.Random(f"{self.config.seed}:eos:{request_id}")
        natural = 1 + int(rng.expovariate(1.0 / max(self.config.eos_mean_tokens - 1, 1e-9)))
        length = min(max(natural, parsed.min_tokens, 1), limit)
        return length, "length" if length == limit else "stop"

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        self.received += 1
        self.last_request = {
            "path": request.path,
            "body": raw.decode("utf-8", "replace"),
            "headers": dict(request.headers),
        }
        if self.config.stall_s > 0:
            await asyncio.sleep(self.config.stall_s)  # the fault itself: a slow engine
        headers = {"X-Request-Id": request.headers.get("X-Request-Id") or uuid.uuid4().hex}
        try:
            fault = self._fault()
            if fault is not None:
                raise fault
            parsed = parse_request(raw, chat)
            if parsed.model != self.model_name:
                raise unknown_model(parsed.model)
            if parsed.prompt_tokens >= self.max_model_len:
                raise context_too_long(self.max_model_len, parsed.prompt_tokens)
            length, reason = self._output_length(parsed, self.engine._next_id)
            try:
                config = self.engine.engine.config
                hashes = (
                    prefix_hashes(prompt_tokens_of(parsed.body, chat), config.prefix_segment_tokens)
                    if config.enable_prefix_caching
                    else ()
                )
                stream = self.engine.submit(parsed.prompt_tokens, length, hashes)
            except EngineRejected as error:
                raise ApiError(400, f"the engine cannot serve this request: {error}", "prompt") from None
        except ApiError as error:
            return error.response(headers)
        live = _Live(request, stream)
        self._live.add(live)
        try:
            if parsed.stream:
                return await self._stream(request, parsed, stream, reason, headers, live)
            return await self._whole(parsed, stream, reason, headers, live)
        except ConnectionError:  # the client left (the finally aborts the simulated request)
            return web.Response(status=499)
        finally:
            self._live.discard(live)
            if not stream.finished:  # a client that left, or a crash: the engine stops serving it
                self.engine.abort(stream)

    def _finish(self, parsed: ParsedRequest, stream: TokenStream, reason: str) -> None:
        r = stream.request
        self.metrics.finished(
            parsed.prompt_tokens, stream.times_s, r.arrival_s, r.first_scheduled_s - r.arrival_s, reason
        )

    def _usage(self, parsed: ParsedRequest, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": parsed.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": parsed.prompt_tokens + completion_tokens,
        }

    def _abort(self, request: web.Request) -> web.StreamResponse:
        """Cut the connection without a proper end, as a crashed server does."""
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # aiohttp drops the handler of an aborted connection without a reply

    async def _whole(
        self, parsed: ParsedRequest, stream: TokenStream, reason: str, headers: dict[str, str], live: _Live
    ) -> web.Response:
        while not stream.finished and not live.aborted:
            await stream.wait(len(stream.times_s))
        if live.aborted:
            return self._abort(live.request)
        self._finish(parsed, stream, reason)
        text = "".join(_take(output_tokens(self.config.seed, stream.request.id), len(stream.times_s)))
        if parsed.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice.update(finish_reason=reason, stop_reason=None)
        body = {
            "id": _response_id(parsed, stream),
            "object": "chat.completion" if parsed.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": self._usage(parsed, len(stream.times_s)),
        }
        return web.json_response(body, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        stream: TokenStream,
        reason: str,
        headers: dict[str, str],
        live: _Live,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        base = {
            "id": _response_id(parsed, stream),
            "object": "chat.completion.chunk" if parsed.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if parsed.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            await response.write(sse({**base, "choices": [first]} | self._running_usage(parsed, 0)))
        words, sent = output_tokens(self.config.seed, stream.request.id), 0
        while True:
            await stream.wait(sent)
            if live.aborted:
                return self._abort(request)
            total = len(stream.times_s)
            frames = []
            while sent < total:
                sent += 1
                last = stream.finished and sent == total
                frames.append(sse({**base, "choices": [self._chunk(parsed, next(words), reason if last else None)]}
                                  | self._running_usage(parsed, sent)))  # fmt: skip
            if frames:
                await response.write(b"".join(frames))
            if stream.finished and sent == total:
                break
        self._finish(parsed, stream, reason)
        if parsed.include_usage:
            await response.write(sse({**base, "choices": [], "usage": self._usage(parsed, sent)}))
        await response.write(DONE_FRAME)
        await response.write_eof()
        return response

    def _chunk(self, parsed: ParsedRequest, text: str, finish_reason: str | None) -> dict[str, Any]:
        if parsed.chat:
            return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}

    def _running_usage(self, parsed: ParsedRequest, completion_tokens: int) -> dict[str, Any]:
        return {"usage": self._usage(parsed, completion_tokens)} if parsed.continuous_usage else {}


def _take(tokens, count: int) -> list[str]:
    return [next(tokens) for _ in range(count)]


def _response_id(parsed: ParsedRequest, stream: TokenStream) -> str:
    return f"{'chatcmpl' if parsed.chat else 'cmpl'}-{stream.request.id}"


@contextlib.asynccontextmanager
async def start_twin(
    config: TwinConfig | None = None, port: int = 0, engine: EngineConfig | None = None, **overrides: Any
) -> AsyncIterator[RunningTwin]:
    """A twin served on loopback for the duration of the block (port 0: a free one; ``engine``: see
    :class:`Twin`)."""
    twin = RunningTwin(config or TwinConfig(**overrides), port, engine)
    await twin.start()
    try:
        yield twin
    finally:
        await twin.stop()


class RunningTwin:
    """A :class:`Twin` and its server: ``url``, ``twin``, ``await start()``, ``await stop()`` (a crash
    as far as clients can tell: the port stops answering)."""

    def __init__(self, config: TwinConfig, port: int = 0, engine: EngineConfig | None = None) -> None:
        self.twin = Twin(config, engine)
        self.server = Server(self.twin.app, LOOPBACK, port)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> str:
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m servegym.serving.twin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=8001)
    defaults = TwinConfig()
    for f in fields(TwinConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = {"int": int, "float": float}.get(type(default).__name__, str)
        if f.name in ("max_model_len", "die_after", "num_gpu_blocks"):
            kind = int
        choices = METRIC_NAMES if f.name == "metric_names" else (500, 429) if f.name == "fail_status" else None
        parser.add_argument(flag, type=kind, default=default, choices=choices)
    return parser


async def _serve(config: TwinConfig, host: str, port: int) -> None:
    twin = Twin(config)
    server = Server(twin.app, host, port)
    url = await server.start()
    print(
        json.dumps({"twin": twin.tag, "url": url, "model": twin.model_name, "time_scale": config.time_scale}),
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    try:
        config = TwinConfig(**args)
        config.engine_config().kv_capacity()
    except (ClusterConfigError, PerfModelError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, host, port))


if __name__ == "__main__":
    main()
