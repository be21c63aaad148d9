"""The Gymnasium environments: checkers, control inversion equal to inline simulation, determinism,
masks and invalid actions, heuristics through the observation contract, and short training runs."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from gymnasium.utils.env_checker import check_env as gym_check_env
from servegym.agents.routing.predictive import Prism
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.config import cluster_from, workload_from
from servegym.envs.sim.policies import DecisionKind, LeastOutstandingRequests, RoundRobin
from servegym.envs.sim.roles import Role
from stable_baselines3.common.env_checker import check_env as sb3_check_env

SMALL_WORKLOAD = {
    "kind": "synthetic",
    "num_requests": 120,
    "arrivals": {"rate": 20.0, "cv": 2.0},
    "lengths": {"kind": "empirical", "source": "azure_conv"},
    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}],
}
HETERO = {
    "snapshot_interval_s": 0.1,
    "groups": [{"count": 2, "engine": {"gpu": "H100-SXM"}}, {"count": 1, "engine": {"gpu": "A100-80GB"}}],
}
PD = {
    "snapshot_interval_s": 0.1,
    "monitor_interval_s": 1.0,
    "groups": [{"count": 2, "engine": {"role": "prefill"}}, {"count": 2, "engine": {"role": "decode"}}],
}
VARIANTS = [
    ("servegym/Route-v0", {"cluster": HETERO}),
    ("servegym/Route-v0", {"cluster": PD, "reward": "latency"}),
    ("servegym/Route-v0", {"cluster": HETERO, "reward": "relative", "max_instances": 4}),
    ("servegym/Route-v0", {"cluster": HETERO, "reward": "relative", "warmup": 20, "drain": True}),
    ("servegym/Batch-v0", {"cluster": HETERO}),
    ("servegym/Batch-v0", {"cluster": HETERO, "continuous": True, "reward": "latency"}),
    ("servegym/Pools-v0", {"cluster": PD}),
]


@pytest.mark.parametrize(("env_id", "kwargs"), VARIANTS)
def test_gymnasium_and_sb3_checkers_pass(env_id, kwargs):
    env = gym.make(env_id, workload=SMALL_WORKLOAD, horizon=50, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkers' warnings count as failures here
        gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True, skip_render_check=True)


def _run_through_env(router_factory, cluster, seed=3):
    env = gym.make("servegym/Route-v0", cluster=cluster, workload=SMALL_WORKLOAD)
    env.reset(seed=0, options={"workload_seed": seed, "sim_seed": 7})
    heuristic = router_factory()
    while True:
        decision = env.unwrapped.decision
        if decision.kind is DecisionKind.ROUTE_DECODE:
            action = heuristic.route_decode(decision.request, decision.view)
        else:
            action = heuristic.route(decision.request, decision.view)
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return info["summary"]


def _run_inline(router_factory, cluster, seed=3):
    sim = Cluster(cluster_from(cluster), router_factory(), seed=7)
    return sim.run(workload_from(SMALL_WORKLOAD).generate(seed)).summary()


@pytest.mark.parametrize("router", [LeastOutstandingRequests, RoundRobin, Prism])
@pytest.mark.parametrize("cluster", [HETERO, PD])
def test_a_heuristic_through_step_equals_the_inline_simulation(router, cluster):
    through, inline = _run_through_env(router, cluster), _run_inline(router, cluster)
    for key in ("completed", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p99_s", "e2e_p99_s", "sim_s"):
        assert through[key] == inline[key], key


def _batch_env_at_vllms_budget(**kwargs):
    """A Batch-v0 episode giving vLLM's full budget at every decision; the environment and its last info."""
    env = gym.make("servegym/Batch-v0", cluster=HETERO, workload=SMALL_WORKLOAD, **kwargs)
    env.reset(seed=0, options={"workload_seed": 3, "sim_seed": 7})
    full = env.unwrapped.budgets.index(8192)
    while True:
        _, _, terminated, truncated, info = env.step(full)
        if terminated or truncated:
            return env, info


def test_batch_env_with_vllms_budget_equals_inline_vllm():
    _, info = _batch_env_at_vllms_budget()
    inline = _run_inline(LeastOutstandingRequests, HETERO)
    for key in ("completed", "slo_attainment", "ttft_p99_s", "tpot_p99_s", "e2e_p99_s", "sim_s"):
        # every step is a decision here, so no decode jumps: times agree to rounding, not to the last bit
        assert info["summary"][key] == pytest.approx(inline[key], rel=1e-9), key


def test_pools_env_keeping_the_pools_equals_inline_static_pools():
    from servegym.envs.sim.policies import StaticPools

    env = gym.make("servegym/Pools-v0", cluster=PD, workload=SMALL_WORKLOAD)
    env.reset(seed=0, options={"workload_seed": 3, "sim_seed": 7})
    while True:
        _, _, terminated, truncated, info = env.step(0)
        if terminated or truncated:
            break
    sim = Cluster(cluster_from(PD), LeastOutstandingRequests(), seed=7, pool_policy=StaticPools())
    inline = sim.run(workload_from(SMALL_WORKLOAD).generate(3)).summary()
    for key in ("completed", "slo_attainment", "ttft_p99_s", "tpot_p99_s", "e2e_p99_s"):
        assert info["summary"][key] == inline[key], key


def test_same_seed_same_trajectory():
    def trajectory():
        env = gym.make("servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD)
        obs, _ = env.reset(seed=11)
        out = [obs]
        rng = np.random.default_rng(0)
        for _ in range(60):
            obs, reward, terminated, truncated, _ = env.step(
                int(rng.choice(np.flatnonzero(env.unwrapped.action_masks())))
            )
            out.append(np.append(obs, reward))
            if terminated or truncated:
                break
        return np.concatenate(out)

    assert np.array_equal(trajectory(), trajectory())


def test_workload_seed_fixes_arrivals_across_agents():
    env = gym.make("servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD)
    env.reset(seed=1, options={"workload_seed": 5})
    first = [r.arrival_s for r in env.unwrapped._requests]
    env.reset(seed=2, options={"workload_seed": 5})
    assert [r.arrival_s for r in env.unwrapped._requests] == first


def test_load_range_compresses_each_episodes_arrivals_and_the_reference_sees_the_same():
    env = gym.make(
        "servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD, reward="relative", load_range=(1.5, 2.0)
    )
    env.reset(seed=1, options={"workload_seed": 5, "load_factor": 1.0})
    base = np.array([r.arrival_s for r in env.unwrapped._requests])
    _, info = env.reset(seed=1, options={"workload_seed": 5})
    factor = info["load_factor"]
    assert 1.5 <= factor <= 2.0
    np.testing.assert_allclose([r.arrival_s for r in env.unwrapped._requests], base / factor)
    assert env.unwrapped._generate(5)[-1].arrival_s == pytest.approx(base[-1] / factor)  # the reference run's
    with pytest.raises(ValueError, match="load_range"):
        gym.make("servegym/Route-v0", cluster=HETERO, load_range=(2.0, 1.0))


def test_counterfactual_windows_pay_exactly_the_agents_effect():
    """Warm-up by the reference heuristic, the agent's window, then a drain: an agent that decides as the
    reference does earns exactly 0, and every request the agent placed is finished and paid."""
    workload = dict(SMALL_WORKLOAD, num_requests=300, arrivals={"rate": 40.0, "cv": 2.0})
    kwargs = {
        "cluster": HETERO,
        "workload": workload,
        "reward": "relative",
        "horizon": 32,
        "warmup": 100,
        "drain": True,
    }
    env = gym.make("servegym/Route-v0", **kwargs)
    returns = {"copy": [], "random": []}
    for mode in returns:
        for episode in range(4):
            env.reset(seed=episode)
            copy, rng, total, done, steps = LeastOutstandingRequests(), np.random.default_rng(episode), 0.0, False, 0
            while not done:
                decision = env.unwrapped.decision
                valid = np.flatnonzero(env.unwrapped.action_masks())
                action = copy.route(decision.request, decision.view) if mode == "copy" else int(rng.choice(valid))
                _, reward, terminated, truncated, info = env.step(action)
                total, done, steps = total + reward, terminated or truncated, steps + 1
            assert steps == 32 and truncated and not env.unwrapped._placed  # all placed requests finished
            assert info["completed"] >= 100
            returns[mode].append(total)
    assert returns["copy"] == [0.0] * 4
    assert any(r != 0.0 for r in returns["random"])  # random placement changes outcomes


def test_warmup_and_drain_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="consumed the whole workload"):
        gym.make("servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD, warmup=10_000).reset(seed=0)
    with pytest.raises(ValueError, match="needs a horizon or horizon_s"):
        gym.make("servegym/Route-v0", cluster=HETERO, drain=True)
    with pytest.raises(ValueError, match="horizon_s must be a positive"):
        gym.make("servegym/Batch-v0", cluster=HETERO, horizon_s=0.0)


def test_batch_episodes_in_simulated_time_drain_every_request_in_the_system():
    """warmup_s under vLLM's budget, horizon_s of agent budgets, then the drain: every request that had
    arrived by the truncation has finished and been paid."""
    env = gym.make(
        "servegym/Batch-v0", cluster=HETERO, workload=SMALL_WORKLOAD, warmup_s=1.0, horizon_s=0.5, drain=True
    )
    env.reset(seed=0)
    start = env.unwrapped.sim.env.now
    assert start >= 1.0
    truncated = False
    while not truncated:
        _, _, terminated, truncated, info = env.step(0)
        assert not terminated
    cut = start + 0.5
    arrived = [r for r in env.unwrapped._requests if r.arrival_s <= cut]
    assert arrived and all(r.state.value in ("finished", "rejected") for r in arrived)
    assert info["sim_time"] >= cut


def test_warm_up_decisions_of_every_kind_are_the_inline_heuristics():
    """Batch-v0 with 30 warm-up steps under vLLM's budget, then the agent: every engine step is one decision,
    30 of them the inline policy's, and giving vLLM's budget throughout equals the inline run."""
    env, info = _batch_env_at_vllms_budget(warmup=30)
    assert sum(e.step_count for e in env.unwrapped.sim.engines) == info["decisions"] + 30
    inline = _run_inline(LeastOutstandingRequests, HETERO)
    assert info["summary"]["slo_attainment"] == pytest.approx(inline["slo_attainment"], rel=1e-9)


def test_invalid_actions_fall_back_penalised_and_counted():
    env = gym.make("servegym/Route-v0", cluster=PD, workload=SMALL_WORKLOAD, max_instances=6)
    env.reset(seed=0)
    mask = env.unwrapped.action_masks()
    assert list(mask[:4]) == [True, True, False, False] and not mask[4:].any()  # new requests: prefill pool
    _, reward, _, _, info = env.step(5)  # a padding slot
    assert info["invalid_actions"] == 1 and reward <= -1.0 + 10
    _, _, _, _, info = env.step(2)  # a decode instance for a new request
    assert info["invalid_actions"] == 2


def test_truncation_at_the_horizon_and_termination_when_drained():
    env = gym.make("servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD, horizon=10)
    env.reset(seed=0)
    flags = [env.step(0)[3] for _ in range(10)]
    assert flags[-1] and not any(flags[:-1])
    env = gym.make("servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD)
    env.reset(seed=0)
    steps, terminated = 0, False
    while not terminated:
        _, _, terminated, truncated, info = env.step(0)
        steps += 1
        assert not truncated
    assert steps == 120 and info["summary"]["completed"] + info["summary"]["rejected"] == 120


def test_heuristics_drive_batch_and_pools_environments():
    batch = gym.make("servegym/Batch-v0", cluster=HETERO, workload=SMALL_WORKLOAD)
    batch.reset(seed=0)
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, info = batch.step(len(batch.unwrapped.budgets) - 1)  # vLLM's budget
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            break
    assert info["summary"]["completed"] == 120 and steps > 120
    pools = gym.make("servegym/Pools-v0", cluster=PD, workload=SMALL_WORKLOAD)
    pools.reset(seed=0)
    _, _, _, _, info = pools.step(1)  # flip instance 0 to decode
    assert pools.unwrapped.sim.engines[0].role is Role.DECODE
    assert not pools.unwrapped.action_masks()[2]  # instance 1 is the last prefill instance: cannot flip


def test_named_features_let_a_heuristic_route_from_the_observation():
    env = gym.make("servegym/Route-v0", cluster=HETERO, workload=SMALL_WORKLOAD)
    obs, _ = env.reset(seed=0, options={"workload_seed": 3, "sim_seed": 7})
    spec = env.unwrapped.spec_features
    while True:
        named = spec.named(obs)
        score = np.where(named["present"] * named["accepts_new"] > 0, named["predicted_ttft_s"], np.inf)
        obs, _, terminated, truncated, info = env.step(int(np.argmin(score)))
        if terminated or truncated:
            break
    assert info["invalid_actions"] == 0 and info["summary"]["completed"] == 120
    assert spec.size == env.observation_space.shape[0]


@pytest.mark.slow
def test_ppo_and_maskable_ppo_train_briefly():
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    for algorithm, env_id in (
        (MaskablePPO, "servegym/Route-v0"),
        (PPO, "servegym/Batch-v0"),
        (PPO, "servegym/Pools-v0"),
    ):
        kwargs = {"workload": SMALL_WORKLOAD, "horizon": 500}
        kwargs["cluster"] = PD if env_id.endswith("Pools-v0") else HETERO
        env = gym.make(env_id, **kwargs)
        model = algorithm("MlpPolicy", env, n_steps=256, batch_size=64, n_epochs=1, seed=0, verbose=0)
        model.learn(total_timesteps=2048 if env_id.endswith("Route-v0") else 512)
        obs, _ = env.reset(seed=1)
        action, _ = model.predict(obs, deterministic=True)
        assert env.action_space.contains(action)


def test_module_qualified_ids_work_in_subprocess_vector_envs():
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = make_vec_env(
        "servegym:servegym/Route-v0",
        n_envs=2,
        vec_env_cls=SubprocVecEnv,
        env_kwargs={"cluster": HETERO, "workload": SMALL_WORKLOAD, "horizon": 20},
    )
    obs = vec.reset()
    obs, _rewards, _dones, _infos = vec.step(np.zeros(2, dtype=int))
    assert obs.shape == (2, vec.observation_space.shape[0])
    vec.close()
