"""The routing protocol and the two policies the simulator needs to run on its own.

Richer policies (JSQ variants, token-aware SAL, PRISM, prefix-aware, ...) live in ``agents/``; the
simulator only knows the protocol and receives a policy from configuration.
"""

from __future__ import annotations

from typing import Protocol

from envs.sim.view import ClusterView, RequestInfo


class RoutingPolicy(Protocol):
    """Chooses an engine for each arriving request.

    Optional members the cluster uses when present: ``route_decode(request, view) -> int`` (the decode
    instance of a prefill/decode handoff) and ``observe_completion(request, instance, output_tokens,
    e2e_s)`` (a router sees every response end and its length).
    """

    def route(self, request: RequestInfo, view: ClusterView) -> int: ...


class PoolPolicy(Protocol):
    """Every monitoring interval: which instances flip role (``[(index, "prefill"|"decode"|"both"), ...]``)."""

    def rebalance(self, view: ClusterView) -> list[tuple[int, str]]: ...


class StaticPools:
    """Keep the configured prefill/decode ratio."""

    def rebalance(self, view: ClusterView) -> list[tuple[int, str]]:
        return []


class RoundRobin:
    """Engines in turn, blind to load."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        candidates = view.prefill_candidates
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


class LeastOutstandingRequests:
    """The engine with the fewest requests the router sent and has not seen finish (ties: lowest index)."""

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        return min(view.prefill_candidates, key=view.outstanding_requests.__getitem__)

    def route_decode(self, request: RequestInfo, view: ClusterView) -> int:
        return min(view.decode_candidates, key=view.outstanding_requests.__getitem__)
