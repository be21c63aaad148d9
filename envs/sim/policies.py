"""The simulator's interfaces: the decisions it asks (routing, batching, pools), what it tells observers,
the read-only engine surface batch policies see, and the roles instances play.

Every policy, heuristic or learned, inline or an environment's agent, is an object of one of three base
classes whose optional members have documented defaults, so the simulator calls them without probing:

- :class:`RoutingPolicy` — ``route(request, view)`` (required) and ``route_decode(request, view)`` (the
  decode instance of a prefill/decode handoff; default: least outstanding requests);
- :class:`BatchPolicy` — ``token_budget(engine)`` (default: ``max_num_batched_tokens``), and the knobs
  ``max_chunk_tokens``, ``prefill_order``, ``admit``, ``choose_victim``, ``attach``, ``request_budget``;
- :class:`PoolPolicy` — ``rebalance(view)`` every monitoring interval (default: keep the pools).

A decision method may return its answer, or a pending ``simpy.Event`` that someone answers later (a
Gymnasium environment's agent): the simulator then waits on it without the clock moving. What such an
agent is asked is a typed :class:`Decision`.

All three bases are observers (:class:`Observer`). ``cluster.subscribe(observer)`` registers any observer; the
cluster subscribes its own router, batch and pool policies. Only the hooks a class overrides are called,
so a hook nobody overrides costs nothing on the simulator's hot path.

Where things go: a new decision kind is a :class:`DecisionKind` member, a base-class method here and the
place in ``cluster.py``/``engine.py`` that asks it; a new optional policy knob is a documented member with
its default on the base class; a new notification is an :class:`Observer` hook, a listener list in
``Cluster.subscribe`` and the one place that fires it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import simpy
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.roles import Role
from servegym.envs.sim.view import ClusterView, RequestInfo

if TYPE_CHECKING:
    from servegym.envs.sim.engine import Engine, EngineConfig
    from servegym.envs.sim.request import Request
    from servegym.perfmodel.batch import StepBatch
    from servegym.perfmodel.structural import StructuralModel


def least_outstanding(view: ClusterView, candidates: Sequence[int]) -> int:
    """The candidate with the fewest requests the router sent and has not seen finish, the first on ties
    (candidates in ascending order, as the view lists them): least-outstanding routing, the default decode
    placement, and where an invalid choice falls back to."""
    return min(candidates, key=view.outstanding_requests.__getitem__)


class Observer:
    """What happened in the simulator, for whoever listens. Override the hooks you need; the rest cost nothing."""

    def on_arrival(self, request: RequestInfo) -> None:
        """A request arrived at the router (before it is routed)."""

    def on_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        """A response ended, as a router sees it: the request, the instance that finished it, its length."""

    def on_finish(self, request: Request) -> None:
        """A request finished, with the simulator's whole record of it (rewards, metrics: not for routers)."""

    def on_step(self, engine: EngineView, batch: StepBatch, latency_s: float) -> None:
        """An engine ran a step: its batch and latency (the feed of online refits). Decode jumps report every step."""


def check_policy(what: str, policy: object, base: type) -> None:
    """Refuse a policy that is not an object of its base class (a name from a config, say), naming it."""
    if not isinstance(policy, base):
        hint = ""
        if isinstance(policy, str):
            hint = " (a name: load it through agents.harness.load_policy; a class: its import path, pkg.module:Class)"
        raise ClusterConfigError(
            f"{what} must be an envs.sim.policies.{base.__name__} object, got {policy!r}{hint}; "
            f"subclass {base.__name__} (its optional members have defaults)"
        )


def overrides(policy: object, base: type, member: str) -> bool:
    """Whether ``policy``'s class overrides ``base``'s method ``member`` (defaults are skipped on hot paths)."""
    return getattr(type(policy), member) is not getattr(base, member)


class RoutingPolicy(Observer):
    """Chooses an engine for each arriving request (and in prefill/decode clusters, for each decode)."""

    def route(self, request: RequestInfo, view: ClusterView) -> int | simpy.Event:
        """The engine (an index in ``view.prefill_candidates``) for an arriving request."""
        raise NotImplementedError(f"{type(self).__name__} must implement route(request, view)")

    def route_decode(self, request: RequestInfo, view: ClusterView) -> int | simpy.Event:
        """The decode instance (in ``view.decode_candidates``) of a prefilled request. Default: least
        outstanding requests, lowest index on ties."""
        return least_outstanding(view, view.decode_candidates)


class PoolPolicy(Observer):
    """Every monitoring interval: which instances flip role, ``[(index, Role), ...]``."""

    def rebalance(self, view: ClusterView) -> list[tuple[int, Role]] | simpy.Event:
        return []


class BatchPolicy(Observer):
    """How an engine forms its batch. One object serves every engine of a cluster (state keyed by
    ``engine.index``). Members and their defaults:

    - ``name``; ``supports_decode_jumps`` (True while the budget never drops below the running decodes,
      so a stretch of decode-only steps can be computed in one jump);
    - ``max_chunk_tokens`` (None: a prefill chunk is limited by the budget only); ``prefill_order``
      (``"admission"`` or ``"shortest_remaining"`` for running prefills);
    - :meth:`token_budget` every step, :meth:`request_budget` (an agent's answer for this step, called
      only when overridden), :meth:`admit` (veto an admission that fits, called only when overridden),
      :meth:`choose_victim` (which running request to preempt), :meth:`attach` (once per engine).
    """

    name: str = "batch"
    supports_decode_jumps: bool = True
    max_chunk_tokens: int | None = None
    prefill_order: str = "admission"

    def attach(self, engine: EngineView) -> None:
        """Called once for each engine the policy serves, before it runs."""

    def token_budget(self, engine: EngineView) -> int:
        """Tokens this step may compute (decodes take one each and are never starved)."""
        return engine.max_num_batched_tokens

    def request_budget(self, engine: EngineView) -> int | simpy.Event:
        """This step's budget decided from outside (an agent), possibly later; overrides :meth:`token_budget`."""
        return self.token_budget(engine)

    def admit(self, engine: EngineView, request: Request, blocks: int) -> bool:
        """Whether the waiting request at the head of the queue, which fits in ``blocks`` KV blocks, may start."""
        return True

    def choose_victim(self, engine: EngineView) -> Request:
        """The running request to preempt when a KV block is missing. Default (vLLM): the newest admitted."""
        return engine.newest_running()


@dataclass(frozen=True)
class VllmPolicy(BatchPolicy):
    """vLLM's default: a fixed ``max_num_batched_tokens`` per step."""

    name: str = "vllm"
    supports_decode_jumps: bool = True


@dataclass(frozen=True)
class SarathiPolicy(BatchPolicy):
    """Sarathi-Serve's stall-free batching: a small fixed chunk budget so decodes never wait on a long prefill."""

    chunk_tokens: int = 512
    name: str = "sarathi"
    supports_decode_jumps: bool = True

    def token_budget(self, engine: EngineView) -> int:
        return self.chunk_tokens


class StaticPools(PoolPolicy):
    """Keep the configured prefill/decode ratio."""


class RoundRobin(RoutingPolicy):
    """Engines in turn, blind to load."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        candidates = view.prefill_candidates
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


class LeastOutstandingRequests(RoutingPolicy):
    """The engine with the fewest requests the router sent and has not seen finish (ties: lowest index)."""

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        return least_outstanding(view, view.prefill_candidates)


class EngineView:
    """What a batch policy may read of one engine: its configuration, performance model and current
    scheduling state, read-only (as :class:`ClusterView` is for routers)."""

    __slots__ = ("_engine", "block_size", "config", "index", "max_num_batched_tokens", "max_num_seqs", "perf")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.index: int = engine.index
        self.config: EngineConfig = engine.config
        self.perf: StructuralModel = engine.perf
        self.block_size: int = engine.block_size
        self.max_num_batched_tokens: int = engine.config.max_num_batched_tokens
        self.max_num_seqs: int = engine.config.max_num_seqs

    @property
    def role(self) -> Role:
        return self._engine.role

    def cluster_view(self) -> ClusterView | None:
        """The router's view of the whole cluster now (what a learned batcher observes, as Batch-v0 does);
        None for an engine outside a cluster."""
        host = self._engine.host
        view = getattr(host, "view", None)
        return view() if view is not None else None

    @property
    def num_decodes(self) -> int:
        """Running sequences past their prefill."""
        return self._engine.n_dec

    @property
    def decode_context_tokens(self) -> int:
        """KV tokens of those decodes before the next step (each adds one token in it)."""
        return self._engine.dec_ctx_sum

    @property
    def num_running(self) -> int:
        return len(self._engine.running)

    @property
    def num_waiting(self) -> int:
        return len(self._engine.waiting)

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens queued or still prefilling."""
        return self._engine.pending_prefill_tokens

    @property
    def free_blocks(self) -> int:
        return self._engine.free_blocks

    @property
    def total_blocks(self) -> int:
        return self._engine.total_blocks

    def running_requests(self) -> tuple[Request, ...]:
        """Running requests in admission order (read them, never change them)."""
        return tuple(self._engine.running.values())

    def newest_running(self) -> Request:
        """The most recently admitted running request."""
        running = self._engine.running
        return running[next(reversed(running))]

    def held_blocks(self, request: Request) -> int:
        """KV blocks a running request holds exclusively (shared prefix blocks excluded)."""
        return self._engine.held_blocks(request)

    def computed_tokens(self, request: Request) -> int:
        """KV tokens a running request has computed (the work a preemption throws away)."""
        return self._engine.computed_tokens(request)


class DecisionKind(StrEnum):
    """The questions the simulator asks."""

    ROUTE = "route"  # an arriving request: which instance (prefill-capable)
    ROUTE_DECODE = "route_decode"  # a prefilled request in a PD cluster: which decode instance
    BATCH = "batch"  # an engine is about to step: its token budget
    POOLS = "pools"  # a monitoring tick: which instances flip role


@dataclass(frozen=True, slots=True, eq=False)
class Decision:
    """A question the simulator is waiting on: answer it with ``event.succeed(answer)``.

    ``request`` is set for routing kinds, ``engine`` for batching; ``view`` is the cluster as the router
    sees it at the decision.
    """

    kind: DecisionKind
    view: ClusterView
    event: simpy.Event
    request: RequestInfo | None = None
    engine: EngineView | None = None

    def answer(self, value: Any) -> None:
        self.event.succeed(value)
