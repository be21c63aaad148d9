"""The router service: any routing policy of the project in front of OpenAI-compatible engines.

    python -m servegym.serving.router --config router.yaml [--port 8000] [--policy vllm_lor | RUN_DIR | EXPORT]

Each request is parsed only as far as routing needs (model, prompt tokens under the shared rule), the
policy chooses from the simulator's :class:`servegym.envs.sim.view.ClusterView` (scraped snapshots plus the
router's live bookkeeping), and the body goes to the chosen backend unchanged through one shared aiohttp
session. The response is committed only once the backend's status and headers arrived, so a connect
failure, a 5xx or a 429 fails over to the least-loaded remaining backend; a streamed body is relayed byte
for byte. A backend that fails is marked down and re-probed through ``/health``. Every request ends once,
as a relayed response or a counted error (:mod:`servegym.serving.router_metrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from servegym.envs.features import EngineModels
from servegym.envs.sim.policies import Observer, RoutingPolicy, least_outstanding, overrides
from servegym.envs.sim.request import SloClass
from servegym.envs.sim.roles import Role
from servegym.envs.sim.router_tap import RouterTap
from servegym.envs.sim.view import ClusterView, RequestInfo
from servegym.serving.http_server import LOOPBACK, Server
from servegym.serving.protocol import (
    CHAT,
    COMPLETIONS,
    DONE_FRAME,
    ApiError,
    ParsedRequest,
    parse_request,
    unknown_model,
)
from servegym.serving.router_config import RouterConfig, RouterConfigError, load_router_config, load_routing_policy
from servegym.serving.router_metrics import RouterMetrics
from servegym.serving.scrape import Scraper, gauge_snapshot
from servegym.serving.tokens import prefix_hashes, prompt_tokens_of

_HOP_BY_HOP_NAMES = "Connection Keep-Alive Proxy-Authenticate Proxy-Authorization TE Trailer Transfer-Encoding Upgrade"
HOP_BY_HOP = frozenset(h.lower() for h in [*_HOP_BY_HOP_NAMES.split(), "Host", "Content-Length"])
REQUEST_ID = "X-Request-Id"
SLO_HEADER, SESSION_HEADER = "X-SLO-Class", "X-Session-Id"


def session_id(value: object) -> int:
    """A session key (a header or the body's ``user``) as the simulator's integer session id; -1 for none."""
    if value is None or value == "":
        return -1
    text = str(value)
    if text.isdigit() and int(text) < 2**62:
        return int(text)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2


RETRY_STATUSES = frozenset({429})  # besides every 5xx: answered before anything was committed


def forwardable(headers: Any) -> CIMultiDict:
    """Headers without the hop-by-hop ones (and the ones the next hop recomputes)."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


@dataclass(eq=False)
class _Attempt:
    """One request's life at one backend: what the bookkeeping must undo when it ends."""

    backend: int
    prompt_tokens: int
    tokens: int = 0
    last_token_s: float = 0.0
    output_tokens: int | None = None  # the usage chunk's count, when the client asked for it


class StreamTap:
    """Counts tokens in a relayed SSE stream without re-framing it (events are split only to read them)."""

    def __init__(self, router: Router, attempt: _Attempt) -> None:
        self.router, self.attempt, self._buffer = router, attempt, b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *events, self._buffer = self._buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    @property
    def partial(self) -> bool:
        """Whether the bytes relayed so far end inside an event."""
        return bool(self._buffer)

    def _event(self, event: bytes) -> None:
        if not event.startswith(b"data: {"):
            return
        try:
            payload = json.loads(event[6:])
        except json.JSONDecodeError:
            return
        usage = payload.get("usage")
        choices = payload.get("choices") or []
        if not choices:
            if usage:
                self.attempt.output_tokens = usage.get("completion_tokens")
            return
        choice = choices[0]
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if text:
            self.router.token_seen(self.attempt)


class Router:
    """The router's application and state."""

    def __init__(self, config: RouterConfig, policy: RoutingPolicy) -> None:
        self.config, self.policy = config, policy
        self.n = len(config.urls)
        self.tap = RouterTap(self.n)  # what this router knows from its own traffic
        self.up = [True] * self.n
        self.down_reason = [""] * self.n
        self.metrics = RouterMetrics([str(i) for i in range(self.n)])
        self.models = EngineModels()
        self.session: aiohttp.ClientSession | None = None
        self.scraper: Scraper | None = None
        self._ids = itertools.count()
        self._t0 = time.monotonic()
        self._probes: dict[int, asyncio.Task] = {}
        self._on_arrival = policy.on_arrival if overrides(policy, Observer, "on_arrival") else None
        self._on_completion = policy.on_completion if overrides(policy, Observer, "on_completion") else None
        self.app = web.Application()
        self.app.on_startup.append(self._startup)
        self.app.on_cleanup.append(self._cleanup)
        self.app.add_routes(
            [
                web.post(COMPLETIONS, self._completions),
                web.post(CHAT, self._chat),
                web.get("/v1/models", self._list_models),
                web.get("/health", self._health),
                web.get("/metrics", self._metrics),
            ]
        )

    # -- lifecycle -----------------------------------------------------------------------------------
    async def _startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        self.scraper = Scraper(self.session, self.config.urls, self.config.scrape_interval_s, self.config.stale_s)
        await self.scraper.scrape_once()
        self.scraper.start()

    async def _cleanup(self, app: web.Application) -> None:
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
        if self.scraper is not None:
            await self.scraper.stop()
        if self.session is not None:
            await self.session.close()

    def now_s(self) -> float:
        """The policy's clock: simulated seconds when the backends are twins with a time scale."""
        return (time.monotonic() - self._t0) / self.config.time_scale

    # -- health --------------------------------------------------------------------------------------
    def mark_down(self, backend: int, reason: str) -> None:
        """Stop routing to ``backend`` until its /health answers 200 again."""
        self.up[backend] = False
        self.down_reason[backend] = reason
        if backend not in self._probes:
            self._probes[backend] = asyncio.get_running_loop().create_task(self._probe(backend))

    async def _probe(self, backend: int) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self.config.probe_interval_s * 4, 0.5))
        try:
            while True:
                await asyncio.sleep(self.config.probe_interval_s)  # the re-probe cadence
                try:
                    async with self.session.get(self.config.urls[backend] + "/health", timeout=timeout) as response:
                        if response.status == 200:
                            self.up[backend] = True
                            return
                except (aiohttp.ClientError, TimeoutError):
                    continue
        finally:
            self._probes.pop(backend, None)

    def _candidates(self, model: str, exclude: set[int]) -> list[int]:
        """Backends serving ``model`` that are up and not tried; fresh ones if any is fresh."""
        up = [i for i in range(self.n) if self.config.models[i] == model and self.up[i] and i not in exclude]
        fresh = [i for i in up if not self.scraper.stale(i)]
        return fresh or up

    def view(self, candidates: list[int]) -> ClusterView:
        """The simulator's view of the served cluster; non-candidates appear as draining (never chosen)."""
        now = self.now_s()
        chosen = set(candidates)
        roles = [Role.BOTH if i in chosen else Role.DRAINING for i in range(self.n)]

        def snapshots():
            scale, scraper = self.config.time_scale, self.scraper
            gauges = [
                gauge_snapshot(info, scraper.latest[i], now - scraper.age_s(i) / scale)
                for i, info in enumerate(self.config.infos)
            ]
            return self.tap.snapshots(self.config.infos, gauges, self.models)

        return ClusterView(
            now,
            list(self.config.infos),
            snapshots,
            list(self.tap.outstanding),
            list(self.tap.outstanding_prompt),
            roles,
        )

    # -- endpoints -------------------------------------------------------------------------------------
    async def _list_models(self, request: web.Request) -> web.Response:
        names = sorted(set(self.config.models))
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "servegym"} for m in names]}
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if any(self.up) else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        ages = [self.scraper.age_s(i) for i in range(self.n)]
        page = self.metrics.render(ages, self.up, self.tap.outstanding)
        return web.Response(body=page, content_type="text/plain", charset="utf-8")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    # -- proxying --------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.metrics.received.inc()
        request_id = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
        try:
            return await self._route(request, chat, request_id)
        except ApiError as error:
            kind = {400: "bad_request", 404: "unknown_model", 503: "no_backend"}.get(error.status, "internal")
            self.metrics.errors.labels(kind).inc()
            return error.response({REQUEST_ID: request_id})
        except asyncio.CancelledError:
            self.metrics.errors.labels("client_disconnect").inc()
            raise
        except Exception as error:  # never a traceback to the client: an OpenAI error body, counted
            self.metrics.errors.labels("internal").inc()
            return ApiError(500, f"router error: {type(error).__name__}: {error}").response({REQUEST_ID: request_id})

    def _slo_class(self, name: str | None) -> SloClass:
        classes = self.config.slo_classes
        if name is None:
            return classes[0] if classes else SloClass()
        if not classes:  # none configured: the class is a name without targets
            return SloClass(name)
        for slo in classes:
            if slo.name == name:
                return slo
        known = ", ".join(s.name for s in classes)
        raise ApiError(400, f"unknown SLO class {name!r} in {SLO_HEADER}; classes: {known}", SLO_HEADER)

    def decide(self, info: RequestInfo, candidates: list[int], first: bool) -> int:
        """The policy's choice on the first attempt; least outstanding among the rest on a failover."""
        view = self.view(candidates)
        if not first:
            return least_outstanding(view, candidates)
        started = time.perf_counter()
        choice = self.policy.route(info, view)
        self.metrics.decision.observe(time.perf_counter() - started)
        if isinstance(choice, bool) or not isinstance(choice, int) or choice not in candidates:
            return least_outstanding(view, candidates)  # what the simulator's fallback does for an invalid choice
        return int(choice)

    async def _route(self, request: web.Request, chat: bool, request_id: str) -> web.StreamResponse:
        raw = await request.read()
        parsed = parse_request(raw, chat)
        if parsed.model not in self.config.models:
            raise unknown_model(parsed.model)
        info = RequestInfo(
            next(self._ids),
            self.now_s(),
            parsed.prompt_tokens,
            self._slo_class(request.headers.get(SLO_HEADER)),
            session_id(request.headers.get(SESSION_HEADER) or parsed.body.get("user")),
            None,
            prefix_hashes(prompt_tokens_of(parsed.body, chat), self.config.segment_tokens),
        )
        if self._on_arrival is not None:
            self._on_arrival(info)
        headers = forwardable(request.headers)
        headers[REQUEST_ID] = request_id
        tried: set[int] = set()
        reasons: list[str] = []
        last_answer: tuple[int, tuple[int, CIMultiDict, bytes]] | None = None
        while candidates := self._candidates(parsed.model, tried):
            backend = self.decide(info, candidates, first=not tried)
            if tried:
                self.metrics.failovers.inc()
            tried.add(backend)
            self.metrics.routed.labels(str(backend)).inc()
            attempt = _Attempt(backend, parsed.prompt_tokens)
            self.tap.sent(backend, parsed.prompt_tokens)
            try:
                outcome = await self._attempt(request, parsed, raw, headers, attempt, info)
            finally:
                self.tap.ended(backend, parsed.prompt_tokens, attempt.tokens)
            if isinstance(outcome, web.StreamResponse):
                return outcome
            if isinstance(outcome, str):
                reasons.append(f"backend {backend} ({self.config.urls[backend]}): {outcome}")
            else:
                if outcome[0] < 500:
                    last_answer = backend, outcome
                reasons.append(f"backend {backend} answered {outcome[0]}: {_error_message(outcome[2])}")
        if last_answer is not None:  # a backend refused for now (429): relay its answer as it was
            backend, (status, answer_headers, body) = last_answer
            self.metrics.responses.labels(str(backend), str(status)).inc()
            return web.Response(status=status, body=body, headers=answer_headers)
        why = "; ".join(reasons) or "; ".join(
            f"backend {i} is down ({self.down_reason[i] or 'not serving ' + parsed.model})" for i in range(self.n)
        )
        raise ApiError(503, f"no backend can serve model {parsed.model!r}: {why}", kind="ServiceUnavailableError")

    async def _attempt(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        headers: CIMultiDict,
        attempt: _Attempt,
        info: RequestInfo,
    ) -> web.StreamResponse | str | tuple[int, CIMultiDict, bytes]:
        """Send to one backend. Returns the committed response, or the reason to fail over (a string for a
        connection failure, the backend's answer for a retryable status)."""
        backend = attempt.backend
        url = self.config.urls[backend] + request.path
        try:
            upstream = await self.session.post(url, data=raw, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = f"{type(error).__name__}: {error}"
            self.mark_down(backend, reason)
            return reason
        try:
            if upstream.status >= 500 or upstream.status in RETRY_STATUSES:
                body = await upstream.read()
                if upstream.status >= 500:
                    self.mark_down(backend, f"answered {upstream.status}")
                return upstream.status, forwardable(upstream.headers), body
            if not parsed.stream or upstream.content_type != "text/event-stream":
                try:
                    body = await upstream.read()  # whole: a failure before the end can still fail over
                except (aiohttp.ClientError, TimeoutError) as error:
                    self.mark_down(backend, f"{type(error).__name__}: {error}")
                    return f"failed before the end of its answer: {error}"
                self._completed(info, attempt, body)
                self.metrics.responses.labels(str(backend), str(upstream.status)).inc()
                return web.Response(status=upstream.status, body=body, headers=forwardable(upstream.headers))
            return await self._relay(request, upstream, attempt, info)
        finally:
            upstream.close()  # a no-op after a full read; cuts the upstream request when the client left

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, attempt: _Attempt, info: RequestInfo
    ) -> web.StreamResponse:
        """Commit the backend's status and headers, then pass the stream through byte for byte."""
        response = web.StreamResponse(status=upstream.status, headers=forwardable(upstream.headers))
        await response.prepare(request)
        tap = StreamTap(self, attempt)
        backend = attempt.backend
        chunks = upstream.content.iter_any()
        while True:
            try:
                chunk = await anext(chunks, None)
            except (aiohttp.ClientError, TimeoutError) as error:  # the backend died mid-stream
                self.mark_down(backend, f"died mid-stream: {error}")
                self.metrics.errors.labels("upstream_midstream").inc()
                message = f"backend {backend} failed mid-stream: {type(error).__name__}"
                broken = b"\n\n" if tap.partial else b""  # end a half-relayed event before the error frame
                with contextlib.suppress(ConnectionError):
                    await response.write(broken + ApiError(502, message, kind="BadGatewayError").frame() + DONE_FRAME)
                    await response.write_eof()
                return response
            if chunk is None:
                break
            tap.feed(chunk)
            try:
                await response.write(chunk)
            except ConnectionError:  # the client went away: the finally of _attempt closes the upstream request
                self.metrics.errors.labels("client_disconnect").inc()
                return response
        await response.write_eof()
        self._completed(info, attempt, None)
        self.metrics.responses.labels(str(backend), str(upstream.status)).inc()
        return response

    def token_seen(self, attempt: _Attempt) -> None:
        now = self.now_s()
        if attempt.tokens == 0:
            self.tap.first_token(attempt.backend, attempt.prompt_tokens)
        else:
            self.tap.token(attempt.backend, now - attempt.last_token_s)
        attempt.tokens += 1
        attempt.last_token_s = now

    def _completed(self, info: RequestInfo, attempt: _Attempt, body: bytes | None) -> None:
        """Tell the policy a response ended (its length from usage, else the tokens streamed)."""
        if self._on_completion is None:
            return
        tokens = attempt.output_tokens if attempt.output_tokens is not None else attempt.tokens
        if body is not None:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                tokens = int(json.loads(body)["usage"]["completion_tokens"])
        self._on_completion(info, attempt.backend, tokens, self.now_s() - info.arrival_s)


def _error_message(body: bytes) -> str:
    """The message of an OpenAI error body, or the start of whatever the backend sent."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


@contextlib.asynccontextmanager
async def start_router(
    config: RouterConfig, policy: RoutingPolicy | str, port: int = 0
) -> AsyncIterator[RunningRouter]:
    """A router served on loopback for the duration of the block (port 0: a free one)."""
    router = RunningRouter(config, policy, port)
    await router.start()
    try:
        yield router
    finally:
        await router.stop()


class RunningRouter:
    """A :class:`Router` and its server."""

    def __init__(self, config: RouterConfig, policy: RoutingPolicy | str, port: int = 0) -> None:
        if isinstance(policy, str):
            policy = load_routing_policy(policy, len(config.urls))
        self.router = Router(config, policy)
        self.server = Server(self.router.app, LOOPBACK, port)

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> str:
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m servegym.serving.router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="router YAML: cluster, backends, time_scale, ...")
    parser.add_argument(
        "--policy",
        help="a conf/policy name or YAML path, a training run directory or an ONNX export "
        "(default: the config's, else vllm_lor)",
    )
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        config = load_router_config(args.config)
        policy_name = args.policy or config.policy or "vllm_lor"
        config = replace(config, policy=policy_name)
        policy = load_routing_policy(policy_name, len(config.urls))
    except (RouterConfigError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

    async def serve() -> None:
        running = RunningRouter(config, policy, args.port)
        running.server.host = args.host
        url = await running.start()
        print(json.dumps({"router": url, "policy": policy_name, "backends": list(config.urls)}), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await running.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
