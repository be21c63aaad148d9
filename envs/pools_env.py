"""``servegym/Pools-v0``: one step = one monitoring interval of a prefill/decode cluster. The spec sheet is
:class:`PoolsEnv`'s docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from servegym.envs.base import ServeGymEnv, action_index, fill_spec_sheet
from servegym.envs.batch_env import NO_REQUEST
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.policies import Decision, DecisionKind
from servegym.envs.sim.request import Request
from servegym.envs.sim.roles import Role, flip_allowed

DEFAULT_PD_CLUSTER = {
    "snapshot_interval_s": 0.1,
    "monitor_interval_s": 2.0,
    "groups": [
        {
            "name": "prefill",
            "count": 2,
            "node": "n0",
            "engine": {"gpu": "H100-SXM", "model": "Llama-3-8B", "role": "prefill"},
        },
        {
            "name": "decode",
            "count": 2,
            "node": "n0",
            "engine": {"gpu": "H100-SXM", "model": "Llama-3-8B", "role": "decode"},
        },
    ],
}


ACTION_MEANING = "0: keep the pools; 1 + i: flip instance i to decode; 1 + max_instances + i: flip it to prefill"


def flip_of(action: int, max_instances: int) -> list[tuple[int, Role]]:
    """The flips a Pools-v0 action asks for: none, or one instance to decode or to prefill."""
    if action == 0:
        return []
    n = max_instances
    return [(action - 1, Role.DECODE)] if action <= n else [(action - 1 - n, Role.PREFILL)]


def flip_mask(roles: list[Role] | tuple[Role, ...], max_instances: int) -> np.ndarray:
    """The Pools-v0 actions allowed for instances in ``roles``: keeping, and every flip of a prefill or
    decode instance that leaves no pool empty (a learned pool policy masks the same way)."""
    n = max_instances
    mask = np.zeros(1 + 2 * n, dtype=bool)
    mask[0] = True
    roles = list(roles)
    for i, role in enumerate(roles):
        for offset, target in ((1, Role.DECODE), (1 + n, Role.PREFILL)):
            if role in (Role.PREFILL, Role.DECODE) and role is not target and flip_allowed(roles, i, target):
                mask[offset + i] = True
    return mask


class PoolsEnv(ServeGymEnv):
    """Resize the prefill and decode pools of a disaggregated LLM-serving cluster, one flip at a time.

    ## Description
    Every monitoring interval (``monitor_interval_s`` of the cluster) the agent may flip one instance's
    role; requests are routed by the inline router and their decodes placed on the decode pool, with KV
    transfers between them. Flips are stateless (Arrow) or drains, as the cluster configures.

    ## Action space
    ``Discrete(1 + 2·max_instances)``: 0 keeps the pools, ``1 + i`` flips instance i to decode,
    ``1 + max_instances + i`` flips it to prefill. ``action_masks()`` (and ``info["action_mask"]``) marks
    flips that are impossible (absent instance, already in that role, draining, or leaving a pool
    empty). A masked action, or a value that is no action of the space (NaN, 1.5, 99), keeps the pools
    with −1, counted in ``info["invalid_actions"]`` with the reason (the first malformed value warns).

    ## Observation space
    The observation contract of the cluster (request features zero):

    {table}

    {common}

    ## Version history
    - v0, observation contract 5 (docs/environments.md has the contract's history; since contract 3 the
      decode instances' step time is the router's EWMA of relayed inter-token gaps); episodes in simulated
      time and fixed ``windows`` since 2026-12-02.
    """

    decision_kinds = (DecisionKind.POOLS,)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cluster", DEFAULT_PD_CLUSTER)
        super().__init__(**kwargs)
        if not self.cluster_config.disaggregated:
            raise ValueError("Pools-v0 needs a prefill/decode cluster: give groups of role prefill and decode")
        self.action_space = spaces.Discrete(1 + 2 * self.max_instances)
        self.observation_space = spaces.Box(self.spec_features.low, self.spec_features.high, dtype=np.float32)

    def _build(self, requests: list[Request], seed: int) -> Cluster:
        return Cluster(
            self.cluster_config,
            self._inline_router,
            batch_policy=self._inline_batch,
            seed=seed,
            pool_policy=self._agent(),
        )

    def action_manifest(self) -> dict[str, Any]:
        """What an action means, as a saved policy's manifest records it."""
        return {"action": ACTION_MEANING}

    def _observe(self, decision: Decision) -> np.ndarray:
        return self._features(decision.view, NO_REQUEST)

    def flip_of(self, action: int) -> list[tuple[int, Role]]:
        """The flips an action asks for: none, or one instance to decode or to prefill."""
        return flip_of(action, self.max_instances)

    def action_of(self, flips: list[tuple[int, Role]]) -> int:
        """The action asking for ``flips`` (at most one flip, as a pool policy like Arrow returns)."""
        if not flips:
            return 0
        if len(flips) > 1:
            raise ValueError(f"one action flips one instance; got {flips}")
        index, role = flips[0]
        return 1 + int(index) + (self.max_instances if Role(role) is Role.PREFILL else 0)

    def _mask(self, decision: Decision | None) -> np.ndarray:
        if decision is None:
            mask = np.zeros(1 + 2 * self.max_instances, dtype=bool)
            mask[0] = True
            return mask
        return flip_mask(decision.view.roles, self.max_instances)

    def _answer_of(self, decision: Decision, action: Any) -> list[tuple[int, Role]] | None:
        action = action_index(action, "Pools-v0", self.action_space)
        return self.flip_of(action) if self._mask(decision)[action] else None


fill_spec_sheet(PoolsEnv, drained="every request in the system is")
