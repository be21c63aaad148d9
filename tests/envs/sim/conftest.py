import pytest
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.policies import LeastOutstandingRequests


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
