"""Impossible cluster and workload configurations are named clearly (envs.sim.config and the cluster)."""

import pytest
from servegym.envs.sim.config import cluster_from, workload_from
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.workload import WorkloadError


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"groups": []}, "the cluster has no instance"),
        ({"groups": [{"count": 0, "engine": {}}]}, "the cluster has no instance"),
        ({"groups": [{"count": 1, "engine": {"gpu": "H100-SXM", "modle": "x"}}]}, r"unknown key\(s\) \['modle'\]"),
        ({"groups": [{"count": -1}]}, "count must be a non-negative integer"),
    ],
)
def test_impossible_clusters_are_named(mapping, message):
    with pytest.raises(ClusterConfigError, match=message):
        cluster_from(mapping)


def test_unknown_gpu_is_named_with_its_group():
    from servegym.envs.sim.cluster import Cluster
    from servegym.envs.sim.policies import RoundRobin

    with pytest.raises(ClusterConfigError, match="group big: unknown GPU 'H900'"):
        Cluster(cluster_from({"groups": [{"name": "big", "count": 1, "engine": {"gpu": "H900"}}]}), RoundRobin())


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"kind": "trace", "path": "???"}, "workload.path is required"),
        ({"kind": "markov"}, "workload.kind must be"),
        ({"kind": "synthetic", "num_requests": 10, "arrivals": {"rate": 1, "pieces": [[1, 1]]}}, "rate or pieces"),
        ({"kind": "synthetic", "num_requests": 10, "lengths": {"kind": "fixed", "promt": 5}}, r"unknown key\(s\)"),
    ],
)
def test_impossible_workloads_are_named(mapping, message):
    with pytest.raises(WorkloadError, match=message):
        workload_from(mapping)
