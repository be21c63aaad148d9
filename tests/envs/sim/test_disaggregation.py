"""Prefill/decode pools: handoff with KV transfer, role flips (stateless and drain), impossible pools."""

from dataclasses import dataclass, replace

import numpy as np
import pytest
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.config import cluster_from
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import LeastOutstandingRequests, PoolPolicy, RoundRobin, RoutingPolicy, VllmPolicy
from servegym.envs.sim.request import State
from servegym.envs.sim.workload import LengthSampler, RateSchedule, SyntheticWorkload
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.structural import StructuralModel
from simkit import frontend_s, make_requests

PREFILL, DECODE = EngineConfig(role="prefill"), EngineConfig(role="decode")


def _pd(prefill=1, decode=1, node="", **config):
    groups = (InstanceGroup(prefill, PREFILL, "p", node=node), InstanceGroup(decode, DECODE, "d", node=node))
    return ClusterConfig(groups, **config)


@pytest.mark.parametrize(("node", "bandwidth", "latency"), [("", 50e9, 1e-3), ("rack0", 450e9, 1e-5)])
def test_handoff_adds_the_kv_transfer_between_first_and_second_token(node, bandwidth, latency):
    cluster = Cluster(_pd(node=node), LeastOutstandingRequests())
    record = cluster.run(make_requests([(0.0, 1000, 20)])).records().iloc[0]
    perf = StructuralModel("H100-SXM", "Llama-3-8B")
    prefill = frontend_s(perf) + perf.predict(StepBatch.prefill(1000)) / 1e3
    transfer = latency + 1000 * 131072 / bandwidth
    decodes = sum(perf.predict(StepBatch.decode(1, 1000 + j)) / 1e3 for j in range(19))
    assert (record["prefill_instance"], record["instance"]) == (0, 1)
    assert record["ttft_s"] == pytest.approx(prefill, rel=1e-9)
    assert record["transfer_s"] == pytest.approx(transfer, rel=1e-9)
    assert record["e2e_s"] == pytest.approx(prefill + transfer + decodes, rel=1e-9)


def test_pd_cluster_loses_nothing_and_frees_all_kv():
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 30.0),), cv=2.0),
        lengths=LengthSampler("empirical", source="azure_conv"),
        num_requests=600,
    )
    cluster = Cluster(_pd(2, 2), RoundRobin())
    records = cluster.run(workload.generate(0)).records()
    assert (records["state"] == "finished").all()
    assert set(records["prefill_instance"]) == {0, 1} and set(records["instance"]) == {2, 3}
    assert (records["transfer_s"] > 0).all()
    for engine in cluster.engines:
        assert engine.free_blocks == engine.total_blocks and engine.min_free_blocks >= 0


@dataclass(frozen=True)
class StepByStep(VllmPolicy):
    supports_decode_jumps: bool = False


def test_decode_instances_jump_exactly_as_they_step():
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 25.0),), cv=2.0),
        lengths=LengthSampler("lognormal", prompt=1500, output=300, prompt_sigma=0.7, output_sigma=0.9),
        num_requests=300,
    )
    a = Cluster(_pd(1, 2), LeastOutstandingRequests()).run(workload.generate(2)).records()
    b = Cluster(_pd(1, 2), LeastOutstandingRequests(), batch_policy=StepByStep()).run(workload.generate(2)).records()
    for column in ("ttft_s", "e2e_s", "max_gap_s"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-9, atol=1e-12)


class FlipOnceAt(PoolPolicy):
    """Flip one instance to a role at the first monitoring tick at or after ``at_s``."""

    def __init__(self, index, role, at_s):
        self.index, self.role, self.at_s, self.done = index, role, at_s, False

    def rebalance(self, view):
        if self.done or view.now_s < self.at_s:
            return []
        self.done = True
        return [(self.index, self.role)]


def test_stateless_flip_keeps_in_flight_prefills_in_place_for_decode():
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 20.0),)), lengths=LengthSampler(prompt=3000, output=50), num_requests=200
    )
    cluster = Cluster(_pd(2, 1, monitor_interval_s=2.0), RoundRobin(), pool_policy=FlipOnceAt(1, "decode", 2.0))
    records = cluster.run(workload.generate(0)).records()
    assert cluster.flips == [(2.0, 1, "prefill", "decode")]
    stayed = records[(records["prefill_instance"] == 1) & (records["instance"] == 1)]
    assert len(stayed) > 0 and (stayed["transfer_s"] == 0).all()  # prefilled before the flip, decoded in place
    assert (records[records["arrival_s"] > 2.1]["prefill_instance"] == 0).all()  # no new prefills on instance 1
    assert (records["state"] == "finished").all()


def test_drain_flip_takes_the_instance_out_for_the_restart_delay():
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 10.0),)), lengths=LengthSampler(prompt=500, output=50), num_requests=400
    )
    config = _pd(2, 1, monitor_interval_s=1.0, flip="drain", restart_delay_s=10.0)
    cluster = Cluster(config, RoundRobin(), pool_policy=FlipOnceAt(1, "decode", 5.0))
    records = cluster.run(workload.generate(0)).records()
    assert cluster.flips[0][1:] == (1, "prefill", "decode")
    served = records[records["instance"] == 1]
    assert len(served) > 0  # back as a decode instance after the restart
    decode_starts = served["arrival_s"] + served["ttft_s"]
    assert decode_starts.min() > 5.0 + 10.0  # nothing decoded there before drain + restart
    assert (records[(records["arrival_s"] > 5.1) & (records["arrival_s"] < 15.0)]["prefill_instance"] == 0).all()
    assert cluster.engines[1].role == "decode"


def test_a_flip_that_would_empty_a_pool_is_refused():
    cluster = Cluster(_pd(1, 1), RoundRobin(), pool_policy=FlipOnceAt(0, "decode", 0.0))
    cluster.run(make_requests([(0.0, 100, 5), (3.0, 100, 5)]))
    assert cluster.flips == [] and cluster.engines[0].role == "prefill"


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ((InstanceGroup(2, DECODE),), "a decode pool without prefill instances"),
        ((InstanceGroup(2, PREFILL),), "a prefill pool without decode instances"),
    ],
)
def test_impossible_pools_fail_at_start(groups, message):
    with pytest.raises(ClusterConfigError, match=message):
        ClusterConfig(groups)


def test_an_unknown_role_is_named_when_the_engine_is_configured():
    with pytest.raises(ClusterConfigError, match=r"role must be one of .*got 'mixed'"):
        EngineConfig(role="mixed")
    with pytest.raises(ClusterConfigError, match=r"cluster.groups\[0\].engine: role must be one of"):
        cluster_from({"groups": [{"count": 1, "engine": {"role": "mixed"}}]})


def test_routing_a_new_request_to_a_decode_instance_is_an_error():
    class Wrong(RoutingPolicy):
        def route(self, request, view):
            return 1

    with pytest.raises(ValueError, match="whose role is decode"):
        Cluster(_pd(), Wrong()).run(make_requests([(0.0, 10, 2)]))


def test_colocated_instances_accept_handoffs_too():
    groups = (InstanceGroup(1, PREFILL), InstanceGroup(1, EngineConfig(role="both")))
    cluster = Cluster(ClusterConfig(groups), RoundRobin())
    records = cluster.run(make_requests([(0.0, 800, 10), (0.01, 800, 10), (0.02, 800, 10)])).records()
    assert (records["state"] == State.FINISHED.value).all()
    assert set(records["instance"]) == {1}


def test_prefill_instance_waits_for_transfers_to_free_its_kv():
    """Found by the invariant search: a small prefill KV filled by outgoing transfers must not stall."""
    engine = EngineConfig(gpu_memory_utilization=0.25, enable_prefix_caching=True)
    groups = (InstanceGroup(1, replace(engine, role="prefill")), InstanceGroup(1, replace(engine, role="decode")))
    workload = SyntheticWorkload(
        arrivals=RateSchedule(((1.0, 1.0),), cv=4.0),
        lengths=LengthSampler(
            "lognormal",
            prompt=2218,
            output=1,
            prompt_sigma=1.0,
            output_sigma=1.0,
            max_prompt=100_000,
            max_output=20_000,
        ),
        num_requests=16,
    )
    cluster = Cluster(ClusterConfig(groups), LeastOutstandingRequests())
    records = cluster.run(workload.generate(0)).records()
    assert set(records["state"]) <= {"finished", "rejected"}
    assert all(e.free_blocks == e.total_blocks and e.transferring == 0 for e in cluster.engines)
