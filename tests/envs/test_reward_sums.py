"""An episode's rewards sum to the outcome the reward names, for every reward and kind (no per-step clip):
goodput = the requests that met their SLO, latency = −request-seconds in the system / 10, relative = the
agent's SLO-meeting requests minus the reference heuristics' on the same arrivals and seeds."""

import gymnasium as gym
import numpy as np
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from envkit import pd_cluster, synthetic
from servegym.agents.harness import Task, run_task

BUSY = synthetic(150, 80.0, {"kind": "lognormal", "prompt": 1500, "output": 200}, ttft_s=0.5, tpot_s=0.03)
COLOCATED = {"groups": [{"count": 1, "engine": {"gpu": "H100-SXM"}}, {"count": 1, "engine": {"gpu": "A100-80GB"}}]}
PD = pd_cluster()
KINDS = {"servegym/Route-v0": COLOCATED, "servegym/Batch-v0": COLOCATED, "servegym/Pools-v0": PD}
REFERENCE = {"router": {"_target_": "servegym.envs.sim.policies.LeastOutstandingRequests"}, "batch": None}


def _random_episode(env, seed: int) -> tuple[float, dict]:
    """Masked random actions to the end of the workload: the agent differs from the reference."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed, options={"workload_seed": seed, "sim_seed": seed})
    total, moved, terminated = 0.0, 0.0, False
    while not terminated:
        allowed = np.flatnonzero(env.unwrapped.action_masks())
        _, reward, terminated, truncated, info = env.step(int(rng.choice(allowed)))
        assert not truncated
        total, moved = total + reward, moved + abs(reward)
    assert info["invalid_actions"] == 0 and moved > 0  # the rewards said something
    return total, info


@pytest.mark.parametrize("env_id", list(KINDS))
@pytest.mark.parametrize("reward", ["goodput", "latency", "relative"])
def test_the_episode_return_is_the_outcome(env_id, reward):
    env = gym.make(env_id, cluster=KINDS[env_id], workload=BUSY, reward=reward, max_instances=4)
    total, info = _random_episode(env, seed=5)
    summary = info["summary"]
    met = round(summary["slo_attainment"] * summary["num_requests"])
    assert summary["rejected"] == 0 and summary["completed"] == BUSY["num_requests"]
    if reward == "goodput":
        assert total == met
    elif reward == "latency":
        seconds = sum(r.finished_s - r.arrival_s for r in env.unwrapped._requests)  # request-seconds in system
        assert total == pytest.approx(-seconds / 10.0, rel=1e-9)
    else:
        row = run_task(Task("reference", "w", 5, 1.0), REFERENCE, BUSY, KINDS[env_id])
        reference_met = round(row["slo_attainment"] * row["num_requests"])
        assert total == met - reference_met
