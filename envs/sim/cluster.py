"""The cluster: engines built from instance groups, the arrival process, the router and its view.

The simulator never imports agents: the routing, batching and pool policies arrive as objects of the
base classes of :mod:`servegym.envs.sim.policies`, and anyone else follows the run as an
:class:`servegym.envs.sim.policies.Observer` registered with :meth:`Cluster.subscribe`.

Prefill/decode disaggregation: engines of role ``prefill`` compute prompts and hand each request over
to a decode-capable engine (role ``decode`` or ``both``) chosen by the router's ``route_decode`` (least
outstanding requests if it has none); the KV moves in ``latency + bytes / bandwidth`` over the link
between the two (``nvlink`` inside a node, ``network`` otherwise), the prefill engine holding it until
then. A pool policy may flip roles every monitoring interval: ``stateless`` flips (Arrow) relabel at
once and let in-flight work finish in place; ``drain`` flips stop routing to the instance, wait until it
is idle, keep it down for ``restart_delay_s``, then bring it back in the new role.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy
from servegym.envs.sim.engine import Engine, EngineConfig
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.metrics import SimResult
from servegym.envs.sim.policies import (
    BatchPolicy,
    Observer,
    PoolPolicy,
    RoutingPolicy,
    VllmPolicy,
    check_policy,
    overrides,
)
from servegym.envs.sim.request import Request, State
from servegym.envs.sim.roles import SERVING_ROLES, TAKES_NEW, Role, flip_allowed
from servegym.envs.sim.router_tap import RouterTap
from servegym.envs.sim.view import ClusterView, EngineInfo, EngineSnapshot, RequestInfo
from servegym.perfmodel.errors import PerfModelError
from servegym.perfmodel.structural import StructuralModel

__all__ = ["Cluster", "ClusterConfig", "InstanceGroup", "KvLink", "check_buildable"]


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` identical engines."""

    count: int
    engine: EngineConfig = field(default_factory=EngineConfig)
    name: str = ""
    node: str = ""  # engines of groups on the same non-empty node move KV over NVLink


@dataclass(frozen=True)
class KvLink:
    """A KV-transfer link: one-way latency and bandwidth."""

    bandwidth_gbps: float = 50.0  # GB/s (400 Gb/s RDMA)
    latency_ms: float = 1.0

    def seconds(self, num_bytes: float) -> float:
        return self.latency_ms / 1e3 + num_bytes / (self.bandwidth_gbps * 1e9)


DEFAULT_LINKS = {"network": KvLink(50.0, 1.0), "nvlink": KvLink(450.0, 0.01)}


@dataclass(frozen=True)
class ClusterConfig:
    """Instance groups plus how the router observes them."""

    groups: tuple[InstanceGroup, ...]
    snapshot_interval_s: float = 0.0  # Δ: 0 = the router reads live engine state
    oracle: bool = False  # reveal true output lengths to the router (upper bounds only)
    links: dict[str, KvLink] = field(default_factory=lambda: dict(DEFAULT_LINKS))
    monitor_interval_s: float = 1.0  # how often a pool policy is asked to rebalance
    flip: str = "stateless"  # stateless (Arrow: relabel, in-flight work finishes in place) or drain
    restart_delay_s: float = 30.0  # a drained instance's downtime before it serves in its new role

    def __post_init__(self) -> None:
        if not self.groups or sum(g.count for g in self.groups) < 1:
            raise ClusterConfigError("the cluster has no instance: give at least one group with count >= 1")
        for index, group in enumerate(self.groups):
            if group.count < 0:
                raise ClusterConfigError(f"group {group.name or index}: count must be non-negative")
        roles = {g.engine.role for g in self.groups if g.count}
        if not any(role.accepts_new for role in roles):
            raise ClusterConfigError("a decode pool without prefill instances: give a group of role prefill or both")
        if not any(role.accepts_decode for role in roles):
            raise ClusterConfigError("a prefill pool without decode instances: give a group of role decode or both")
        if self.snapshot_interval_s < 0:
            raise ClusterConfigError(f"snapshot_interval_s must be non-negative, got {self.snapshot_interval_s}")
        if self.flip not in ("stateless", "drain"):
            raise ClusterConfigError(f"flip must be 'stateless' or 'drain', got {self.flip!r}")
        if self.monitor_interval_s <= 0 or self.restart_delay_s < 0:
            raise ClusterConfigError("monitor_interval_s must be positive and restart_delay_s non-negative")
        if not {"network", "nvlink"} <= set(self.links):
            raise ClusterConfigError("links must define 'network' and 'nvlink'")

    @property
    def profiles(self) -> list[str]:
        """The performance-model profiles the cluster's engines use (what a run records)."""
        return sorted({g.engine.profile for g in self.groups if g.count})

    @property
    def disaggregated(self) -> bool:
        return any(g.engine.role is Role.PREFILL and g.count for g in self.groups)


def check_buildable(config: ClusterConfig) -> None:
    """Raise :class:`ClusterConfigError` naming the group if an engine of ``config`` cannot be built (an
    unknown GPU or model, a TP degree that does not divide the heads, weights that do not fit the GPU)."""
    for index, group in enumerate(config.groups):
        try:
            group.engine.kv_capacity()
        except PerfModelError as error:
            raise ClusterConfigError(f"group {group.name or index}: {error}") from None


class Cluster:
    """Builds the engines of ``config`` and runs a workload through ``router``.

    Args:
        config: instance groups and observability.
        router: a :class:`RoutingPolicy`.
        batch_policy: the engines' batch former (vLLM's default if omitted).
        seed: the simulator's own seed (step-time noise); the workload has its own.
        pool_policy: flips instance roles every monitoring interval (static pools if omitted).
        keep_requests: keep every finished and rejected request in :attr:`finished` / :attr:`rejected`
            (what :meth:`run` summarises); False for long streams, whose outcomes observers aggregate.
    """

    def __init__(
        self,
        config: ClusterConfig,
        router: RoutingPolicy,
        batch_policy: BatchPolicy | None = None,
        seed: int = 0,
        pool_policy: PoolPolicy | None = None,
        keep_requests: bool = True,
    ) -> None:
        check_policy("router", router, RoutingPolicy)  # the batch policy is checked by each engine
        if pool_policy is not None:
            check_policy("pool policy", pool_policy, PoolPolicy)
        self.config, self.router, self.pool_policy = config, router, pool_policy
        self.batch_policy = batch_policy or VllmPolicy()
        self.keep_requests = keep_requests
        self.nodes: list[str] = []
        self.flips: list[tuple[float, int, Role, Role]] = []  # (time, instance, from role, to role)
        self._arrived = self.completed = self.num_rejected = 0
        self._arrivals_done = False
        # listeners of each Observer hook, in subscription order (only hooks an observer overrides)
        self._on_arrival: list = []
        self._on_completion: list = []
        self._on_finish: list = []
        self._on_step: list = []  # shared with every engine
        self._subscribed: list[Observer] = []
        self.seed = seed
        self.env = simpy.Environment()
        self.finished: list[Request] = []
        self.rejected: list[Request] = []
        self.engines: list[Engine] = []
        for group_index, group in enumerate(config.groups):
            for _ in range(group.count):
                e = group.engine
                try:
                    engine = Engine(
                        self.env,
                        len(self.engines),
                        e,
                        self.batch_policy,
                        np.random.default_rng([seed, len(self.engines)]),
                        host=self,
                        step_listeners=self._on_step,
                    )
                except PerfModelError as error:
                    raise ClusterConfigError(f"group {group.name or group_index}: {error}") from None
                self.engines.append(engine)
                self.nodes.append(group.node)
        self.infos = [engine.config.engine_info(engine.index) for engine in self.engines]
        self.tap = RouterTap(len(self.engines))  # what the router knows from its own traffic
        self._snapshots = [self._snapshot(engine) for engine in self.engines]
        self._snapshot_tick = -1
        for policy in (router, self.batch_policy, pool_policy):
            if policy is not None:
                self.subscribe(policy)

    def subscribe(self, observer: Observer) -> None:
        """Tell ``observer`` what happens from now on (each object once; only the hooks its class overrides)."""
        if not isinstance(observer, Observer):
            raise TypeError(f"{observer!r} is not an envs.sim.policies.Observer")
        if any(observer is known for known in self._subscribed):
            return
        self._subscribed.append(observer)
        for hook, listeners in (
            ("on_arrival", self._on_arrival),
            ("on_completion", self._on_completion),
            ("on_finish", self._on_finish),
            ("on_step", self._on_step),
        ):
            if overrides(observer, Observer, hook):
                listeners.append(getattr(observer, hook))

    # -- the router's view -------------------------------------------------------------------------------
    def _snapshot(self, engine: Engine) -> EngineSnapshot:
        """The engine's gauges as a scrape now reads them (the tapped fields are filled at the decision)."""
        used = engine.used_blocks_at(self.env.now)
        return EngineSnapshot(
            time_s=self.env.now,
            num_requests_running=engine.num_running,
            num_requests_waiting=engine.num_waiting,
            kv_cache_usage_perc=used / engine.total_blocks,
            num_gpu_blocks=engine.total_blocks,
            block_size=engine.block_size,
            role=engine.role,
        )

    def view(self) -> ClusterView:
        """The view a policy gets now: the gauges live or of the latest refresh tick, the router tap live."""
        return ClusterView(
            self.env.now,
            self.infos,
            self._tapped_snapshots,
            list(self.tap.outstanding),
            list(self.tap.outstanding_prompt),
            [engine.role for engine in self.engines],
        )

    def _tapped_snapshots(self) -> list[EngineSnapshot]:
        now = self.env.now
        for engine in self.engines:  # tokens of decode jumps in progress, as far as they streamed by now
            engine.tell_tokens(now)
        if self.config.snapshot_interval_s == 0:
            gauges = [self._snapshot(engine) for engine in self.engines]
        else:
            gauges = self._snapshots
        return self.tap.snapshots(self.infos, gauges, self._model_of)

    def _model_of(self, info: EngineInfo) -> StructuralModel:
        return self.engines[info.index].perf

    # -- the EngineHost protocol: what a router relaying the engines' streams would see ------------------
    def engine_first_token(self, engine: Engine, request: Request) -> None:
        self.tap.first_token(engine.index, request.prompt_tokens)

    def engine_tokens(self, engine: Engine, decodes: int, gaps_s: np.ndarray | float) -> None:
        self.tap.decode_steps(engine.index, decodes, gaps_s)

    def _refresh(self, requests: Sequence[Request]):
        """Take snapshots at the refresh ticks that precede some arrival (the only ticks routers read)."""
        interval = self.config.snapshot_interval_s
        ticks = sorted({math.floor(r.arrival_s / interval) for r in requests})
        for tick in ticks:
            at = tick * interval
            if at > self.env.now:
                yield self.env.timeout(at - self.env.now)
            self._take_snapshots(tick)

    def _scrape(self):
        """For a stream of unknown length: take snapshots every interval while requests remain."""
        interval, tick = self.config.snapshot_interval_s, math.floor(self.env.now / self.config.snapshot_interval_s)
        while not self._arrivals_done or self.in_system > 0:
            tick += 1
            at = tick * interval
            if at > self.env.now:
                yield self.env.timeout(at - self.env.now)
            self._take_snapshots(tick)

    def _take_snapshots(self, tick: int) -> None:
        self._snapshots = [self._snapshot(engine) for engine in self.engines]
        self._snapshot_tick = tick

    # -- arrivals and completions ------------------------------------------------------------------------
    def _arrivals(self, requests: Iterable[Request], progress):
        env = self.env
        pending = State.PENDING
        for request in requests:
            if request.state is not pending:
                raise ValueError(f"request {request.id} was already simulated; generate the workload again")
            if request.arrival_s > env.now:
                yield env.timeout(request.arrival_s - env.now)
            self._arrived += 1
            info = self._request_info(request)
            for hook in self._on_arrival:
                hook(info)
            choice = self.router.route(info, self.view())
            if isinstance(choice, simpy.Event):  # an external decision maker (a Gymnasium agent) answers later
                choice = yield choice
            if not isinstance(choice, (int, np.integer)) or not 0 <= choice < len(self.engines):
                raise ValueError(
                    f"router {type(self.router).__name__} chose {choice!r} for request {request.id}; "
                    f"valid engines are 0..{len(self.engines) - 1}"
                )
            choice = int(choice)
            if self.engines[choice].role not in TAKES_NEW:
                raise ValueError(
                    f"router {type(self.router).__name__} sent request {request.id} to engine {choice}, "
                    f"whose role is {self.engines[choice].role}; new requests need a prefill instance"
                )
            if self.engines[choice].submit(request):
                self.tap.sent(choice, request.prompt_tokens)
            else:
                self._reject(request)
            if progress is not None:
                progress.update(1)
        self._arrivals_done = True

    def _request_info(self, request: Request) -> RequestInfo:
        """What a router may know of a request (its output length only in oracle mode)."""
        return RequestInfo(
            request.id,
            request.arrival_s,
            request.prompt_tokens,
            request.slo,
            request.session_id,
            request.output_tokens if self.config.oracle else None,
            request.hash_ids,
        )

    def _reject(self, request: Request) -> None:
        self.num_rejected += 1
        if self.keep_requests:
            self.rejected.append(request)

    def engine_finished(self, request: Request) -> None:
        """An engine finished ``request``: bookkeeping, then the observers (a router sees its length)."""
        self.tap.ended(request.instance, request.prompt_tokens, request.generated)
        self.completed += 1
        if self.keep_requests:
            self.finished.append(request)
        for hook in self._on_finish:
            hook(request)
        if self._on_completion:
            info = self._request_info(request)
            for hook in self._on_completion:
                hook(info, request.instance, request.output_tokens, self.env.now - request.arrival_s)

    # -- prefill/decode disaggregation -------------------------------------------------------------------
    def decode_candidates(self) -> list[int]:
        return [e.index for e in self.engines if e.role.accepts_decode]

    def engine_handoff(self, source: Engine, request: Request) -> simpy.Event | None:
        """A prefill finished on a prefill instance: choose a decode instance and move the KV there.

        With an external decision maker the choice is a pending event: the source engine waits on it, so
        decisions are taken one at a time, each seeing the bookkeeping of the previous, as inline ones do.
        """
        choice = self.router.route_decode(self._request_info(request), self.view())
        if isinstance(choice, simpy.Event):
            choice.callbacks.append(lambda event: self._start_transfer(source, request, event.value))
            return choice
        self._start_transfer(source, request, choice)
        return None

    def _start_transfer(self, source: Engine, request: Request, target) -> None:
        candidates = self.decode_candidates()
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or int(target) not in candidates:
            raise ValueError(
                f"router {type(self.router).__name__} chose engine {target!r} to decode request {request.id}; "
                f"decode-capable engines are {candidates}"
            )
        target = int(target)
        self.tap.moved(source.index, target, request.prompt_tokens, request.generated)
        same_node = self.nodes[source.index] and self.nodes[source.index] == self.nodes[target]
        link = self.config.links["nvlink" if same_node else "network"]
        seconds = link.seconds(request.computed * source.perf.model.kv_bytes_per_token(source.perf.dtype))
        request.transfer_s = seconds
        self.env.process(self._transfer(source, self.engines[target], request, seconds))

    def _transfer(self, source: Engine, target: Engine, request: Request, seconds: float):
        yield self.env.timeout(seconds)
        source.release_transferred(request)
        if request.aborted:  # its client left during the transfer: it ends here
            request.state, request.instance, request.finished_s = State.FINISHED, target.index, self.env.now
            self.engine_finished(request)
            return
        if not target.submit_decode(request):
            self.tap.ended(target.index, request.prompt_tokens, request.generated)
            self._reject(request)

    # -- pool policies -----------------------------------------------------------------------------------
    def _monitor(self):
        """Ask the pool policy for flips every monitoring interval while requests remain."""
        while not self._arrivals_done or self.in_system > 0:
            yield self.env.timeout(self.config.monitor_interval_s)
            flips = self.pool_policy.rebalance(self.view())
            if isinstance(flips, simpy.Event):
                flips = yield flips
            for index, role in flips or ():
                self.flip(int(index), role)

    def flip(self, index: int, role: Role | str) -> None:
        """Change an instance's role now (stateless) or after draining and a restart delay (drain). A flip
        that would leave no instance taking new requests or none decoding is refused."""
        engine = self.engines[index]
        if role not in SERVING_ROLES:
            raise ValueError(
                f"pool policy asked for role {role!r} on engine {index}; roles are {[str(r) for r in SERVING_ROLES]}"
            )
        role = Role(role)
        if engine.role is role or engine.role is Role.DRAINING:
            return
        if not flip_allowed([e.role for e in self.engines], index, role):
            return
        self.flips.append((self.env.now, index, engine.role, role))
        if self.config.flip == "stateless":
            engine.set_role(role)
        else:
            engine.set_role(Role.DRAINING)
            self.env.process(self._drain(engine, role))

    def _drain(self, engine: Engine, role: Role):
        poll = self.config.monitor_interval_s / 10
        while not engine.idle:
            yield self.env.timeout(poll)
        yield self.env.timeout(self.config.restart_delay_s)
        engine.set_role(role)

    def start(self, requests: Iterable[Request], progress=None) -> None:
        """Install the arrival, monitoring and snapshot processes without running the clock (environments
        step the simulation themselves). ``requests`` in arrival order: a list, or any iterable (a stream
        of unknown length, drawn as the clock reaches each arrival)."""
        is_sequence = isinstance(requests, Sequence)
        if is_sequence and any(r.state is not State.PENDING for r in requests):
            raise ValueError("requests were already simulated; generate the workload again for a new run")
        self.env.process(self._arrivals(requests, progress))
        if self.pool_policy is not None:
            self.env.process(self._monitor())
        if self.config.snapshot_interval_s > 0:
            if not is_sequence:
                self.env.process(self._scrape())
            elif requests:
                self.env.process(self._refresh(requests))

    @property
    def in_system(self) -> int:
        """Requests that arrived and have not finished or been rejected."""
        return self._arrived - self.completed - self.num_rejected

    def run(self, requests: Sequence[Request], until_s: float | None = None, progress: bool = False) -> SimResult:
        """Simulate ``requests`` (fresh copies are not made: pass newly generated ones) to completion or ``until_s``."""
        if any(r.state is not State.PENDING for r in requests):
            raise ValueError("requests were already simulated; generate the workload again for a new run")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="simulating", unit="req", mininterval=0.5)
        started = time.perf_counter()
        self.start(requests, bar)
        self.env.run(until=until_s)
        if bar is not None:
            bar.close()
        return SimResult(
            requests=list(requests),
            engines=self.engines,
            sim_s=self.env.now,
            wall_s=time.perf_counter() - started,
        )
