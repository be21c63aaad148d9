import pytest

from envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from envs.sim.engine import EngineConfig
from envs.sim.request import Request, SloClass
from envs.sim.routing import LeastOutstandingRequests


def make_requests(specs):
    """[(arrival_s, prompt, output), ...] -> fresh Requests."""
    return [
        Request(i, float(a), int(p), int(d), SloClass("t", ttft_s=1.0, tpot_s=0.05))
        for i, (a, p, d) in enumerate(specs)
    ]


@pytest.fixture
def run_cluster():
    def run(requests, groups=None, router=None, policy=None, seed=0, snapshot_interval_s=0.0):
        groups = groups or (InstanceGroup(1, EngineConfig()),)
        cluster = Cluster(
            ClusterConfig(tuple(groups), snapshot_interval_s=snapshot_interval_s),
            router or LeastOutstandingRequests(),
            batch_policy=policy,
            seed=seed,
        )
        return cluster, cluster.run(requests)

    return run
