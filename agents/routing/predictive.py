"""Predictive routers built on the performance model: SynergySched's PRISM and Block-style prediction.

Both read what the router knows beyond vLLM's exporter from its own traffic (pending prefill tokens,
resident decodes, the next step's tokens and predicted latency: :mod:`servegym.envs.sim.router_tap`, where
SynergySched has engines push them) and each engine's static facts, from which they build the same
structural model the engines are calibrated with.
"""

from __future__ import annotations

import math

from servegym.agents.routing.classic import LeastResidentDecode, argmin
from servegym.agents.routing.estimates import OutputEstimate
from servegym.envs.features import EngineModels
from servegym.envs.sim.view import ClusterView, RequestInfo


class Prism(LeastResidentDecode):
    """PRISM (SynergySched): score each engine, route to the highest.

    ``s_lat = max(0, 1 − min(predicted step latency / SLO_TPOT, 5))``; ``s_load = 1 − tanh(pending
    prefill tokens / capacity / 1 s)`` (the router's live count, so SynergySched's decision-lag
    correction for pushed state is already in it); ``s_mode`` = 1, 0.5, 0 when the next step's tokens
    are < 256, ≤ 1024, larger (latency-optimised, balanced, throughput mode); ``s_kv`` = 1 if the request's session
    was last routed to this engine within ``affinity_window_s``. Weights 1 by default. Capacity in
    tokens/s is what makes it hardware-aware in a heterogeneous cluster.
    """

    def __init__(
        self,
        slo_tpot_s: float = 0.05,
        affinity_window_s: float = 300.0,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        self.slo_tpot_s, self.affinity_window_s, self.weights = slo_tpot_s, affinity_window_s, tuple(weights)
        self.models = EngineModels()
        self._sessions: dict[int, tuple[int, float]] = {}

    def scores(self, request: RequestInfo, view: ClusterView) -> dict[int, float]:
        w_lat, w_load, w_mode, w_kv = self.weights
        last = self._sessions.get(request.session_id) if request.session_id >= 0 else None
        out = {}
        for i in view.prefill_candidates:
            s = view.snapshots[i]
            s_lat = max(0.0, 1.0 - min(s.predicted_step_ms / 1e3 / self.slo_tpot_s, 5.0))
            s_load = 1.0 - math.tanh(s.pending_prefill_tokens / self.models.prefill_capacity(view.engines[i]) / 1.0)
            tokens = s.next_step_tokens
            s_mode = 1.0 if tokens < 256 else 0.5 if tokens <= 1024 else 0.0
            s_kv = 1.0 if last is not None and last[0] == i and view.now_s - last[1] <= self.affinity_window_s else 0.0
            out[i] = w_lat * s_lat + w_load * s_load + w_mode * s_mode + w_kv * s_kv
        return out

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        scores = self.scores(request, view)
        choice = argmin(list(scores), lambda i: -scores[i])
        if request.session_id >= 0:
            self._sessions[request.session_id] = (choice, view.now_s)
        return choice


class SloPartitionPrism(Prism):
    """PRISM plus a bonus that keeps SLO classes apart on a heterogeneous cluster: ``bonus`` for the fastest
    engines (prefill capacity within 1% of the best candidate's) when the request's TPOT target is at most
    ``tight_tpot_s``, and for the others when it is at least ``loose_tpot_s``.

    Not from the literature: written for multi-slo after rollout labels showed that tight requests gain
    from the H100s and loose ones from the A100s (docs/training.md). One deviation from PRISM is worth
    ~0.2 requests; the partition pays once most decisions keep it, which a one-step lookahead cannot find
    — it is the hand-written reference the learned routers on that scenario are held against.
    """

    def __init__(
        self,
        slo_tpot_s: float = 0.1,
        bonus: float = 2.0,
        tight_tpot_s: float = 0.05,
        loose_tpot_s: float = 0.15,
        affinity_window_s: float = 300.0,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    ) -> None:
        super().__init__(slo_tpot_s, affinity_window_s, weights)
        self.bonus, self.tight_tpot_s, self.loose_tpot_s = float(bonus), float(tight_tpot_s), float(loose_tpot_s)

    def scores(self, request: RequestInfo, view: ClusterView) -> dict[int, float]:
        out = super().scores(request, view)
        tpot = request.slo.tpot_s
        if tpot is None:  # no TPOT target: nothing to keep apart
            return out
        tight, loose = tpot <= self.tight_tpot_s, tpot >= self.loose_tpot_s
        if out and (tight or loose):
            capacity = {i: self.models.prefill_capacity(view.engines[i]) for i in out}
            fastest = max(capacity.values())
            for i in out:
                if (capacity[i] >= 0.99 * fastest) == tight:
                    out[i] += self.bonus
        return out


class BlockPredictive(LeastResidentDecode):
    """Block-style routing: predict the request's end-to-end latency on every engine, take the best.

    Each candidate's prediction walks its queue with the performance model: TTFT through the pending
    prefill tokens (the router's live count) with its running decodes held fixed, then the
    expected output length (the request's own in oracle mode, else the observed mean) at the TPOT of
    its decode batch with this request added. Reading of Block (arXiv 2508.03611), whose length
    predictor is replaced by the router's running mean.
    """

    def __init__(self, output_prior: float = 256.0) -> None:
        super().__init__()
        self.models = EngineModels()
        self.outputs = OutputEstimate(output_prior)

    def predicted_e2e_s(self, request: RequestInfo, view: ClusterView, i: int) -> float:
        ttft, tpot = self.models.routed_latency_ms(view.engines[i], view.snapshots[i], request.prompt_tokens)
        return (ttft + (self.outputs.expected(request) - 1) * tpot) / 1e3

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        choice = argmin(view.prefill_candidates, lambda i: self.predicted_e2e_s(request, view, i))
        return choice

    def on_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        self.outputs.update(output_tokens)
