"""Rollout distillation's fit (agents/rollout_distill.py): either loss moves the residual router's greedy
choices off the sharp PRISM base to the labelled best actions; labels without a spread leave the policy where
it was; labels survive a file."""

import numpy as np
import pytest
from sb3_contrib import MaskablePPO
from servegym.agents.residual_policy import ResidualSlotPolicy
from servegym.agents.rollout_distill import Labels, fit, gain
from servegym.envs.route_env import RouteEnv

KWARGS = {"policy_kwargs": {"features_extractor_kwargs": {"slo_tpot_s": 0.1, "temperature": 0.05}}}


@pytest.fixture(scope="module")
def states():
    """Observations and masks of 120 decisions of a loaded cluster, and the policy's greedy choices."""
    env = RouteEnv(reward="relative", horizon=120, load_range=(1.4, 1.6))
    model = MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **KWARGS)
    observations, masks = [], []
    obs, info = env.reset(seed=5)
    done = False
    while not done:
        observations.append(obs)
        masks.append(info["action_mask"])
        action, _ = model.predict(obs, deterministic=True, action_masks=info["action_mask"])
        obs, _, terminated, truncated, info = env.step(int(action))
        done = terminated or truncated
    return env, np.stack(observations), np.stack(masks)


def _model(env):
    return MaskablePPO(ResidualSlotPolicy, env, seed=0, device="cpu", **KWARGS)


def _labels(env, observations, masks, best: np.ndarray, lead: float) -> Labels:
    advantages = np.zeros(masks.shape)
    advantages[np.arange(len(best)), best] = lead
    advantages = np.where(masks, advantages - (advantages.sum(1, keepdims=True) / masks.sum(1, keepdims=True)), 0.0)
    return Labels(observations.astype(np.float32), masks, advantages, np.zeros(len(best), int))


def _greedy(model, observations, masks) -> np.ndarray:
    pairs = zip(observations, masks, strict=True)
    return np.array([int(model.predict(o, deterministic=True, action_masks=m)[0]) for o, m in pairs])


@pytest.mark.parametrize("loss", ["expected", "soft_target"])
def test_the_fit_moves_greedy_choices_to_the_labelled_best(states, loss):
    env, observations, masks = states
    # the best engine is the one with the longest predicted TTFT: a function of the engine's own features
    # (the residual can express it), and the opposite of what PRISM's load term prefers
    ttft = np.stack([env.spec_features.named(o)["predicted_ttft_s"] for o in observations])
    best = np.where(masks, ttft, -np.inf).argmax(1)
    model = _model(env)
    prism = _greedy(model, observations, masks)
    assert (prism != best).mean() > 0.5, "PRISM already picks the labelled action: the test would not see a fit"
    labels = _labels(env, observations, masks, best, lead=3.0)
    figures = fit(model.policy, labels, epochs=150, learning_rate=0.01, kl_coef=0.01, loss=loss)
    assert figures["gain_after"] > figures["gain_before"] + 1.5
    assert (_greedy(model, observations, masks) == best).mean() > 0.6


def test_labels_without_a_spread_leave_the_policy_alone(states, tmp_path):
    env, observations, masks = states
    model = _model(env)
    before = _greedy(model, observations, masks)
    labels = _labels(env, observations, masks, before, lead=0.0)
    labels.save(tmp_path / "labels.npz")
    loaded = Labels.load(tmp_path / "labels.npz")
    assert all(np.array_equal(a, b) for a, b in zip(vars(labels).values(), vars(loaded).values(), strict=True))
    fit(model.policy, loaded, epochs=20, learning_rate=0.01)
    assert np.array_equal(_greedy(model, observations, masks), before)
    assert gain(model.policy, loaded) == 0.0


def test_a_bad_labels_file_is_named(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"x\.npz is not a labels file"):
        Labels.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", observations=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"y\.npz is not a labels file"):
        Labels.load(tmp_path / "y.npz")
    with pytest.raises(ValueError, match="loss must be"):
        fit(None, Labels.empty(3, 2), loss="mse")
