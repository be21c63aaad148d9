"""``servegym/Pools-v0``: one step = one monitoring interval of a prefill/decode cluster.

Action: ``Discrete(1 + 2·max_instances)`` — 0 keeps the pools, ``1 + i`` flips instance i to decode,
``1 + max_instances + i`` flips it to prefill. ``action_masks()`` marks flips that are impossible (absent
instance, already in that role, draining, or leaving a pool empty); an invalid action keeps the pools,
costs 1 of reward and is counted in ``info["invalid_actions"]``. Flips are stateless (Arrow) or drains,
as the cluster configures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from envs.base import ServeGymEnv
from envs.batch_env import NO_REQUEST
from envs.sim.cluster import Cluster
from envs.sim.request import Request
from envs.sim.view import ClusterView

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


class _AgentPools:
    def __init__(self, env: PoolsEnv) -> None:
        self.env = env

    def rebalance(self, view: ClusterView):
        event = self.env._event()
        self.env._pending = (view, event)
        return event


class PoolsEnv(ServeGymEnv):
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
            self._router(),
            batch_policy=self._batch(),
            seed=seed,
            pool_policy=_AgentPools(self),
        )

    def _observe(self) -> np.ndarray:
        view, _ = self._pending
        return self._features(view, NO_REQUEST)

    def action_masks(self) -> np.ndarray:
        n = self.max_instances
        mask = np.zeros(1 + 2 * n, dtype=bool)
        mask[0] = True
        if self._pending is None:
            return mask
        roles = list(self._pending[0].roles)
        for i, role in enumerate(roles):
            for offset, target in ((1, "decode"), (1 + n, "prefill")):
                if role in ("prefill", "decode") and role != target:
                    rest = roles[:i] + roles[i + 1 :] + [target]
                    if {"prefill", "both"} & set(rest) and {"decode", "both"} & set(rest):
                        mask[offset + i] = True
        return mask

    def _apply(self, action: Any) -> float:
        _, event = self._pending
        action = int(action)
        if not 0 <= action < len(self.action_masks()) or not self.action_masks()[action]:
            self._invalid += 1
            event.succeed([])
            return 1.0
        n = self.max_instances
        if action == 0:
            event.succeed([])
        elif action <= n:
            event.succeed([(action - 1, "decode")])
        else:
            event.succeed([(action - 1 - n, "prefill")])
        return 0.0
