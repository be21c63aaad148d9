"""``servegym/Route-v0``: one step = one routing decision (an arriving request, or in prefill/decode
clusters also the placement of a prefilled request's decode).

Action: ``Discrete(max_instances)``, the engine. ``action_masks()`` marks absent slots and engines whose
role cannot take the decision (decode-only engines for new requests, prefill-only ones for decodes). An
invalid action from an unmasked algorithm is not a crash: the request goes to the valid engine with the
fewest outstanding requests, the step's reward is reduced by 1, and ``info["invalid_actions"]`` counts it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from envs.base import ServeGymEnv
from envs.sim.cluster import Cluster
from envs.sim.request import Request
from envs.sim.view import ClusterView, RequestInfo


class _AgentRouter:
    """Installed in the cluster: every routing question becomes a pending decision of the environment."""

    def __init__(self, env: RouteEnv) -> None:
        self.env = env

    def route(self, request: RequestInfo, view: ClusterView):
        return self.env._ask("prefill", request, view)

    def route_decode(self, request: RequestInfo, view: ClusterView):
        return self.env._ask("decode", request, view)

    def observe_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        hook = getattr(self.env._inline, "observe_completion", None)  # the warm-up/drain heuristic's state
        if hook is not None:
            hook(request, instance, output_tokens, e2e_s)


class RouteEnv(ServeGymEnv):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Discrete(self.max_instances)
        self.observation_space = spaces.Box(self.spec_features.low, self.spec_features.high, dtype=np.float32)

    def _build(self, requests: list[Request], seed: int) -> Cluster:
        self._inline = self._router()  # warm-up and drain decisions (the reference heuristic)
        return Cluster(
            self.cluster_config,
            _AgentRouter(self),
            batch_policy=self._batch(),
            seed=seed,
            pool_policy=self._pools(),
        )

    def _inline_choice(self, phase: str, request: RequestInfo, view: ClusterView) -> int:
        if phase == "decode":
            return self._inline.route_decode(request, view)
        choice = self._inline.route(request, view)
        self.context.observe_route(request, choice, view)
        return choice

    def _answer_inline(self) -> None:
        phase, request, view, event = self._pending
        event.succeed(self._inline_choice(phase, request, view))

    def _ask(self, phase: str, request: RequestInfo, view: ClusterView):
        if self._inline_turn():
            return self._inline_choice(phase, request, view)
        event = self._event()
        self._pending = (phase, request, view, event)
        return event

    def decision(self) -> tuple[str, RequestInfo, ClusterView]:
        """The pending decision as a heuristic sees it: phase, request and cluster view."""
        phase, request, view, _ = self._pending
        return phase, request, view

    def _observe(self) -> np.ndarray:
        phase, request, view, _ = self._pending
        return self._features(view, request, decode_phase=phase == "decode")

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(self.max_instances, dtype=bool)
        if self._pending is None:
            mask[0] = True  # nothing to decide: any action is ignored
            return mask
        phase, _, view, _ = self._pending
        candidates = view.decode_candidates if phase == "decode" else view.prefill_candidates
        mask[candidates] = True
        return mask

    def _apply(self, action: Any) -> float:
        phase, request, view, event = self._pending
        mask = self.action_masks()
        choice = int(action) if np.ndim(action) == 0 else int(np.asarray(action).item())
        penalty = 0.0
        if not 0 <= choice < self.max_instances or not mask[choice]:
            valid = np.flatnonzero(mask)
            choice = int(min(valid, key=lambda i: (view.outstanding_requests[i], i)))
            penalty = 1.0
            self._invalid += 1
        if phase == "prefill":
            self.context.observe_route(request, choice, view)
            self._placed.add(request.id)
        event.succeed(choice)
        return penalty
