"""Pieces every router shares: the router's own bookkeeping between stale snapshots, and output estimates."""

from __future__ import annotations

from envs.sim.view import ClusterView, RequestInfo


class LocalCorrection:
    """What this router sent to each engine since the snapshot it is looking at.

    A router scraping every Δ sees state up to Δ old; adding what it routed since (SynergySched's PRISM
    does this with prompt tokens) keeps it from herding onto the engine that looked emptiest.
    """

    def __init__(self) -> None:
        self._since: dict[int, tuple[float, int, int]] = {}  # engine -> (snapshot time, requests, prompt tokens)

    def _entry(self, view: ClusterView, engine: int) -> tuple[float, int, int]:
        stamp = view.snapshots[engine].time_s
        entry = self._since.get(engine)
        if entry is None or entry[0] != stamp:
            entry = (stamp, 0, 0)
            self._since[engine] = entry
        return entry

    def requests(self, view: ClusterView, engine: int) -> int:
        return self._entry(view, engine)[1]

    def tokens(self, view: ClusterView, engine: int) -> int:
        return self._entry(view, engine)[2]

    def record(self, view: ClusterView, engine: int, request: RequestInfo) -> None:
        stamp, count, tokens = self._entry(view, engine)
        self._since[engine] = (stamp, count + 1, tokens + request.prompt_tokens)


class OutputEstimate:
    """Running mean of observed output lengths (a router sees each response end), from a prior."""

    def __init__(self, prior: float = 256.0, weight: float = 0.01) -> None:
        self.mean, self.weight = prior, weight

    def update(self, output_tokens: int) -> None:
        self.mean += self.weight * (output_tokens - self.mean)

    def expected(self, request: RequestInfo) -> float:
        """The request's own length in oracle mode, else the running mean."""
        return float(request.output_tokens) if request.output_tokens is not None else self.mean
