"""Branching simulations (envs/branch.py) and rollout values (ServeGymEnv.rollout_values): a branch is the
same simulation as re-running from reset with the same actions, deterministic, and leaves the caller's
environment as it was."""

import os

import numpy as np
import pytest
from envkit import synthetic
from servegym.agents.routing.predictive import Prism
from servegym.envs.branch import BranchError, BranchingUnavailable, fork_map
from servegym.envs.route_env import RouteEnv
from servegym.envs.sim.request import State

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="branching needs os.fork")

CLUSTER = {"groups": [{"count": 1, "engine": {"gpu": "H100-SXM"}}, {"count": 2, "engine": {"gpu": "A100-80GB"}}]}
BUSY = synthetic(160, 50.0, {"kind": "lognormal", "prompt": 1500, "output": 150}, ttft_s=0.3, tpot_s=0.05)


def _env(drain: bool = True) -> RouteEnv:
    return RouteEnv(
        cluster=CLUSTER,
        workload=BUSY,
        max_instances=4,
        router=Prism(slo_tpot_s=0.05),
        warmup=20,
        horizon=12,
        drain=drain,
    )


def _walk(env: RouteEnv, steps: int, seed: int = 1) -> None:
    env.reset(seed=seed, options={"workload_seed": seed, "sim_seed": seed})
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        env.step(int(rng.choice(np.flatnonzero(env.action_masks()))))


def _resimulated(steps: int, action: int) -> float:
    """The rollout value of ``action`` after ``steps`` steps, by replaying from reset: the same random
    actions, then ``action``, then the router's choices to truncation, then everything to the end."""
    env = _env(drain=False)
    _walk(env, steps)
    start = env.sim.env.now
    counted = [r for r in env._requests if r.arrival_s <= start and r.state not in (State.FINISHED, State.REJECTED)]
    _, _, _, truncated, _ = env.step(action)
    while not truncated:
        decision = env.decision
        _, _, _, truncated, _ = env.step(env._inline_router.route(decision.request, decision.view))
    end = env.sim.env.now  # the truncating question is pending here
    counted += [r for r in env._requests if start < r.arrival_s < end]
    env._drain()
    env.sim.env.run()
    assert all(r.state in (State.FINISHED, State.REJECTED) for r in counted)
    return float(sum(r.slo_met for r in counted))


def test_a_branch_is_the_resimulated_run():
    env = _env()
    _walk(env, 3)
    values = env.rollout_values(jobs=2)
    assert sorted(values) == [0, 1, 2] and values.base_action in values
    assert values.base_value == values[values.base_action]
    assert env.rollout_value_of_base() == (values.base_action, values.base_value)
    assert len(set(values.values())) > 1  # the choice matters here, so equality below says something
    for action in (0, 2):
        assert values[action] == _resimulated(3, action)


def test_rollout_values_are_deterministic_and_leave_the_env_alone():
    env, twin = _env(), _env()
    _walk(env, 2)
    _walk(twin, 2)
    first = env.rollout_values(actions=[1, 0], decisions=4, jobs=2)
    assert list(first) == [1, 0]
    assert env.rollout_values(actions=[1, 0], decisions=4, jobs=2) == first
    sampled = env.rollout_values(actions=[1, 0], jobs=2, reseed=7, resample_lengths=True)
    assert env.rollout_values(actions=[1, 0], jobs=2, reseed=7, resample_lengths=True) == sampled
    rng, truncated = np.random.default_rng(9), False
    while not truncated:
        action = int(rng.choice(np.flatnonzero(env.action_masks())))
        mine, theirs = env.step(action), twin.step(action)
        np.testing.assert_array_equal(mine[0], theirs[0])
        assert mine[1:4] == theirs[1:4] and mine[4]["sim_time"] == theirs[4]["sim_time"]
        truncated = mine[3]
    with pytest.raises(RuntimeError, match="no pending decision"):
        env.rollout_values()


def test_fork_map_keeps_order_and_names_a_failing_branch():
    assert fork_map(lambda x: x * x, range(7), jobs=2) == [0, 1, 4, 9, 16, 25, 36]

    def fails(x):
        if x == 2:
            raise KeyError("no engine")
        return x

    with pytest.raises(BranchError, match=r"branch 2 \(item 2\) failed: KeyError: 'no engine'"):
        fork_map(fails, range(4), jobs=2)
    with pytest.raises(BranchError, match="exited with status 3"):
        fork_map(lambda x: os._exit(3), [0])


def test_no_fork_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(os, "fork")
    with pytest.raises(BranchingUnavailable, match=r"needs os\.fork"):
        fork_map(abs, [1])
