"""The simulator's router tap: at every decision it equals what a router relaying the streams would count,
with and without decode jumps, and its closed forms equal the per-token updates the live router makes."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.policies import LeastOutstandingRequests, VllmPolicy
from servegym.envs.sim.request import State
from servegym.envs.sim.router_tap import RouterTap
from servegym.envs.sim.workload import LengthSampler, RateSchedule, SyntheticWorkload

RUNNING = (State.WAITING, State.PREFILL, State.DECODE)


@dataclass(frozen=True)
class StepByStep(VllmPolicy):
    supports_decode_jumps: bool = False


class Recorder(LeastOutstandingRequests):
    """Least-outstanding routing that records, at each decision, the tapped fields and what a router that
    saw every token of every request would count (from the requests' own state)."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.tapped: list[tuple] = []
        self.truth: list[tuple] = []

    def route(self, request, view):
        snaps = view.snapshots
        self.tapped.append(tuple((s.pending_prefill_tokens, s.num_decodes, s.decode_kv_tokens) for s in snaps))
        self.truth.append(self._count(view.now_s))
        return super().route(request, view)

    def _count(self, now):
        rows = []
        for engine in self.cluster.engines:
            pending = decodes = kv = 0
            for r in self._requests:
                if r.instance != engine.index or r.state in (State.PENDING, State.FINISHED, State.REJECTED):
                    continue
                if math.isnan(r.first_token_s):
                    pending += r.prompt_tokens
                    continue
                generated = r.generated  # step by step, a decode's count is exact after every step
                if r.state is State.DECODE:
                    generated = r.decode_entry_generated + engine.step_count - r.decode_entry_step
                decodes, kv = decodes + 1, kv + r.prompt_tokens + generated
            rows.append((pending, decodes, kv))
        return tuple(rows)


def run(policy, utilization=0.9, seed=3):
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 45.0),), cv=2.0),
        lengths=LengthSampler("lognormal", prompt=900, output=250, prompt_sigma=0.9, output_sigma=0.8),
        num_requests=300,
    )
    requests = workload.generate(seed)
    router = Recorder()
    groups = (InstanceGroup(2, EngineConfig(gpu_memory_utilization=utilization, max_num_batched_tokens=2048)),)
    cluster = Cluster(ClusterConfig(groups, snapshot_interval_s=0.1), router, batch_policy=policy, seed=seed)
    router.cluster, router._requests = cluster, requests
    cluster.run(requests)
    return router, cluster


@pytest.mark.parametrize("utilization", [0.9, 0.35])  # 0.35: preemptions (a preempted decode stays a decode)
def test_the_tap_counts_what_a_router_relaying_every_token_counts(utilization):
    stepwise, cluster = run(StepByStep(), utilization)
    assert stepwise.tapped == stepwise.truth
    assert any(any(d for _, d, _ in row) for row in stepwise.tapped)  # decodes were in flight at decisions
    if utilization < 0.5:
        assert sum(e.preemptions for e in cluster.engines) > 0
    jumping, cluster = run(VllmPolicy(), utilization)
    assert sum(e.jumps for e in cluster.engines) > 0
    assert jumping.tapped == stepwise.tapped  # mid-jump, the tokens streamed by the decision are counted


def test_decode_steps_equal_one_token_update_per_decode_and_step():
    closed, looped = RouterTap(1), RouterTap(1)
    for tap in (closed, looped):
        tap.sent(0, 100)
        tap.first_token(0, 100)
        tap.token(0, 0.02)
    gaps = np.array([0.011, 0.012, 0.0125, 0.03])
    closed.decode_steps(0, 3, gaps)
    for gap in gaps:
        for _ in range(3):
            looped.token(0, float(gap))
    assert closed.decode_kv == looped.decode_kv
    assert closed.gap_ewma_s[0] == pytest.approx(looped.gap_ewma_s[0], rel=1e-12)


def test_step_ewma_follows_the_engines_decode_steps():
    _, cluster = run(VllmPolicy())
    view = cluster.view()
    assert all(s.recent_step_ms > 0 for s in view.snapshots)  # both engines decoded
    mean_step_ms = 1e3 * np.mean(cluster.engines[0].step_latencies(50))
    assert 0.2 * mean_step_ms < view.snapshots[0].recent_step_ms < 5 * mean_step_ms


def test_aborted_requests_free_everything_wherever_they_are():
    """A client leaving in the frontend, the queue, mid-prefill or mid-decode (decode jumps on): the request
    ends, every KV block comes back, the others finish in full and the router tap returns to zero."""
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 60.0),)),
        lengths=LengthSampler("lognormal", prompt=1500, output=200, prompt_sigma=0.8, output_sigma=0.8),
        num_requests=200,
    )
    requests = workload.generate(5)
    groups = (InstanceGroup(1, EngineConfig(gpu_memory_utilization=0.4, max_num_batched_tokens=1024)),)
    cluster = Cluster(ClusterConfig(groups), LeastOutstandingRequests(), seed=0)
    engine = cluster.engines[0]
    seen: dict[State | str, int] = {}

    def client_leaves(env):
        for k in range(150):
            yield env.timeout(0.017)
            live = [r for r in requests if r.state in RUNNING and r.instance == 0 and not r.aborted]
            if live and k % 3 == 0:
                victim = live[k % len(live)]
                where = "frontend" if victim.state is State.WAITING and victim not in engine.waiting else victim.state
                seen[where] = seen.get(where, 0) + 1
                engine.abort(victim)

    def leaves_at_once(env, request):  # within the API server's request overhead (the frontend)
        yield env.timeout(request.arrival_s + 1e-4 - env.now)
        assert request.state is State.WAITING and request not in engine.waiting
        seen["frontend"] = seen.get("frontend", 0) + 1
        engine.abort(request)

    cluster.env.process(client_leaves(cluster.env))
    cluster.env.process(leaves_at_once(cluster.env, requests[40]))
    cluster.run(requests)
    assert {"frontend", State.WAITING, State.PREFILL, State.DECODE} <= set(seen), seen
    assert engine.jumps > 0
    aborted = [r for r in requests if r.aborted]
    assert len(aborted) == sum(seen.values())
    assert all(r.state in (State.FINISHED, State.REJECTED) and r.generated <= r.output_tokens for r in requests)
    assert all(r.generated == r.output_tokens for r in requests if not r.aborted and r.state is State.FINISHED)
    assert any(r.generated < r.output_tokens for r in aborted)
    assert engine.free_blocks == engine.total_blocks and engine.n_dec == 0 and not engine.running
    assert engine.waiting_tokens == engine.prefill_remaining == 0
    tap = cluster.tap
    assert tap.outstanding == tap.pending_prefill == tap.decodes == tap.decode_kv == [0]
    assert len(cluster.finished) + cluster.num_rejected == len(requests)
