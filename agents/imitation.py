"""Warm-start a learned router by imitating a heuristic, before reinforcement learning refines it.

PPO from a random policy on ``servegym/Route-v0`` learns slowly and collapses after its peak (see
docs/training.md): most of its early experience is spent re-discovering "send work to the emptier, faster
engine". Behaviour cloning an expert router (PRISM by default) on the same environment gives the actor that
knowledge in seconds, and regressing the critic on the expert's discounted returns gives PPO a value
baseline that does not wreck the cloned actor in its first updates. This is the standard
"imitation then RL" recipe (e.g. AlphaStar, DQfD); the closing comparison always includes the expert itself,
so a reader sees whether RL added anything over the imitation.

Demonstrations are recorded with the expert in control (plain behaviour cloning, not DAgger): the expert's
own bookkeeping (PRISM's decision-lag correction, session table) then stays consistent with what happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from servegym.agents.slot_policy import SlotFeatures
from servegym.envs.sim.policies import DecisionKind, RoutingPolicy

__all__ = ["Demonstrations", "collect_demonstrations", "pretrain"]


@dataclass
class Demonstrations:
    """Decisions of an expert: raw observations, action masks, the expert's actions, episode rewards."""

    observations: np.ndarray  # float32 [n, obs]
    masks: np.ndarray  # bool [n, actions]
    actions: np.ndarray  # int64 [n]
    rewards: np.ndarray  # float32 [n], the environment's reward for each decision
    episode_ends: np.ndarray  # bool [n], True on the last decision of an episode

    def __len__(self) -> int:
        return len(self.actions)


def _expert(spec: Mapping[str, Any]):
    from hydra.utils import instantiate

    return instantiate(dict(spec))


def collect_demonstrations(
    env_id: str, env_kwargs: Mapping[str, Any], expert: Mapping[str, Any], episodes: int, seed: int
) -> Demonstrations:
    """Run ``episodes`` episodes of ``env_id`` with the expert router (a ``_target_`` mapping) deciding.

    Each episode gets a fresh expert (its state belongs to one cluster) that also sees every completion,
    as it would when installed in the simulator.
    """
    if episodes <= 0:
        raise ValueError(f"imitation needs at least one episode, got {episodes}")
    env = gym.make(env_id, **dict(env_kwargs))
    base = env.unwrapped
    if DecisionKind.ROUTE not in base.decision_kinds:
        raise ValueError(f"{env_id}: imitation of a router needs a routing environment (Route-v0)")
    observations, masks, actions, rewards, ends = [], [], [], [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        router = _expert(expert)
        if not isinstance(router, RoutingPolicy):
            raise ValueError(f"the expert {expert.get('_target_')} is not a RoutingPolicy")
        base.subscribe(router)  # the expert sees every arrival and completion, as when installed
        done = False
        while not done:
            decision = base.decision
            if decision.kind is DecisionKind.ROUTE_DECODE:
                action = router.route_decode(decision.request, decision.view)
            else:
                action = router.route(decision.request, decision.view)
            observations.append(observation)
            masks.append(base.action_masks())
            actions.append(action)
            observation, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
            done = terminated or truncated
            ends.append(done)
    env.close()
    return Demonstrations(
        np.asarray(observations, np.float32),
        np.asarray(masks, bool),
        np.asarray(actions, np.int64),
        np.asarray(rewards, np.float32),
        np.asarray(ends, bool),
    )


def _discounted(rewards: np.ndarray, ends: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Forward running returns (what VecNormalize's reward scaler sees) and backward returns-to-go."""
    running, forward = 0.0, np.empty_like(rewards)
    for t, r in enumerate(rewards):
        running = running * gamma + r
        forward[t] = running
        if ends[t]:
            running = 0.0
    to_go, backward = 0.0, np.empty_like(rewards)
    for t in range(len(rewards) - 1, -1, -1):
        if ends[t]:
            to_go = 0.0
        to_go = rewards[t] + gamma * to_go
        backward[t] = to_go
    return forward, backward


def pretrain(
    model: Any,
    normalizer: Any,
    demos: Demonstrations,
    epochs: int = 10,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    value_coef: float = 0.5,
    holdout: float = 0.1,
    seed: int = 0,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Fit the actor to the expert's actions (cross-entropy over masked logits) and the critic to its returns.

    ``normalizer`` (SB3's ``VecNormalize``) first absorbs the demonstrations' observation and return
    statistics, so PPO continues with the scale the networks were fitted on. ``temperature`` < 1 then
    sharpens the cloned actor (its logits divided by it: same arg-max, less random sampling), so RL's
    stochastic rollouts stay near the clone instead of near chance. Returns the final losses and the
    agreement with the expert on the last ``holdout`` fraction of decisions (never trained on).
    """
    if not hasattr(model.policy, "evaluate_actions") or not hasattr(model.policy, "value_net"):
        raise ValueError(
            f"imitation needs an actor-critic policy; {type(model).__name__} has none "
            "(train it from scratch: imitation.expert=null)"
        )
    masked = "action_masks" in model.policy.evaluate_actions.__code__.co_varnames
    normalizer.obs_rms.update(demos.observations)
    forward, _ = _discounted(demos.rewards, demos.episode_ends, float(normalizer.gamma))
    normalizer.ret_rms.update(forward)
    scale = float(np.sqrt(normalizer.ret_rms.var + normalizer.epsilon))
    rewards = np.clip(demos.rewards / scale, -normalizer.clip_reward, normalizer.clip_reward)
    _, targets = _discounted(rewards.astype(np.float32), demos.episode_ends, float(model.gamma))

    observations = torch.as_tensor(normalizer.normalize_obs(demos.observations), dtype=torch.float32)
    actions = torch.as_tensor(demos.actions)
    masks = torch.as_tensor(demos.masks)
    targets_t = torch.as_tensor(targets, dtype=torch.float32)
    n_train = max(1, round(len(demos) * (1.0 - holdout)))
    policy = model.policy
    policy.set_training_mode(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)

    def evaluate(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"action_masks": masks[index].numpy()} if masked else {}
        values, log_prob, _ = policy.evaluate_actions(observations[index], actions[index], **kwargs)
        return values.flatten(), log_prob

    policy_loss = value_loss = float("nan")
    for _ in range(int(epochs)):
        order = rng.permutation(n_train)
        for start in range(0, n_train, batch_size):
            index = order[start : start + batch_size]
            values, log_prob = evaluate(index)
            p_loss = -log_prob.mean()
            v_loss = torch.nn.functional.mse_loss(values, targets_t[index])
            optimizer.zero_grad()
            (p_loss + value_coef * v_loss).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimizer.step()
            policy_loss, value_loss = p_loss.item(), v_loss.item()
    policy.set_training_mode(False)
    if temperature != 1.0:
        _sharpen(policy, temperature)
    return {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "train_agreement": _agreement(policy, observations[:n_train], demos, slice(0, n_train), masked),
        "holdout_agreement": _agreement(policy, observations[n_train:], demos, slice(n_train, None), masked),
        "decisions": float(len(demos)),
    }


def _sharpen(policy: Any, temperature: float) -> None:
    """Divide the actor's logits by ``temperature`` by scaling the last linear layer that produces them."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    last = None
    for module in policy.action_net.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    if last is None and isinstance(policy.features_extractor, SlotFeatures):  # logits from the slot scorer
        last = [m for m in policy.features_extractor.scorer.modules() if isinstance(m, torch.nn.Linear)][-1]
    if last is None:
        raise ValueError(f"cannot find the layer producing the logits of {type(policy).__name__}")
    with torch.no_grad():
        last.weight /= temperature
        last.bias /= temperature


def _agreement(policy: Any, observations: torch.Tensor, demos: Demonstrations, part: slice, masked: bool) -> float:
    """Share of decisions where the policy's deterministic action is the expert's."""
    if len(observations) == 0:
        return float("nan")
    with torch.no_grad():
        kwargs = {"action_masks": demos.masks[part]} if masked else {}
        distribution = policy.get_distribution(observations, **kwargs)
        chosen = distribution.get_actions(deterministic=True).numpy()
    return float(np.mean(chosen == demos.actions[part]))
