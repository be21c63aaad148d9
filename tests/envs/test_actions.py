"""What an environment does with a value that is not an action of its space (NaN, None, 2.7, out of range:
never a crash, never a truncation — the documented fallback, counted in ``info["invalid_actions"]`` with a
reason naming the environment, the space and the value, and one warning) and with an action of the space
that the mask forbids (the fallback, counted and explained the same way)."""

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from envkit import pd_cluster, synthetic

SMALL = synthetic(40, 20.0, {"kind": "fixed", "prompt": 300, "output": 20}, ttft_s=2.0, tpot_s=0.1)
PD = pd_cluster()
KINDS = {
    "Route-v0": ("servegym/Route-v0", {}, r"Discrete\(8\)"),
    "Batch-v0": ("servegym/Batch-v0", {}, r"Discrete\(7\)"),
    "Batch-v0 continuous": ("servegym/Batch-v0", {"continuous": True}, r"Box\(-1\.0, 1\.0"),
    "Pools-v0": ("servegym/Pools-v0", {"cluster": PD}, r"Discrete\(17\)"),
}
NOT_ACTIONS = [float("nan"), float("inf"), None, "1", 2.7, 1.5, 99, -2, True, np.array([1, 0]), np.array([np.nan])]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("action", NOT_ACTIONS, ids=repr)
def test_a_value_that_is_no_action_of_the_space_takes_the_fallback_counted_with_its_reason(kind, action):
    env_id, kwargs, space = KINDS[kind]
    env = gym.make(env_id, workload=SMALL, **kwargs)
    env.reset(seed=0)
    decisions_before = env.unwrapped._decisions
    with pytest.warns(UserWarning, match="fallback"):
        *_, info = env.step(action)
    reason = info["invalid_reason"]
    assert info["invalid_actions"] == 1 and re.search(rf"^{env_id.split('/')[1]}: .*{space}", reason), reason
    assert repr(action)[:8] in reason or str(action)[:8] in reason  # the value is named
    assert "convert" not in reason and "fallback" in reason  # not int()'s message; what was done instead
    assert env.unwrapped._decisions == decisions_before + 1  # the decision was answered (by the fallback)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per environment, then only the count
        *_, info = env.step(action)
    assert info["invalid_actions"] == 2


@pytest.mark.parametrize("kind", list(KINDS))
def test_integer_valued_numbers_are_actions(kind):
    env_id, kwargs, _ = KINDS[kind]
    env = gym.make(env_id, workload=SMALL, **kwargs)
    env.reset(seed=0)
    for action in (np.int64(0), 0.0, np.array([0.0])):
        *_, info = env.step(action)
        assert info["invalid_actions"] == 0


def test_a_masked_action_takes_the_fallback_and_says_why():
    env = gym.make("servegym/Pools-v0", cluster=PD, workload=SMALL)
    env.reset(seed=0)
    assert not env.unwrapped.action_masks()[1 + 2]  # instance 2 is a decode instance already
    *_, info = env.step(1 + 2)
    reason = info["invalid_reason"]
    assert info["invalid_actions"] == 1 and "masked" in reason and "fallback []" in reason
    *_, info = env.step(0)
    assert info["invalid_actions"] == 1 and info["invalid_reason"] is None
