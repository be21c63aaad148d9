"""What a router estimates of the requests it routes: output lengths, from the responses it has seen end."""

from __future__ import annotations

from servegym.envs.sim.view import RequestInfo


class OutputEstimate:
    """Running mean of observed output lengths (a router sees each response end), from a prior."""

    def __init__(self, prior: float = 256.0, weight: float = 0.01) -> None:
        self.mean, self.weight = prior, weight

    def update(self, output_tokens: int) -> None:
        self.mean += self.weight * (output_tokens - self.mean)

    def expected(self, request: RequestInfo) -> float:
        """The request's own length in oracle mode, else the running mean."""
        return float(request.output_tokens) if request.output_tokens is not None else self.mean
