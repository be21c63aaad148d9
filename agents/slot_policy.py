"""A routing policy network that scores every engine slot with the same small network.

"Send the request to the best engine" is the same question for every slot; a plain MLP over the
concatenated observation must learn it once per slot. Here one scorer sees one engine's features plus the
request's and yields that engine's logit (permutation-equivariant over slots); the value head sees the
whole observation. Works with sb3-contrib's MaskablePPO (and PPO through ``SlotPolicyPPO``).
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from servegym.envs.features import ENGINE_FEATURES, REQUEST_FEATURES
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class SlotFeatures(BaseFeaturesExtractor):
    """Per-slot logits (first ``max_instances`` outputs) followed by a pooled context for the critic."""

    def __init__(self, observation_space: spaces.Box, hidden: int = 64) -> None:
        self.per_engine, self.request = len(ENGINE_FEATURES), len(REQUEST_FEATURES)
        self.slots = (observation_space.shape[0] - self.request) // self.per_engine
        super().__init__(observation_space, features_dim=self.slots + hidden)
        self.scorer = nn.Sequential(
            nn.Linear(self.per_engine + self.request, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )
        self.context = nn.Sequential(nn.Linear(observation_space.shape[0], hidden), nn.Tanh())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        batch = observations.shape[0]
        engines = observations[:, : self.slots * self.per_engine].reshape(batch, self.slots, self.per_engine)
        request = observations[:, self.slots * self.per_engine :]
        pairs = torch.cat([engines, request.unsqueeze(1).expand(batch, self.slots, self.request)], dim=2)
        scores = self.scorer(pairs).squeeze(-1)
        return torch.cat([scores, self.context(observations)], dim=1)


class TakeSlots(nn.Module):
    """The action head: the slot logits the features extractor already computed."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent[:, : self.slots]


class DetachScores(nn.Module):
    """The critic reads the slot scores but its loss does not move them: with a shared extractor, the
    value regression on noisy returns would otherwise rewrite the actor (measured: a cloned policy lost
    2–3 points of validation attainment within 10k PPO steps before this)."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features[:, : self.slots].detach(), features[:, self.slots :]], dim=1)


class _SlotActor:
    """Mixin: the slot scorer as features extractor (read by the critic, trained by the actor's loss only)
    and ``TakeSlots`` as actor."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("features_extractor_class", SlotFeatures)
        kwargs.setdefault("net_arch", {"pi": [], "vf": [64, 64]})
        kwargs.setdefault("share_features_extractor", True)
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        slots = self.features_extractor.slots
        self.action_net = TakeSlots(slots)
        self.mlp_extractor.value_net = nn.Sequential(DetachScores(slots), *self.mlp_extractor.value_net)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)


class SlotPolicy(_SlotActor, MaskableActorCriticPolicy):
    """MaskablePPO policy with a per-slot scorer as the actor."""


class SlotPolicyPPO(_SlotActor, ActorCriticPolicy):
    """The same network for plain PPO (no masks)."""
