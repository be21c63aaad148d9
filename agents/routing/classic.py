"""Classic load balancers: random, round-robin, join-shortest-queue, least KV usage, power of two
choices, least outstanding requests, and token-aware routing (SAL).

All pick among ``view.prefill_candidates`` (every engine in a colocated cluster) and break ties by the
lowest index, so a decision is a pure function of the view (and of the seed, for the random ones).
Decode placement in prefill/decode clusters: least resident decode tokens (:class:`LeastResidentDecode`).
"""

from __future__ import annotations

import numpy as np
from servegym.agents.routing.estimates import OutputEstimate
from servegym.envs.sim.policies import LeastOutstandingRequests, RoundRobin, RoutingPolicy
from servegym.envs.sim.view import ClusterView, LocalCorrection, RequestInfo

__all__ = [
    "JoinShortestQueue",
    "LeastKvUsage",
    "LeastOutstandingRequests",
    "LeastResidentDecode",
    "PowerOfTwoChoices",
    "RandomRouter",
    "RoundRobin",
    "TokenAware",
]


def argmin(candidates: list[int], key) -> int:
    """The candidate with the smallest key; ties go to the lowest index."""
    return min(candidates, key=lambda i: (key(i), i))


class LeastResidentDecode(RoutingPolicy):
    """Decode placement: the decode-capable engine with the fewest resident decode KV tokens (the router's
    live count, handed-over decodes included)."""

    def route_decode(self, request: RequestInfo, view: ClusterView) -> int:
        return argmin(view.decode_candidates, lambda i: view.snapshots[i].decode_kv_tokens)


class RandomRouter(LeastResidentDecode):
    """Uniformly random engine (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        candidates = view.prefill_candidates
        return candidates[int(self.rng.integers(len(candidates)))]


class JoinShortestQueue(LeastResidentDecode):
    """Fewest running + waiting requests in the (possibly stale) snapshot, plus requests sent since."""

    def __init__(self) -> None:
        super().__init__()
        self.correction = LocalCorrection()

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        def queue(i: int) -> int:
            s = view.snapshots[i]
            return s.num_requests_running + s.num_requests_waiting + self.correction.requests(view, i)

        choice = argmin(view.prefill_candidates, queue)
        self.correction.record(view, choice, request)
        return choice


class LeastKvUsage(LeastResidentDecode):
    """Lowest KV-cache usage, counting the prompt blocks sent since the snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.correction = LocalCorrection()

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        def usage(i: int) -> float:
            s = view.snapshots[i]
            return s.kv_cache_usage_perc + self.correction.tokens(view, i) / (s.num_gpu_blocks * s.block_size)

        choice = argmin(view.prefill_candidates, usage)
        self.correction.record(view, choice, request)
        return choice


class PowerOfTwoChoices(LeastResidentDecode):
    """Two engines drawn at random (seeded); the one with fewer outstanding requests."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        candidates = view.prefill_candidates
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.choice(len(candidates), size=2, replace=False)
        return argmin([candidates[a], candidates[b]], view.outstanding_requests.__getitem__)


class TokenAware(LeastResidentDecode):
    """SAL-style token-aware balancing: the least outstanding *tokens*, not requests.

    Load of an engine = prompt tokens it has not prefilled yet (the router's live pending-prefill count)
    + the decode work of its in-flight requests, estimated as outstanding
    requests × the mean output length the router has observed. Reading of Kossmann et al.'s SAL (the
    exact rule is not published): token counts, no hardware normalisation.
    """

    def __init__(self, output_prior: float = 256.0) -> None:
        super().__init__()
        self.outputs = OutputEstimate(output_prior)

    def load(self, view: ClusterView, i: int) -> float:
        return view.snapshots[i].pending_prefill_tokens + view.outstanding_requests[i] * self.outputs.mean

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        return argmin(view.prefill_candidates, lambda i: self.load(view, i))

    def on_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        self.outputs.update(output_tokens)
