"""The routing protocol and the two policies the simulator needs to run on its own.

Richer policies (JSQ variants, token-aware SAL, PRISM, prefix-aware, ...) live in ``agents/``; the
simulator only knows the protocol and receives a policy from configuration.
"""

from __future__ import annotations

from typing import Protocol

from envs.sim.view import ClusterView, RequestInfo


class RoutingPolicy(Protocol):
    """Chooses an engine for each arriving request."""

    def route(self, request: RequestInfo, view: ClusterView) -> int: ...


class RoundRobin:
    """Engines in turn, blind to load."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        choice = self._next % view.num_engines
        self._next = choice + 1
        return choice


class LeastOutstandingRequests:
    """The engine with the fewest requests the router sent and has not seen finish (ties: lowest index)."""

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        outstanding = view.outstanding_requests
        return min(range(len(outstanding)), key=outstanding.__getitem__)
