"""Prefix caching: hits shorten prefill, shared blocks are reference-counted, evictions keep KV consistent."""

from pathlib import Path

import numpy as np
import pytest
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.policies import LeastOutstandingRequests, RoundRobin, RoutingPolicy
from servegym.envs.sim.prefix_cache import PrefixCache
from servegym.envs.sim.request import Request, SloClass
from servegym.envs.sim.workload import LengthSampler, RateSchedule, SyntheticWorkload, TraceWorkload, session_hashes
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.structural import StructuralModel
from simkit import frontend_s

CACHED = EngineConfig(enable_prefix_caching=True)


def _session_requests(specs):
    return [
        Request(i, a, p, d, SloClass(), session_id=s, hash_ids=session_hashes(s, p))
        for i, (a, p, d, s) in enumerate(specs)
    ]


def _run(requests, engine=CACHED, count=1, router=None):
    cluster = Cluster(ClusterConfig((InstanceGroup(count, engine),)), router or LeastOutstandingRequests())
    return cluster, cluster.run(requests)


def test_a_later_turn_of_the_same_session_skips_the_cached_prefix():
    cluster, result = _run(_session_requests([(0.0, 2100, 5, 7), (5.0, 2100, 5, 7), (10.0, 2100, 5, 8)]))
    records = result.records().set_index("id")
    assert list(records["prefix_hit_tokens"]) == [0, 2048, 0]  # 4 full segments of 512; 52 tokens recomputed
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    front = frontend_s(perf)
    assert records.loc[1, "ttft_s"] == pytest.approx(front + perf.predict(StepBatch.prefill(52, 2048)) / 1e3, rel=1e-9)
    assert records.loc[2, "ttft_s"] == pytest.approx(front + perf.predict(StepBatch.prefill(2100)) / 1e3, rel=1e-9)
    engine = cluster.engines[0]
    assert engine.free_blocks == engine.total_blocks and engine.cache.evictable_blocks == 8 * 32


def test_concurrent_requests_share_blocks_while_running():
    cluster, _ = _run(_session_requests([(0.0, 4096, 400, 1), (1.0, 4096, 400, 1)]))
    engine = cluster.engines[0]
    assert engine.min_free_blocks >= engine.total_blocks - (4096 + 400) // 16 * 2 + 7 * 32  # 7 segments shared


def test_caching_off_means_no_hits():
    _, result = _run(_session_requests([(0.0, 2100, 5, 7), (5.0, 2100, 5, 7)]), engine=EngineConfig())
    assert result.records()["prefix_hit_tokens"].sum() == 0


def test_lru_eviction_forgets_the_least_recently_released_segment():
    cache = PrefixCache(512, 16)
    cache.publish([1, 2, 3])
    assert cache.release([1, 2, 3]) == 3 * 32
    cache.acquire([1])
    cache.release([1])  # 1 is now the most recently released
    assert cache.evict(40) == 64  # whole segments: 2 then 3 go
    assert cache.match([1]) == 1 and cache.match([2]) == 0


def test_mooncake_hash_ids_drive_hits():
    trace = Path(__file__).parent / "data" / "mooncake_sample.jsonl"
    requests = TraceWorkload(path=str(trace)).generate(0)
    _, result = _run(requests)
    hits = result.records()["prefix_hit_tokens"].tolist()
    assert hits == [0, 12 * 512, 0]  # the second shares 12 leading blocks with the first


def test_cache_aware_placement_matters():
    """Same sessions, two engines: routing a session to one engine gets hits that round-robin loses half of."""
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 4.0),)),
        lengths=LengthSampler(prompt=3000, output=20),
        num_requests=200,
        sessions=60,
    )
    engine = EngineConfig(enable_prefix_caching=True)

    class BySession(RoutingPolicy):
        def route(self, request, view):
            return request.session_id % view.num_engines

    sticky = _run(workload.generate(0), engine, count=2, router=BySession())[1].summary()
    spread = _run(workload.generate(0), engine, count=2, router=RoundRobin())[1].summary()
    assert sticky["prefix_hit_rate"] > 0.5
    assert sticky["prefix_hit_rate"] > spread["prefix_hit_rate"] + 0.1
    assert sticky["ttft_p50_s"] < spread["ttft_p50_s"]


def test_hits_survive_kv_pressure_without_leaks():
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 30.0),), cv=2.0),
        lengths=LengthSampler(
            "lognormal", prompt=3000, output=300, prompt_sigma=0.5, output_sigma=0.8, max_prompt=6000, max_output=2000
        ),
        num_requests=300,
        sessions=20,
    )
    engine = EngineConfig(gpu="A100-80GB", enable_prefix_caching=True, gpu_memory_utilization=0.3)
    cluster, result = _run(workload.generate(4), engine, count=2)
    records = result.records()
    assert (records["state"] == "finished").all()
    assert records["prefix_hit_tokens"].sum() > 0 and records["preemptions"].sum() > 0
    for e in cluster.engines:
        assert e.min_free_blocks >= 0 and e.free_blocks == e.total_blocks and not e.cache.refs
        assert np.isfinite(e.busy_s)
