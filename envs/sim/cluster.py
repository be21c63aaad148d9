"""The cluster: engines built from instance groups, the arrival process, the router and its view.

The simulator never imports agents: the routing and batching policies arrive as objects satisfying the
protocols of :mod:`envs.sim.routing` and :mod:`envs.sim.engine`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import simpy

from envs.sim.engine import BatchPolicy, Engine, EngineConfig, VllmPolicy
from envs.sim.metrics import SimResult
from envs.sim.request import Request, State
from envs.sim.routing import RoutingPolicy
from envs.sim.view import ClusterView, EngineInfo, EngineSnapshot, RequestInfo
from perfmodel.errors import PerfModelError
from perfmodel.structural import StructuralModel


class ClusterConfigError(ValueError):
    """An impossible cluster configuration; the message says which group and why."""


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` identical engines."""

    count: int
    engine: EngineConfig = field(default_factory=EngineConfig)
    name: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """Instance groups plus how the router observes them."""

    groups: tuple[InstanceGroup, ...]
    snapshot_interval_s: float = 0.0  # Δ: 0 = the router reads live engine state
    oracle: bool = False  # reveal true output lengths to the router (upper bounds only)

    def __post_init__(self) -> None:
        if not self.groups or sum(g.count for g in self.groups) < 1:
            raise ClusterConfigError("the cluster has no instance: give at least one group with count >= 1")
        for index, group in enumerate(self.groups):
            if group.count < 0:
                raise ClusterConfigError(f"group {group.name or index}: count must be non-negative")
        if self.snapshot_interval_s < 0:
            raise ClusterConfigError(f"snapshot_interval_s must be non-negative, got {self.snapshot_interval_s}")


class Cluster:
    """Builds the engines of ``config`` and runs a workload through ``router``.

    Args:
        config: instance groups and observability.
        router: a :class:`RoutingPolicy`.
        batch_policy: the engines' batch former (vLLM's default if omitted).
        seed: the simulator's own seed (step-time noise); the workload has its own.
    """

    def __init__(
        self,
        config: ClusterConfig,
        router: RoutingPolicy,
        batch_policy: BatchPolicy | None = None,
        seed: int = 0,
    ) -> None:
        self.config, self.router = config, router
        self.batch_policy = batch_policy or VllmPolicy()
        self.seed = seed
        self.env = simpy.Environment()
        self.finished: list[Request] = []
        self.rejected: list[Request] = []
        self.engines: list[Engine] = []
        perfs: dict[tuple, StructuralModel] = {}
        for group_index, group in enumerate(config.groups):
            for _ in range(group.count):
                e = group.engine
                key = (e.gpu, e.model, e.tp, e.dtype)
                try:
                    if key not in perfs:
                        perfs[key] = StructuralModel(e.gpu, e.model, tp=e.tp, dtype=e.dtype)
                    engine = Engine(
                        self.env,
                        len(self.engines),
                        e,
                        self.batch_policy,
                        np.random.default_rng([seed, len(self.engines)]),
                        self._on_finish,
                        perf=perfs[key],
                    )
                except PerfModelError as error:
                    raise ClusterConfigError(f"group {group.name or group_index}: {error}") from None
                self.engines.append(engine)
        self.infos = [
            EngineInfo(
                eng.index,
                eng.perf.gpu.name,
                eng.perf.model.name,
                eng.config.tp,
                eng.config.max_num_batched_tokens,
                eng.config.max_num_seqs,
                eng.total_blocks * eng.block_size,
            )
            for eng in self.engines
        ]
        self.outstanding = [0] * len(self.engines)
        self.outstanding_prompt = [0] * len(self.engines)
        self._snapshots = [self._snapshot(engine) for engine in self.engines]
        self._snapshot_tick = -1

    # -- the router's view -------------------------------------------------------------------------------
    def _snapshot(self, engine: Engine) -> EngineSnapshot:
        used = engine.used_blocks_at(self.env.now)
        cache = engine.cache
        return EngineSnapshot(
            time_s=self.env.now,
            num_requests_running=engine.num_running,
            num_requests_waiting=engine.num_waiting,
            kv_cache_usage_perc=used / engine.total_blocks,
            num_gpu_blocks=engine.total_blocks,
            block_size=engine.block_size,
            prefix_cache_hits=cache.hit_tokens if cache else 0,
            prefix_cache_queries=cache.query_tokens if cache else 0,
        )

    def view(self) -> ClusterView:
        """The view a policy gets now: live snapshots, or the ones of the latest refresh tick."""
        if self.config.snapshot_interval_s == 0:
            snapshots = lambda: [self._snapshot(engine) for engine in self.engines]  # noqa: E731 (lazy)
        else:
            snapshots = self._snapshots
        return ClusterView(self.env.now, self.infos, snapshots, list(self.outstanding), list(self.outstanding_prompt))

    def _refresh(self, requests: Sequence[Request]):
        """Take snapshots at the refresh ticks that precede some arrival (the only ticks anyone reads)."""
        interval = self.config.snapshot_interval_s
        ticks = sorted({math.floor(r.arrival_s / interval) for r in requests})
        for tick in ticks:
            at = tick * interval
            if at > self.env.now:
                yield self.env.timeout(at - self.env.now)
            self._snapshots = [self._snapshot(engine) for engine in self.engines]
            self._snapshot_tick = tick

    # -- arrivals and completions ------------------------------------------------------------------------
    def _arrivals(self, requests: Sequence[Request], progress):
        env = self.env
        for request in requests:
            if request.arrival_s > env.now:
                yield env.timeout(request.arrival_s - env.now)
            info = RequestInfo(
                request.id,
                request.arrival_s,
                request.prompt_tokens,
                request.slo,
                request.session_id,
                request.output_tokens if self.config.oracle else None,
                request.hash_ids,
            )
            choice = self.router.route(info, self.view())
            if not isinstance(choice, (int, np.integer)) or not 0 <= choice < len(self.engines):
                raise ValueError(
                    f"router {type(self.router).__name__} chose {choice!r} for request {request.id}; "
                    f"valid engines are 0..{len(self.engines) - 1}"
                )
            choice = int(choice)
            if self.engines[choice].submit(request):
                self.outstanding[choice] += 1
                self.outstanding_prompt[choice] += request.prompt_tokens
            else:
                self.rejected.append(request)
            if progress is not None:
                progress.update(1)

    def _on_finish(self, request: Request) -> None:
        self.outstanding[request.instance] -= 1
        self.outstanding_prompt[request.instance] -= request.prompt_tokens
        self.finished.append(request)

    def run(self, requests: Sequence[Request], until_s: float | None = None, progress: bool = False) -> SimResult:
        """Simulate ``requests`` (fresh copies are not made: pass newly generated ones) to completion or ``until_s``."""
        if any(r.state is not State.PENDING for r in requests):
            raise ValueError("requests were already simulated; generate the workload again for a new run")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="simulating", unit="req", mininterval=0.5)
        started = time.perf_counter()
        self.env.process(self._arrivals(requests, bar))
        if self.config.snapshot_interval_s > 0 and requests:
            self.env.process(self._refresh(requests))
        self.env.run(until=until_s)
        if bar is not None:
            bar.close()
        return SimResult(
            requests=list(requests),
            engines=self.engines,
            sim_s=self.env.now,
            wall_s=time.perf_counter() - started,
        )


def single_group(count: int, **engine: object) -> ClusterConfig:
    """A homogeneous cluster of ``count`` engines (a convenience for tests and notebooks)."""
    return ClusterConfig(groups=(InstanceGroup(count, replace(EngineConfig(), **engine)),))
