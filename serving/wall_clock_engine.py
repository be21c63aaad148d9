"""One simulated engine of ``servegym.envs.sim`` driven against the wall clock: the twin's timing.

Simulated time is ``(wall − t0) / time_scale``. The simpy environment is advanced to "now" whenever
someone looks (a request arrives, ``/metrics`` is read) and, in between, by a driver task that sleeps
until the wall time of the next simulated event. The engine runs with decode jumps disabled, so every
step is its own simpy event and each running request's generated-token count can be read after it:
a token is released to its stream when the simulated engine produces it, stamped with its simulated time.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np
import simpy
from servegym.envs.sim.engine import Engine, EngineConfig
from servegym.envs.sim.policies import VllmPolicy
from servegym.envs.sim.request import Request, State

MIN_SLEEP_S = 0.0005  # the driver's shortest sleep: tokens are released at most this late (wall)


@dataclass(frozen=True)
class PerTokenVllmPolicy(VllmPolicy):
    """vLLM's batching with decode jumps off: one simpy event per step, so each token has its own time."""

    supports_decode_jumps: bool = False


class EngineRejected(ValueError):
    """The simulated engine can never serve the request (it exceeds the context or the KV cache)."""


@dataclass(eq=False)
class TokenStream:
    """The tokens of one request as the engine produces them: simulated time of each, and whether it ended."""

    request: Request
    times_s: list[float] = field(default_factory=list)
    finished: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, seen: int) -> None:
        """Return once more than ``seen`` tokens exist or the request finished."""
        while len(self.times_s) <= seen and not self.finished:
            self.changed.clear()
            await self.changed.wait()


class WallClockEngine:
    """An :class:`servegym.envs.sim.engine.Engine` whose simulated clock follows the wall clock."""

    def __init__(self, config: EngineConfig, index: int = 0, time_scale: float = 1.0, seed: int = 0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.time_scale = time_scale
        self.env = simpy.Environment()
        self.engine = Engine(self.env, index, config, PerTokenVllmPolicy(), np.random.default_rng([seed, index]), self)
        self._t0 = time.monotonic()
        self._streams: dict[int, TokenStream] = {}
        self._next_id = 0
        self._seen_step = 0
        self._wakeup: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    # -- the EngineHost protocol -------------------------------------------------------------------------
    def engine_finished(self, request: Request) -> None:
        """Nothing to do here: :meth:`_collect` sees the finished state right after the step."""

    def engine_first_token(self, engine: Engine, request: Request) -> None:
        """Nothing to do here either: the tokens are read off the request after each step."""

    def engine_tokens(self, engine: Engine, decodes: int, gaps_s: object) -> None:
        """As :meth:`engine_first_token`."""

    def engine_handoff(self, engine: Engine, request: Request) -> None:
        raise RuntimeError("a twin is a single colocated engine; it never hands prefills over")

    # -- clock ---------------------------------------------------------------------------------------------
    def now_s(self) -> float:
        """Simulated seconds since the twin started."""
        return (time.monotonic() - self._t0) / self.time_scale

    def advance(self) -> None:
        """Run the simulation up to the wall clock's now, releasing every token produced on the way."""
        env, target = self.env, self.now_s()
        while env.peek() <= target:
            env.step()
            if self.engine.step_count != self._seen_step:
                self._seen_step = self.engine.step_count
                self._collect()
        if target > env.now:
            env.run(until=target)

    def _collect(self) -> None:
        now, step = self.env.now, self.engine.step_count
        done = []
        for request_id, stream in self._streams.items():
            request = stream.request
            if request.state is State.DECODE:
                generated = request.decode_entry_generated + step - request.decode_entry_step
            else:
                generated = request.generated
            if generated > len(stream.times_s):
                stream.times_s.extend([now] * (generated - len(stream.times_s)))
                stream.changed.set()
            if request.state is State.FINISHED:
                stream.finished = True
                stream.changed.set()
                done.append(request_id)
        for request_id in done:
            del self._streams[request_id]

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, prompt_tokens: int, output_tokens: int, hash_ids: tuple[int, ...] = ()) -> TokenStream:
        """Start a request now (``hash_ids``: its prompt's prefix hashes, for prefix caching); raises
        :class:`EngineRejected` with the engine's reason if it can never run."""
        self.advance()
        request = Request(self._next_id, self.env.now, prompt_tokens, output_tokens, hash_ids=hash_ids)
        self._next_id += 1
        if not self.engine.submit(request):
            raise EngineRejected(request.reject_reason)
        stream = TokenStream(request)
        self._streams[request.id] = stream
        self._poke()
        return stream

    def abort(self, stream: TokenStream) -> None:
        """Its client went away: the simulated engine stops serving the request and frees its KV."""
        self.advance()
        self.engine.abort(stream.request)
        self._poke()

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # -- the driver task -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the driver on the running event loop."""
        self._t0 = time.monotonic() - self.env.now * self.time_scale
        self._task = asyncio.get_running_loop().create_task(self._drive())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _poke(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.advance()
            self._wakeup = loop.create_future()
            upcoming = self.env.peek()
            handle = None
            if upcoming != math.inf:
                delay = self._t0 + upcoming * self.time_scale - time.monotonic()
                handle = loop.call_later(max(delay, MIN_SLEEP_S), self._poke)
            await self._wakeup
            if handle is not None:
                handle.cancel()
