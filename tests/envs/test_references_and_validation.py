"""The relative reward's reference runs every configured heuristic, and impossible environment
configurations are refused when the environment is made, in one line naming the problem."""

import subprocess
import sys

import gymnasium as gym
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from envkit import pd_cluster
from servegym.agents.pools import Arrow
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import DecisionKind, LeastOutstandingRequests
from servegym.envs.sim.traces import TraceError

PD_H100 = pd_cluster(monitor_interval_s=1.0, names=("prefill", "decode"))
BUSY = {
    "kind": "trace",
    "path": "azure_conv",
    "rate_scale": 14.0,
    "num_requests": 600,
    "random_window": True,
    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}],
}


def _episode(env, choose):
    env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        _, reward, terminated, truncated, _ = env.step(choose(env.unwrapped.decision))
        total, done = total + reward, terminated or truncated
    return total


def test_routing_copy_of_the_reference_earns_zero_with_a_pool_policy():
    """Regression: the reference run left the pool policy out, so copying least-outstanding routing under
    Arrow's pools earned +27 on this window although the agent changed nothing."""
    env = gym.make("servegym/Route-v0", cluster=PD_H100, workload=BUSY, reward="relative", pools=Arrow())
    lor = LeastOutstandingRequests()

    def copy_lor(decision):
        if decision.kind is DecisionKind.ROUTE_DECODE:
            return lor.route_decode(decision.request, decision.view)
        return lor.route(decision.request, decision.view)

    assert _episode(env, copy_lor) == 0.0
    assert env.unwrapped.sim.flips  # Arrow did flip an instance in this window: the pools mattered


def test_pools_env_rewards_relative_to_the_configured_pool_policy():
    """Regression: Pools-v0 ignored ``pools=`` and always compared with static pools."""
    kwargs = {"cluster": PD_H100, "workload": BUSY, "reward": "relative", "pools": Arrow()}
    env = gym.make("servegym/Pools-v0", **kwargs)
    mine = Arrow()
    copied = _episode(env, lambda decision: env.unwrapped.action_of(mine.rebalance(decision.view)))
    assert copied == 0.0 and env.unwrapped.sim.flips
    kept = _episode(gym.make("servegym/Pools-v0", **kwargs), lambda decision: 0)  # never flip
    assert kept != 0.0  # keeping static pools is measured against Arrow, not against itself


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"router": "vllm_prism"}, ValueError, "router must be an envs.sim.policies.RoutingPolicy object"),
        ({"batch": "lens"}, ValueError, "batch must be an envs.sim.policies.BatchPolicy object"),
        ({"horizon": 0}, ValueError, "horizon must be a positive number"),
        ({"horizon": -3}, ValueError, "horizon must be a positive number"),
        (
            {"cluster": {"groups": [{"name": "big", "count": 1, "engine": {"gpu": "H900"}}]}},
            ClusterConfigError,
            "group big: unknown GPU 'H900'",
        ),
        (
            {"cluster": {"groups": [{"name": "odd", "count": 1, "engine": {"tp": 3}}]}},
            ClusterConfigError,
            "group odd: tp=3 does not divide",
        ),
        (
            {"cluster": {"groups": [{"name": "huge", "count": 1, "engine": {"model": "Llama-3-70B", "gpu": "L4"}}]}},
            ClusterConfigError,
            "group huge: ",
        ),
        ({"workload": {"kind": "trace", "path": "/no/such/trace.csv"}}, TraceError, "/no/such/trace.csv"),
    ],
)
def test_impossible_configurations_are_refused_by_make(kwargs, error, message):
    with pytest.raises(error, match=message):
        gym.make("servegym/Route-v0", **kwargs)


def test_the_environment_benchmark_prints_its_figures():
    """Regression: ``python -m servegym.envs.bench`` printed nothing and exited 0 (no __main__ block)."""
    done = subprocess.run(
        [sys.executable, "-m", "servegym.envs.bench", "--steps", "40"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    for env_id in ("Route-v0", "Batch-v0", "Pools-v0"):
        assert f"servegym/{env_id}:" in done.stdout and "steps/s" in done.stdout
    assert "counterfactual windows" in done.stdout


def test_the_window_split_accounts_for_every_step_it_was_asked_for():
    """The split's three parts are each spent (a window of 64 decisions truncates within 130 steps, so there are
    drains and resets beyond the first) and the command prints them with the steps/s they add up to."""
    from servegym.envs import bench

    spent = bench.window_split(130, branches=2)
    assert set(spent) == {"steps", "drains", "resets"} and all(seconds > 0 for seconds in spent.values())
    done = subprocess.run(
        [sys.executable, "-m", "servegym.envs.bench", "--split", "--steps", "260", "--branches", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "130 agent steps" in done.stdout and "drains" in done.stdout and "steps/s" in done.stdout
