"""``servegym/Route-v0``: one step = one routing decision (an arriving request, or in prefill/decode
clusters also the placement of a prefilled request's decode). The spec sheet is :class:`RouteEnv`'s docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from servegym.envs.base import ServeGymEnv, action_index, fill_spec_sheet
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.policies import Decision, DecisionKind
from servegym.envs.sim.request import Request

ACTION_MEANING = "engine index in [0, max_instances): the engine to send the request to"


class RouteEnv(ServeGymEnv):
    """Route each arriving request to an engine of a simulated LLM-serving cluster.

    ## Description
    The simulator runs until a request arrives (or, with prefill/decode pools, a prefill finishes and its
    decode must be placed); the agent answers with an engine; the simulator runs on. Engines batch as the
    configured batch policy does (vLLM's by default), so the agent's only lever is placement.

    ## Action space
    ``Discrete(max_instances)``: the engine. ``action_masks()`` (and ``info["action_mask"]``) marks absent
    slots and engines whose role cannot take the decision (decode-only engines for new requests,
    prefill-only ones for decodes). A masked action, or a value that is no action of the space (NaN,
    None, a string, 2.7, an index outside it), is not a crash: the request goes to the valid engine with
    the fewest outstanding requests, the step's reward is reduced by 1, ``info["invalid_actions"]`` counts
    it and ``info["invalid_reason"]`` says why (the first malformed value also warns).

    ## Observation space
    ``Box`` of ``len(ENGINE_FEATURES) × max_instances + len(REQUEST_FEATURES)`` float32, the observation
    contract of :mod:`servegym.envs.features` (raw / scale, clipped to the bounds; padding slots zero):

    {table}

    {common}

    ## Version history
    - v0, observation contract 5 (``prefix_match``: the share of the prompt's prefix segments the router
      sent to each engine); contract 4 bounded affinity by PRISM's 300 s window (PRISM's whole score is a
      function of the observation); contract 3 made the tap fields router-side and live; contract 2 added
      the requests sent since the gauges' scrape; contract 1 the first feature set.
    """

    decision_kinds = (DecisionKind.ROUTE, DecisionKind.ROUTE_DECODE)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Discrete(self.max_instances)
        self.observation_space = spaces.Box(self.spec_features.low, self.spec_features.high, dtype=np.float32)

    def _build(self, requests: list[Request], seed: int) -> Cluster:
        return Cluster(
            self.cluster_config,
            self._agent(),
            batch_policy=self._inline_batch,
            seed=seed,
            pool_policy=self._inline_pools,
        )

    def action_manifest(self) -> dict[str, Any]:
        """What an action means, as a saved policy's manifest records it."""
        return {"action": ACTION_MEANING}

    def _observe(self, decision: Decision) -> np.ndarray:
        return self._features(decision.view, decision.request, decode_phase=decision.kind is DecisionKind.ROUTE_DECODE)

    def _mask(self, decision: Decision | None) -> np.ndarray:
        mask = np.zeros(self.max_instances, dtype=bool)
        if decision is None:
            mask[0] = True  # nothing to decide: any action is ignored
            return mask
        view = decision.view
        mask[view.decode_candidates if decision.kind is DecisionKind.ROUTE_DECODE else view.prefill_candidates] = True
        return mask

    def _answer_of(self, decision: Decision, action: Any) -> int | None:
        choice = action_index(action, "Route-v0", self.action_space)
        return choice if self._mask(decision)[choice] else None


fill_spec_sheet(RouteEnv, drained="the requests the agent placed are")
