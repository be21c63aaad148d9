"""Helpers shared by the simulator tests."""

from servegym.envs.sim.request import Request, SloClass


def make_requests(specs):
    """[(arrival_s, prompt, output), ...] -> fresh Requests."""
    return [
        Request(i, float(a), int(p), int(d), SloClass("t", ttft_s=1.0, tpot_s=0.05))
        for i, (a, p, d) in enumerate(specs)
    ]


def frontend_s(perf):
    """The serving stack's per-request latency (s) before a request reaches the scheduler (the profile's)."""
    return perf.coefficients.request_overhead_ms / 1e3
