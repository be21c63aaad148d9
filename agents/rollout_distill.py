"""Rollout distillation: label visited states with every engine's branched outcome, fit the residual to it.

A counterfactual window's return is one noisy number for 64 decisions, of which 3–5 matter (docs/training.md);
PPO spends most of its budget averaging that noise. Here every labelled state gets one number *per action*:
:meth:`servegym.envs.base.ServeGymEnv.rollout_values` forks the simulation at the decision, answers it with each
allowed engine, lets the base heuristic (the environment's inline router, PRISM) decide everything after, and
counts the requests that meet their SLO — all branches on the same future (arrivals and step noise), so the
differences are the action's effect alone. That is a rollout expert (AggreVaTe: roll in with the current policy,
label with the expert, aggregate, refit), and the advantage ``A(s, a) = V(s, a) − mean_a V(s, a)`` is the
target of a cost-sensitive fit: maximise ``E_s[Σ_a π(a|s) A(s, a)]`` (the policy's expected gain over the
states' average action) with a KL penalty that holds the policy at its base where the labels say nothing.

The labels know the window's true future; the policy sees only the observation contract, so what it learns
is the part of the advantage the observation predicts (the deployable part of the oracle headroom).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Labels:
    """Labelled states: observations, action masks, per-action advantages (0 where masked) and the
    greedy action of the policy that rolled in (the one the environment took)."""

    observations: np.ndarray
    masks: np.ndarray
    advantages: np.ndarray
    taken: np.ndarray

    @classmethod
    def empty(cls, size: int, slots: int) -> Labels:
        return cls(np.zeros((0, size), np.float32), np.zeros((0, slots), bool), np.zeros((0, slots)), np.zeros(0, int))

    def __len__(self) -> int:
        return len(self.taken)

    def __add__(self, other: Labels) -> Labels:
        return Labels(*(np.concatenate([a, b]) for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))

    def save(self, path) -> None:
        """An ``.npz`` of the four arrays (a labelled set outlives its run: later runs aggregate it)."""
        np.savez_compressed(path, **vars(self))

    @classmethod
    def load(cls, path) -> Labels:
        try:
            with np.load(path) as data:
                labels = cls(*(data[name] for name in ("observations", "masks", "advantages", "taken")))
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{path} is not a labels file written by Labels.save: {error}") from None
        if not (len(labels.observations) == len(labels.masks) == len(labels.advantages) == len(labels.taken)):
            raise ValueError(f"{path}: its arrays have different numbers of states")
        return labels

    def spread(self) -> np.ndarray:
        """Per state, the best allowed action's advantage minus the worst's (requests)."""
        best = np.where(self.masks, self.advantages, -np.inf).max(1)
        worst = np.where(self.masks, self.advantages, np.inf).min(1)
        return best - worst

    def informative(self) -> np.ndarray:
        """States where some allowed action differs from another by at least one SLO-met request."""
        return self.spread() >= 1.0


def roll_in(
    env, act: Callable[[np.ndarray, np.ndarray], int], episodes: int, seed: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """Every decision of ``episodes`` episodes of ``env`` routed by ``act`` (observation, mask → action), as
    ``(step in its episode, observation, mask, action)``, yielded *before* the environment takes the action
    (so the caller may branch the state first). Episode ``k`` is reset with seed ``seed + k``."""
    for k in range(episodes):
        obs, info = env.reset(seed=seed + k)
        done, step = False, 0
        while not done:
            mask = info["action_mask"]
            action = int(act(obs, mask))
            yield step, obs, mask, action
            obs, _, terminated, truncated, info = env.step(action)
            done, step = terminated or truncated, step + 1


def collect(
    env,
    act: Callable[[np.ndarray, np.ndarray], int],
    episodes: int,
    seed: int,
    label_every: int = 4,
    decisions: int | None = 32,
    jobs: int | None = None,
) -> Labels:
    """Roll in with ``act`` (observation, mask → action) for ``episodes`` episodes of ``env`` and label every
    ``label_every``-th decision with :meth:`rollout_values` (``decisions`` base-heuristic decisions after the
    branch, then the drain). Episode ``k`` is reset with seed ``seed + k``: the same call gives the same labels."""
    size, slots = env.observation_space.shape[0], env.action_space.n
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
    for step, obs, mask, action in roll_in(env, act, episodes, seed):
        if step % label_every == 0:
            values = env.rollout_values(decisions=decisions, jobs=jobs)
            allowed = np.array(sorted(values))
            worth = np.array([values[a] for a in allowed])
            advantage = np.zeros(slots)
            advantage[allowed] = worth - worth.mean()
            rows.append((obs.copy(), mask.copy(), advantage, action))
    if not rows:
        return Labels.empty(size, slots)
    observations, masks, advantages, taken = zip(*rows, strict=True)
    return Labels(np.stack(observations), np.stack(masks), np.stack(advantages), np.asarray(taken))


def _log_probs(policy, observations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The masked policy's log-probabilities over actions (SB3's own masked distribution)."""
    return policy.get_distribution(observations, action_masks=masks).distribution.logits


def gain(policy, labels: Labels) -> float:
    """Mean advantage of the policy's greedy action over the labelled states (requests per state): how much
    better than the states' average action its choices are, on the labels' true futures."""
    if not len(labels):
        return 0.0
    with torch.no_grad():
        distribution = policy.get_distribution(torch.as_tensor(labels.observations), action_masks=labels.masks)
        greedy = distribution.get_actions(deterministic=True).numpy()
    return float(labels.advantages[np.arange(len(labels)), greedy].mean())


def fit(
    policy,
    labels: Labels,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    kl_coef: float = 0.05,
    seed: int = 0,
    loss: str = "expected",
    target_temperature: float = 1.0,
) -> dict[str, float]:
    """Fit the actor (the residual and the sharpness) to the labels, a KL penalty to the policy as it was
    before the fit holding it where the labels say nothing. Returns the loss and the greedy gain
    (:func:`gain`) before and after, on the labels.

    ``loss="expected"``: maximise ``Σ_a π(a|s) A(s, a)`` (the policy's expected gain over the state's average
    action). ``loss="soft_target"``: cross-entropy to ``softmax(A / target_temperature)`` over the allowed
    actions (``A`` in requests), weighted by the state's spread ``max A − min A``. Either way the base's
    logits are PRISM's score × ~20, so moving a greedy choice takes a residual of several logits: on
    synthetic labels 30 Adam steps at 1e-3 moved 3% of the choices, 150 at 1e-2 moved 95% / 70%
    (tests/agents/test_rollout_distill.py). Labels without any spread return at once: Adam would
    otherwise turn the KL term's rounding noise into full-size steps."""
    if loss not in ("soft_target", "expected"):
        raise ValueError(f"distill loss must be 'soft_target' or 'expected', got {loss!r}")
    if target_temperature <= 0:
        raise ValueError(f"target_temperature must be positive, got {target_temperature}")
    before = gain(policy, labels)
    if not np.any(labels.advantages):
        return {"loss": 0.0, "gain_before": before, "gain_after": before, "states": len(labels)}
    observations = torch.as_tensor(labels.observations)
    masks = torch.as_tensor(labels.masks)
    if loss == "expected":
        scale = float(np.std(labels.advantages[labels.masks])) or 1.0
        values = torch.as_tensor(labels.advantages / scale, dtype=torch.float32)
    else:
        logits = np.where(labels.masks, labels.advantages / target_temperature, -np.inf)
        target = np.exp(logits - logits.max(1, keepdims=True))
        values = torch.as_tensor(target / target.sum(1, keepdims=True), dtype=torch.float32)
        spread = labels.spread()
        weights = torch.as_tensor(spread / (spread.mean() or 1.0), dtype=torch.float32)
    with torch.no_grad():
        reference = _log_probs(policy, observations, masks)
    actor = [p for name, p in policy.named_parameters() if "features_extractor" in name and "context" not in name]
    optimizer = torch.optim.Adam(actor, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    loss_value = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            log_pi = _log_probs(policy, observations[batch], masks[batch])
            pi = log_pi.exp()
            kl = (pi * (log_pi - reference[batch])).where(masks[batch], 0.0).sum(1).mean()
            if loss == "expected":
                objective = -(pi * values[batch]).sum(1).mean()
            else:
                cross_entropy = -(values[batch] * log_pi.where(masks[batch], 0.0)).sum(1)
                objective = (weights[batch] * cross_entropy).mean()
            total = objective + kl_coef * kl
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            loss_value = float(total.detach())
    return {"loss": loss_value, "gain_before": before, "gain_after": gain(policy, labels), "states": len(labels)}
