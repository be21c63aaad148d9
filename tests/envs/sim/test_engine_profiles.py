"""A cluster group's performance-model profile reaches its engines and every prediction about them."""

import gymnasium as gym
import pytest
import servegym.envs as envs  # noqa: F401
from servegym.envs.features import EngineModels
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.config import cluster_from
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import LeastOutstandingRequests
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.profile import Profile, load_profile
from servegym.perfmodel.structural import structural_model
from simkit import make_requests


@pytest.fixture(scope="module")
def slow_profile(tmp_path_factory):
    base = load_profile("default")
    h100 = base.coefficients("H100-SXM")
    slow = h100.with_values({"gemm_flops_eff": h100.gemm_flops_eff / 2, "gemm_mem_eff": h100.gemm_mem_eff / 2})
    path = tmp_path_factory.mktemp("profiles") / "slow_h100.json"
    Profile(name="slow_h100", gpus={**base.gpus, "H100-SXM": slow}).save(path)
    return str(path)


def _cluster(profile=None):
    engine = {"gpu": "H100-SXM", "model": "Llama-3-8B"}
    if profile:
        engine["profile"] = profile
    return cluster_from({"groups": [{"name": "h100", "count": 2, "engine": engine}]})


def test_engines_step_with_their_groups_profile(slow_profile):
    def e2e(profile):
        cluster = Cluster(_cluster(profile), LeastOutstandingRequests())
        records = cluster.run(make_requests([(0.1 * i, 2000, 50) for i in range(20)])).records()
        return float(records["e2e_s"].mean()), cluster

    fast, _ = e2e(None)
    slow, cluster = e2e(slow_profile)
    assert slow > 1.3 * fast
    assert cluster.config.profiles == [slow_profile]
    assert all(info.profile == slow_profile for info in cluster.infos)


def test_predictions_about_an_engine_use_its_profile(slow_profile):
    cluster = Cluster(_cluster(slow_profile), LeastOutstandingRequests())
    models = EngineModels()
    batch = StepBatch.prefill(2048)
    assert models(cluster.infos[0]).predict(batch) == cluster.engines[0].perf.predict(batch)
    default_info = Cluster(_cluster(), LeastOutstandingRequests()).infos[0]
    assert models.prefill_capacity(cluster.infos[0]) < 0.8 * EngineModels().prefill_capacity(default_info)


def test_an_unknown_profile_is_named_with_its_group():
    with pytest.raises(ClusterConfigError, match="group h100: unknown profile 'calibrated-h900'"):
        Cluster(_cluster("calibrated-h900"), LeastOutstandingRequests())
    with pytest.raises(ClusterConfigError, match="group h100: unknown profile"):
        gym.make("servegym/Route-v0", cluster={"groups": [{"name": "h100", "count": 1, "engine": {"profile": "x"}}]})


def test_environments_run_on_a_given_profile(slow_profile):
    cluster = {"groups": [{"name": "h100", "count": 2, "engine": {"gpu": "H100-SXM", "profile": slow_profile}}]}
    env = gym.make("servegym/Route-v0", cluster=cluster)
    env.reset(seed=0)
    slow = structural_model("H100-SXM", "Llama-3-8B", profile=slow_profile)
    assert all(engine.perf is slow for engine in env.unwrapped.sim.engines)
    assert env.unwrapped.sim.infos[0].profile == slow_profile
