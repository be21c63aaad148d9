"""render_mode="ansi" (a per-engine table of the state at the decision) and "rgb_array" (a small plot) for
every environment, and info["action_mask"] beside action_masks()."""

import gymnasium as gym
import numpy as np
import pytest
import servegym.envs as envs  # noqa: F401  (registers the ids)
from envkit import pd_cluster, synthetic
from gymnasium.utils.env_checker import check_env

SMALL = synthetic(200, 30.0, {"kind": "fixed", "prompt": 400, "output": 30}, ttft_s=2.0, tpot_s=0.1)
KINDS = {
    "servegym/Route-v0": {},
    "servegym/Batch-v0": {},
    "servegym/Pools-v0": {"cluster": pd_cluster()},
}


@pytest.mark.parametrize("env_id", list(KINDS))
def test_ansi_shows_every_engine_and_the_pending_decision(env_id):
    env = gym.make(env_id, workload=SMALL, render_mode="ansi", **KINDS[env_id])
    _, info = env.reset(seed=0)
    for _ in range(5):
        assert np.array_equal(info["action_mask"], env.unwrapped.action_masks())
        *_, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
    text = env.render()
    lines = text.splitlines()
    assert lines[0].startswith("t=") and "decision 6" in lines[0]
    assert len(lines) == 2 + len(env.unwrapped.sim.engines)  # headline, header, one row per engine
    assert "H100-SXM" in text and "pending" in lines[1]


def test_rgb_array_is_an_image_of_the_state():
    env = gym.make("servegym/Route-v0", workload=SMALL, render_mode="rgb_array")
    env.reset(seed=0)
    for _ in range(20):
        env.step(0)  # everything to engine 0: its bars stand out
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and frame.shape[0] >= 100
    assert frame.std() > 0  # something is drawn


def test_the_environment_checker_passes_with_rendering():
    check_env(gym.make("servegym/Route-v0", workload=SMALL, render_mode="ansi").unwrapped)


@pytest.mark.filterwarnings("ignore:.*render_mode='sparkles'")  # gymnasium's own warning before ours
def test_an_unknown_render_mode_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"render_mode must be one of \['ansi', 'rgb_array'\]"):
        gym.make("servegym/Route-v0", workload=SMALL, render_mode="sparkles")
