"""Properties that hold for any cluster and workload: nothing lost, KV within capacity, tokens conserved."""

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.policies import LeastOutstandingRequests, RoundRobin, SarathiPolicy, VllmPolicy
from servegym.envs.sim.request import State
from servegym.envs.sim.workload import LengthSampler, RateSchedule, SyntheticWorkload
from simkit import make_requests

ENGINES = [
    EngineConfig(gpu="H100-SXM", model="Llama-3-8B"),
    EngineConfig(gpu="A100-80GB", model="Llama-3-8B", gpu_memory_utilization=0.3, max_num_batched_tokens=2048),
    EngineConfig(gpu="L40S", model="Mistral-7B", max_num_seqs=16, noise_sigma=0.1),
    EngineConfig(gpu="A100-80GB", model="Llama-2-70B", tp=4, block_size=32),
    EngineConfig(gpu="H100-SXM", model="Llama-3-8B", gpu_memory_utilization=0.25, enable_prefix_caching=True),
]


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    engine_picks=st.lists(st.integers(0, len(ENGINES) - 1), min_size=1, max_size=3),
    rate=st.floats(1.0, 60.0),
    cv=st.floats(0.5, 4.0),
    prompt=st.integers(1, 6000),
    output=st.integers(1, 1500),
    sigma=st.floats(0.0, 1.2),
    count=st.integers(1, 150),
    seed=st.integers(0, 2**16),
    sarathi=st.booleans(),
    round_robin=st.booleans(),
    stale=st.sampled_from([0.0, 0.1]),
    sessions=st.sampled_from([0, 3, 30]),
    disaggregated=st.booleans(),
)
def test_every_request_is_accounted_for_and_kv_stays_within_capacity(
    engine_picks, rate, cv, prompt, output, sigma, count, seed, sarathi, round_robin, stale, sessions, disaggregated
):
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, rate),), cv=cv),
        lengths=LengthSampler(
            "lognormal",
            prompt=prompt,
            output=output,
            prompt_sigma=sigma,
            output_sigma=sigma,
            max_prompt=100_000,
            max_output=20_000,
        ),
        num_requests=count,
    )
    requests = workload.generate(seed)
    groups = tuple(InstanceGroup(1, ENGINES[i]) for i in engine_picks)
    if disaggregated:  # the first engine becomes the prefill pool, a copy of it the decode pool
        first = groups[0].engine
        groups = (
            InstanceGroup(1, replace(first, role="prefill")),
            InstanceGroup(1, replace(first, role="decode")),
            *groups[1:],
        )
    cluster = Cluster(
        ClusterConfig(groups, snapshot_interval_s=stale),
        RoundRobin() if round_robin else LeastOutstandingRequests(),
        batch_policy=SarathiPolicy() if sarathi else VllmPolicy(),
        seed=seed,
    )
    result = cluster.run(requests)
    for request in result.requests:
        if request.state is State.REJECTED:
            assert request.reject_reason
            continue
        assert request.state is State.FINISHED
        assert request.generated == request.output_tokens
        eps = 1e-9  # simpy advances time by adding gaps, which may round the arrival instant by an ulp
        assert request.arrival_s - eps <= request.first_scheduled_s <= request.first_token_s <= request.finished_s
        assert request.max_gap_s >= 0 and not math.isnan(request.max_gap_s)
    for engine in cluster.engines:
        assert engine.min_free_blocks >= 0
        assert engine.free_blocks == engine.total_blocks  # every block came back
        assert engine.n_dec == 0 and engine.dec_ctx_sum == 0 and not engine.running and not engine.waiting
        assert engine.waiting_tokens == 0 and engine.prefill_remaining == 0
        if engine.cache is not None:
            assert not engine.cache.refs and engine.cache.evictable_blocks <= engine.total_blocks
        assert np.all(engine.step_latencies(engine.step_count) > 0)
        assert engine.busy_s >= float(engine.step_latencies(engine.step_count).sum()) - 1e-9
    assert len(cluster.finished) + len(cluster.rejected) == len(requests)
    tap = cluster.tap  # the router's own account came back to zero too: nothing it counted was lost
    assert tap.outstanding == tap.outstanding_prompt == tap.pending_prefill == [0] * len(cluster.engines)
    assert tap.decodes == tap.decode_kv == [0] * len(cluster.engines)
    if disaggregated:
        assert all(r.prefill_instance != 1 for r in result.requests if r.state is State.FINISHED)


def test_requests_that_can_never_fit_are_rejected_with_a_reason(run_cluster):
    _, result = run_cluster(make_requests([(0.0, 9000, 10), (0.1, 100, 10)]))
    records = result.records().set_index("id")
    assert records.loc[0, "state"] == "rejected" and "max_model_len" in records.loc[0, "reject_reason"]
    assert records.loc[1, "state"] == "finished"
    assert result.summary()["rejected"] == 1


def test_same_seeds_give_identical_results(run_cluster):
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 30.0),), cv=3.0),
        lengths=LengthSampler("empirical", source="azure_conv"),
        num_requests=500,
    )
    groups = (InstanceGroup(2, EngineConfig(noise_sigma=0.05)), InstanceGroup(2, EngineConfig(gpu="A100-80GB")))
    first = run_cluster(workload.generate(7), groups=groups, seed=1)[1].records()
    second = run_cluster(workload.generate(7), groups=groups, seed=1)[1].records()
    other = run_cluster(workload.generate(7), groups=groups, seed=2)[1].records()
    assert first.equals(second)
    assert not first.equals(other)  # the simulator's own seed drives the step-time noise


def test_littles_law_on_a_stationary_run():
    """Time-average number in system, sampled independently, equals arrival rate × mean time in system."""
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 20.0),)), lengths=LengthSampler("empirical", source="azure_conv"), duration_s=600.0
    )
    requests = workload.generate(11)
    cluster = Cluster(ClusterConfig((InstanceGroup(2, EngineConfig()),)), LeastOutstandingRequests())
    samples = []

    def sampler(env):
        while env.now < 600.0:
            samples.append(sum(e.num_running + e.num_waiting for e in cluster.engines))
            yield env.timeout(0.25)

    cluster.env.process(sampler(cluster.env))
    records = cluster.run(requests).records()
    in_window = records[records["arrival_s"] >= 60.0]  # skip the warm-up
    rate = len(in_window) / (600.0 - 60.0)
    little = rate * in_window["e2e_s"].mean()
    observed = float(np.mean(samples[240:]))
    assert observed > 1.0
    assert little == pytest.approx(observed, rel=0.1)
