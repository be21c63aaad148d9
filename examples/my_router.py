"""A user's own router, outside the package: run it in the leaderboard, evaluate.py or an environment by
its import path, without copying anything into conf/policy (docs/leaderboard.md):

    python experiments/leaderboard.py +custom.mine=examples/my_router.py:PendingTokens scenarios=[hetero-conv]
    python experiments/evaluate.py +custom.mine=examples/my_router.py:PendingTokens scenario=hetero-conv
    gym.make("servegym/Route-hetero-conv-v0", router="examples/my_router.py:PendingTokens")
"""

from servegym.envs.sim.policies import RoutingPolicy


class PendingTokens(RoutingPolicy):
    """The engine with the fewest prompt tokens still waiting for their first token (the router's own count),
    its outstanding requests breaking ties, scaled by how fast the engine's recent steps were."""

    def __init__(self, tie_weight: float = 64.0) -> None:
        self.tie_weight = tie_weight

    def route(self, request, view) -> int:
        def load(i: int) -> float:
            snapshot = view.snapshots[i]
            work = snapshot.pending_prefill_tokens + self.tie_weight * view.outstanding_requests[i]
            return work * max(snapshot.recent_step_ms, 1.0)

        return min(view.prefill_candidates, key=load)
