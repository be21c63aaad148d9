"""The engine against analytic expectations, and its decode jumps against step-by-step simulation."""

from dataclasses import dataclass

import numpy as np
import pytest
from servegym.envs.sim.cluster import InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import VllmPolicy
from servegym.envs.sim.workload import LengthSampler, RateSchedule, SyntheticWorkload
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.structural import StructuralModel
from simkit import frontend_s, make_requests


@dataclass(frozen=True)
class StepByStep(VllmPolicy):
    """vLLM's policy with decode jumps disabled: every step is simulated on its own."""

    supports_decode_jumps: bool = False


def test_lone_request_ttft_and_tpot_equal_the_performance_model(run_cluster):
    _, result = run_cluster(make_requests([(0.0, 1000, 50)]))
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    record = result.records().iloc[0]
    prefill = frontend_s(perf) + perf.predict(StepBatch.prefill(1000)) / 1e3
    decodes = [perf.predict(StepBatch.decode(1, 1000 + j)) / 1e3 for j in range(49)]
    assert record["ttft_s"] == pytest.approx(prefill, rel=1e-9)
    assert record["e2e_s"] == pytest.approx(prefill + sum(decodes), rel=1e-9)
    assert record["tpot_s"] == pytest.approx(sum(decodes) / 49, rel=1e-9)
    assert record["max_gap_s"] == pytest.approx(max(decodes), rel=1e-9)


def test_static_batch_e2e_is_one_prefill_plus_its_decode_steps(run_cluster):
    _, result = run_cluster(make_requests([(0.0, 500, 20)] * 8))
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    prefill = frontend_s(perf) + perf.predict(StepBatch.from_seqs([(500, 0)] * 8)) / 1e3
    decodes = sum(perf.predict(StepBatch.decode(8, 8 * (500 + j))) / 1e3 for j in range(19))
    np.testing.assert_allclose(result.records()["e2e_s"], prefill + decodes, rtol=1e-9)


def test_long_prompt_is_chunked_by_the_token_budget(run_cluster):
    groups = (InstanceGroup(1, EngineConfig(max_num_batched_tokens=2048)),)
    _, result = run_cluster(make_requests([(0.0, 5000, 2)]), groups=groups)
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    chunks = [StepBatch.prefill(2048, 0), StepBatch.prefill(2048, 2048), StepBatch.prefill(904, 4096)]
    expected = frontend_s(perf) + sum(perf.predict(c) for c in chunks) / 1e3
    assert result.records()["ttft_s"].iloc[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("utilization", "caching"), [(0.9, False), (0.35, False), (0.35, True)])
def test_decode_jumps_reproduce_step_by_step_simulation(run_cluster, utilization, caching):
    """0.35: KV so small that preemptions happen; with prefix caching, evictions too."""
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 40.0),), cv=2.0),
        lengths=LengthSampler("lognormal", prompt=800, output=300, prompt_sigma=0.8, output_sigma=0.8),
        num_requests=400,
        sessions=25 if caching else 0,
    )
    engine = EngineConfig(gpu="A100-80GB", gpu_memory_utilization=utilization, enable_prefix_caching=caching)
    groups = (InstanceGroup(2, engine),)
    jumped_cluster, jumped = run_cluster(workload.generate(3), groups=groups)
    stepped_cluster, stepped = run_cluster(workload.generate(3), groups=groups, policy=StepByStep())
    assert sum(e.jumps for e in jumped_cluster.engines) > 100
    assert sum(e.jumps for e in stepped_cluster.engines) == 0
    a, b = jumped.records(), stepped.records()
    for column in ("ttft_s", "e2e_s", "tpot_s", "max_gap_s", "queue_s"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-9, atol=1e-12, err_msg=column)
    assert (a["preemptions"] == b["preemptions"]).all()
    assert (a["prefix_hit_tokens"] == b["prefix_hit_tokens"]).all()
    if caching:
        assert a["prefix_hit_tokens"].sum() > 0
    if utilization < 0.5:
        assert a["preemptions"].sum() > 0


def test_observers_of_steps_see_every_step_with_its_batch_and_latency(run_cluster):
    """The feed an online refit consumes: one call per step, jumps included, latencies as simulated."""
    from servegym.envs.sim.cluster import Cluster, ClusterConfig
    from servegym.envs.sim.policies import LeastOutstandingRequests, Observer

    class Steps(Observer):
        def __init__(self):
            self.seen = []

        def on_step(self, engine, batch, latency_s):
            self.seen.append((batch, latency_s))

    cluster = Cluster(ClusterConfig((InstanceGroup(1, EngineConfig()),)), LeastOutstandingRequests())
    observer = Steps()
    cluster.subscribe(observer)
    cluster.subscribe(observer)  # once is enough: a second subscription of the same object is ignored
    seen = observer.seen
    cluster.run(make_requests([(0.0, 1000, 50), (0.05, 300, 80)]))
    engine = cluster.engines[0]
    assert engine.jumps > 0 and len(seen) == engine.step_count
    np.testing.assert_allclose([latency for _, latency in seen], engine.step_latencies(engine.step_count))
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    np.testing.assert_allclose([latency for _, latency in seen], [perf.predict(b) / 1e3 for b, _ in seen], rtol=1e-9)


def test_a_measured_kv_block_count_replaces_the_estimate(run_cluster):
    requests = make_requests([(0.0, 1000, 400)] * 6)
    estimated, _ = run_cluster(requests)
    cluster, result = run_cluster(
        make_requests([(0.0, 1000, 400)] * 6), groups=(InstanceGroup(1, EngineConfig(num_gpu_blocks=200)),)
    )
    assert estimated.engines[0].total_blocks > 1000 and cluster.engines[0].total_blocks == 200
    assert result.summary()["preemptions"] > 0  # 6 x 1400 tokens do not fit 3,200: vLLM would preempt too
    with pytest.raises(ClusterConfigError, match="num_gpu_blocks must be a positive integer"):
        EngineConfig(num_gpu_blocks=0)
