"""``servegym/Batch-v0``: one step = one engine's scheduling decision, a policy shared by all engines.

Action: the step's token budget — ``Discrete(len(budgets))`` indexing ``budgets`` (default 128…8192), or
with ``continuous=True`` a ``Box([-1, 1])`` mapped log-linearly onto [min, max] of ``budgets``. The engine's
batch former turns the budget into a batch as vLLM does (decodes first and never starved, then prefill
chunks, then FCFS admission). Observation: the contract's features of the whole cluster (no request:
request features are zero) followed by a one-hot of the deciding engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from envs.base import ServeGymEnv
from envs.sim.cluster import Cluster
from envs.sim.engine import Engine
from envs.sim.request import Request, SloClass
from envs.sim.view import RequestInfo

DEFAULT_BUDGETS = (128, 256, 512, 1024, 2048, 4096, 8192)
NO_REQUEST = RequestInfo(-1, 0.0, 0, SloClass("none"))


class _AgentBatcher:
    """Installed as every engine's batch policy: each step's budget becomes a pending decision."""

    name = "agent"
    supports_decode_jumps = False  # every step is a decision

    def __init__(self, env: BatchEnv) -> None:
        self.env = env

    def token_budget(self, engine: Engine) -> int:
        return engine.config.max_num_batched_tokens

    def request_budget(self, engine: Engine):
        event = self.env._event()
        self.env._pending = (engine, event)
        return event


class BatchEnv(ServeGymEnv):
    def __init__(self, budgets: tuple[int, ...] = DEFAULT_BUDGETS, continuous: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not budgets or min(budgets) < 1:
            raise ValueError(f"budgets must be positive token counts, got {budgets}")
        self.budgets, self.continuous = tuple(int(b) for b in budgets), continuous
        self.action_space = (
            spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32) if continuous else spaces.Discrete(len(self.budgets))
        )
        low = np.concatenate([self.spec_features.low, np.zeros(self.max_instances, np.float32)])
        high = np.concatenate([self.spec_features.high, np.ones(self.max_instances, np.float32)])
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

    def _build(self, requests: list[Request], seed: int) -> Cluster:
        return Cluster(
            self.cluster_config,
            self._router(),
            batch_policy=_AgentBatcher(self),
            seed=seed,
            pool_policy=self._pools(),
        )

    def _observe(self) -> np.ndarray:
        engine, _ = self._pending
        identity = np.zeros(self.max_instances, np.float32)
        identity[engine.index] = 1.0
        return np.concatenate([self._features(self.sim.view(), NO_REQUEST), identity])

    def action_masks(self) -> np.ndarray:
        return np.ones(len(self.budgets), dtype=bool)

    def budget_of(self, action: Any) -> int:
        if self.continuous:
            x = (float(np.clip(np.asarray(action, dtype=float).reshape(-1)[0], -1.0, 1.0)) + 1.0) / 2.0
            low, high = np.log(min(self.budgets)), np.log(max(self.budgets))
            return round(np.exp(low + x * (high - low)))
        return self.budgets[int(action)]

    def _apply(self, action: Any) -> float:
        _engine, event = self._pending
        penalty = 0.0
        if not self.continuous and not 0 <= int(action) < len(self.budgets):
            action, penalty = len(self.budgets) - 1, 1.0
            self._invalid += 1
        event.succeed(self.budget_of(action))
        return penalty
