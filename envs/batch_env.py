"""``servegym/Batch-v0``: one step = one engine's scheduling decision, a policy shared by all engines. The spec
sheet is :class:`BatchEnv`'s docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from servegym.envs.base import ServeGymEnv, action_index, continuous_action, fill_spec_sheet
from servegym.envs.features import FeatureContext, FeatureSpec
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.policies import Decision, DecisionKind
from servegym.envs.sim.request import Request, SloClass
from servegym.envs.sim.view import ClusterView, RequestInfo

DEFAULT_BUDGETS = (128, 256, 512, 1024, 2048, 4096, 8192)
NO_REQUEST = RequestInfo(-1, 0.0, 0, SloClass("none"))


def batch_observation(
    spec: FeatureSpec, view: ClusterView, engine: int, context: FeatureContext
) -> tuple[np.ndarray, int]:
    """Batch-v0's observation of engine ``engine``'s step (the cluster's features, no request, then a
    one-hot of the engine) and how many values were clipped; a learned batcher computes the same."""
    identity = np.zeros(spec.max_instances, np.float32)
    identity[engine] = 1.0
    features, clipped = spec.vector(view, NO_REQUEST, context)
    return np.concatenate([features, identity]), clipped


def continuous_budget(x: float, budgets: tuple[int, ...]) -> int:
    """The token budget of a continuous action in [-1, 1]: log-linear over [min, max] of ``budgets``."""
    low, high = np.log(min(budgets)), np.log(max(budgets))
    return round(np.exp(low + (x + 1.0) / 2.0 * (high - low)))


def action_meaning(budgets: tuple[int, ...], continuous: bool) -> str:
    """What a Batch-v0 action means, as manifests record it."""
    if continuous:
        return f"token budget of the engine's step: x in [-1, 1] log-linear over [{min(budgets)}, {max(budgets)}]"
    return f"token budget of the engine's step: index into budgets {list(budgets)}"


class BatchEnv(ServeGymEnv):
    """Choose each engine step's token budget in a simulated LLM-serving cluster (one policy for all engines).

    ## Description
    Before every step of every engine the simulator asks for that step's token budget; the engine's batch
    former turns it into a batch as vLLM does (decodes first and never starved, then prefill chunks, then
    FCFS admission), with the configured batch policy's chunk cap, prefill order, admission and preemption
    rules. Requests are routed by the inline router (least outstanding by default).

    ## Action space
    ``Discrete(len(budgets))`` indexing ``budgets`` (default 128…8192), or with ``continuous=True`` a
    ``Box([-1, 1])`` mapped log-linearly onto [min, max] of ``budgets``. Every action of the space is valid;
    a value that is not one (NaN, None, 2.7, an index or a continuous value outside the space) takes the
    fallback (the largest budget) with −1, counted in ``info["invalid_actions"]`` with a reason naming the
    environment, the space and the value (the first one also warns).

    ## Observation space
    The observation contract of the whole cluster (request features zero: no request is being placed),
    then a one-hot of the deciding engine:

    {table}

    {common}

    ## Version history
    - v0, observation contract 5 (docs/environments.md has the contract's history); episodes in simulated
      time (``horizon_s``, ``warmup_s``) and fixed ``windows`` with cached reference runs since 2026-12-02.
    """

    decision_kinds = (DecisionKind.BATCH,)

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
            self._inline_router,
            batch_policy=self._agent(),
            seed=seed,
            pool_policy=self._inline_pools,
        )

    def action_manifest(self) -> dict[str, Any]:
        """What an action means, as a saved policy's manifest records it (a learned batcher reads the budgets)."""
        return {
            "action": action_meaning(self.budgets, self.continuous),
            "budgets": list(self.budgets),
            "continuous": self.continuous,
        }

    def _observe(self, decision: Decision) -> np.ndarray:
        observation, clipped = batch_observation(self.spec_features, decision.view, decision.engine.index, self.context)
        self._clipped += clipped
        return observation

    def _mask(self, decision: Decision | None) -> np.ndarray:
        return np.ones(len(self.budgets), dtype=bool)

    def budget_of(self, action: Any) -> int:
        """The token budget an action asks for; a value that is no action of the space raises
        :class:`servegym.envs.base.InvalidAction` (``step`` answers it with the fallback)."""
        if self.continuous:
            return continuous_budget(float(continuous_action(action, "Batch-v0", self.action_space)[0]), self.budgets)
        return self.budgets[action_index(action, "Batch-v0", self.action_space)]

    def _answer_of(self, decision: Decision, action: Any) -> int:
        return self.budget_of(action)  # every budget of the space is allowed: nothing to mask


fill_spec_sheet(
    BatchEnv,
    drained="every request in the system is",
    arguments="``budgets``, ``continuous``",
    extra_rows=(("engine_onehot[i]", "flag", "1 for the engine whose step is decided"),),
)
