"""Behaviour cloning of a heuristic router: the cloned policy agrees with its expert and routes better
than chance on a loaded heterogeneous cluster."""

import numpy as np
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from sb3_contrib import MaskablePPO
from servegym.agents.imitation import collect_demonstrations, pretrain
from servegym.agents.learned import FeatureRouter
from servegym.agents.routing.classic import RandomRouter
from servegym.agents.slot_policy import SlotPolicy
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.config import cluster_from, workload_from
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

CLUSTER = {
    "snapshot_interval_s": 0.1,
    "groups": [{"count": 2, "engine": {"gpu": "H100-SXM"}}, {"count": 2, "engine": {"gpu": "A40"}}],
}
WORKLOAD = {
    "kind": "synthetic",
    "num_requests": 300,
    "arrivals": {"rate": 30.0, "cv": 2.0},
    "lengths": {"kind": "empirical", "source": "azure_conv"},
    "slo": [{"name": "chat", "ttft_s": 1.0, "tpot_s": 0.1}],
}
ENV = {"cluster": CLUSTER, "workload": WORKLOAD, "max_instances": 4, "horizon": 300, "render_mode": None}
JSQ = {"_target_": "servegym.agents.routing.classic.JoinShortestQueue"}


class _Cloned(FeatureRouter):
    """The cloned network as a router (what LearnedRouter does for a saved run)."""

    def __init__(self, model, normalizer) -> None:
        from servegym.envs.features import FeatureSpec

        super().__init__(FeatureSpec(4).manifest(), "test")
        self.model, self.normalizer = model, normalizer

    def act(self, observation, mask):
        action, _ = self.model.predict(
            self.normalizer.normalize_obs(observation), action_masks=mask, deterministic=True
        )
        return int(action)


@pytest.fixture(scope="module")
def cloned():
    demos = collect_demonstrations("servegym:servegym/Route-v0", ENV, JSQ, episodes=6, seed=0)
    vec = VecNormalize(
        make_vec_env("servegym:servegym/Route-v0", n_envs=1, seed=0, vec_env_cls=DummyVecEnv, env_kwargs=ENV)
    )
    model = MaskablePPO(SlotPolicy, vec, seed=0, device="cpu", n_steps=64, batch_size=64)
    figures = pretrain(model, vec, demos, epochs=15, batch_size=128, seed=0)
    return demos, model, vec, figures


def test_demonstrations_record_every_decision_with_valid_expert_actions(cloned):
    demos, *_ = cloned
    assert len(demos) == 6 * 300 and demos.episode_ends.sum() == 6
    assert demos.masks[np.arange(len(demos)), demos.actions].all()


def test_the_clone_agrees_with_its_expert_on_decisions_it_never_trained_on(cloned):
    demos, *_, figures = cloned
    chance = float(np.mean(1.0 / demos.masks.sum(axis=1)))  # a uniform guess among the allowed engines
    assert figures["holdout_agreement"] > 1.6 * chance  # JSQ's many ties cap exact agreement well below 1
    assert np.isfinite(figures["value_loss"])


def test_the_clone_routes_better_than_random(cloned):
    _, model, vec, _ = cloned

    def attainment(make_router) -> float:
        values = []
        for seed in (50, 51):
            requests = workload_from(WORKLOAD).generate(seed)
            values.append(
                Cluster(cluster_from(CLUSTER), make_router(), seed=seed).run(requests).summary()["slo_attainment"]
            )
        return float(np.mean(values))

    chance = attainment(lambda: RandomRouter(seed=0))
    clone = attainment(lambda: _Cloned(model, vec))
    assert clone > chance + 0.05, (clone, chance)


def test_a_policy_without_an_actor_is_refused_with_the_way_out(cloned):
    from stable_baselines3 import DQN

    demos, _, vec, _ = cloned
    model = DQN("MlpPolicy", vec, device="cpu", seed=0)
    with pytest.raises(ValueError, match=r"imitation\.expert=null"):
        pretrain(model, vec, demos)
