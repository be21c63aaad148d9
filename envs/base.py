"""The machinery every ServeGym environment shares: build a cluster, run it until the next decision of the
environment's kind, compute rewards, end episodes.

Control inversion: the environment installs an *external* policy for its decision kind. When the
simulator asks for a decision, that policy returns a pending simpy event; the environment stops the
clock there, hands the observation to the agent, and ``step(action)`` answers the event and runs the
simulator to the next decision. Other decisions are made inline by configured heuristics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import simpy

from envs.features import FeatureContext, FeatureSpec
from envs.sim.cluster import Cluster, ClusterConfig
from envs.sim.config import cluster_from, workload_from
from envs.sim.request import Request
from envs.sim.routing import LeastOutstandingRequests
from envs.sim.view import ClusterView, RequestInfo

REWARDS = ("goodput", "latency", "relative")
DEFAULT_CLUSTER = {
    "snapshot_interval_s": 0.1,
    "groups": [
        {"name": "h100", "count": 2, "engine": {"gpu": "H100-SXM", "model": "Llama-3-8B"}},
        {"name": "a100", "count": 2, "engine": {"gpu": "A100-80GB", "model": "Llama-3-8B"}},
    ],
}
DEFAULT_WORKLOAD = {
    "kind": "trace",
    "path": "azure_conv",
    "rate_scale": 8.0,
    "num_requests": 1000,
    "random_window": True,
    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}],
}


class ServeGymEnv(gym.Env):
    """Base class: subclasses set the action space and install their external policy in :meth:`_build`.

    Args:
        cluster: a cluster mapping (as in ``conf/cluster``) or a :class:`ClusterConfig`.
        workload: a workload mapping (as in ``conf/workload``).
        max_instances: engine slots in observations and actions (>= the cluster's engines).
        reward: ``goodput`` (+1 per request finishing within its SLO, on the step it finishes),
            ``latency`` (minus the request-seconds spent in the system since the last decision, / 10), or
            ``relative`` (+1/−1 per finishing request that meets/misses its SLO where the reference heuristic
            on the same arrivals missed/met it). Each step's reward is clipped to [−10, 10].
        horizon: decisions per episode before truncation (None: until the workload is drained).
        load_range: ``(low, high)``: every episode compresses the workload's arrival times by a factor
            drawn uniformly from this range (1.2 = 20% more load), so one policy trains across loads rather
            than at the single rate it will not be deployed at. ``None``: the workload as configured.
        warmup: decisions made by the inline heuristic at the start of every episode before the agent takes
            over (the agent then acts in a loaded cluster instead of an empty one).
        drain: at truncation, keep simulating (the inline heuristic deciding) until every request the agent
            placed has finished, and pay their outcomes in the last step's reward (not clipped). With the
            ``relative`` reward and ``gamma`` = 1, an episode's return is then exactly how many more
            requests met their SLO than under the reference heuristic because of the agent's ``horizon``
            decisions: the counterfactual credit that per-step rewards, arriving hundreds of decisions
            after the choice that caused them, do not give.
        router / batch / pools: the heuristics of the ``relative`` reward (and the inline decisions the agent
            does not make).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (Gymnasium's convention)

    def __init__(
        self,
        cluster: dict | ClusterConfig | None = None,
        workload: dict | None = None,
        max_instances: int = 8,
        reward: str = "goodput",
        horizon: int | None = None,
        router: Any = None,
        batch: Any = None,
        pools: Any = None,
        load_range: tuple[float, float] | None = None,
        warmup: int = 0,
        drain: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        if load_range is not None:
            load_range = (float(load_range[0]), float(load_range[1]))
            if not 0 < load_range[0] <= load_range[1]:
                raise ValueError(f"load_range must be (low, high) with 0 < low <= high, got {load_range}")
        self.load_range = load_range
        self.load_factor = 1.0
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 decisions, got {warmup}")
        if drain and horizon is None:
            raise ValueError("drain needs a horizon (it acts when an episode is truncated)")
        if (warmup or drain) and type(self)._answer_inline is ServeGymEnv._answer_inline:
            raise ValueError(f"warmup and drain are routing-environment options; {type(self).__name__} has neither")
        self.warmup, self.drain = int(warmup), bool(drain)
        self.cluster_config = (
            cluster if isinstance(cluster, ClusterConfig) else cluster_from(cluster or DEFAULT_CLUSTER)
        )
        self.workload = workload_from(workload or DEFAULT_WORKLOAD)
        engines = sum(g.count for g in self.cluster_config.groups)
        if engines > max_instances:
            raise ValueError(f"the cluster has {engines} engines but max_instances is {max_instances}")
        self.max_instances, self.reward_kind, self.horizon = max_instances, reward, horizon
        self.spec_features = FeatureSpec(max_instances)
        self.inline_router, self.inline_batch, self.inline_pools = router, batch, pools
        self.render_mode = render_mode
        self.sim: Cluster | None = None
        self._pending: tuple[Any, ...] | None = None

    # -- subclass hooks --------------------------------------------------------------------------------
    def _build(self, requests: list[Request], seed: int) -> Cluster:
        raise NotImplementedError

    def _observe(self) -> np.ndarray:
        raise NotImplementedError

    def action_masks(self) -> np.ndarray:
        raise NotImplementedError

    def _apply(self, action: Any) -> float:
        """Answer the pending decision; returns a penalty for an invalid action (0 otherwise)."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------------------
    # Heuristics keep state (round-robin's turn, local corrections, LENS's refitted models): every cluster
    # an episode or the reference run builds gets its own copy, so episodes do not leak into each other.
    def _router(self):
        return copy.deepcopy(self.inline_router) if self.inline_router is not None else LeastOutstandingRequests()

    def _batch(self):
        return copy.deepcopy(self.inline_batch)

    def _pools(self):
        return copy.deepcopy(self.inline_pools)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        workload_seed = int(options.get("workload_seed", self.np_random.integers(0, 2**31 - 1)))
        sim_seed = int(options.get("sim_seed", self.np_random.integers(0, 2**31 - 1)))
        self.load_factor = float(
            options.get("load_factor", self.np_random.uniform(*self.load_range) if self.load_range else 1.0)
        )
        requests = self._generate(workload_seed)
        self._reference = self._reference_outcomes(workload_seed, sim_seed) if self.reward_kind == "relative" else {}
        self.context = FeatureContext()
        self._pending = None
        self._completed: list[Request] = []
        self._decisions = self._invalid = self._clipped = self._met_total = 0
        self._area_time = 0.0
        self._warm_left, self._draining, self._placed = self.warmup, False, set()
        self.sim = self._build(requests, sim_seed)
        self.sim.finish_listeners.append(self._on_completion)
        self._requests = requests
        self.sim.start(requests)
        self._last_time = 0.0
        self._advance()
        if self._pending is None:
            raise ValueError(
                f"the episode has no decision for the agent: warmup ({self.warmup}) consumed the whole workload "
                f"window ({len(requests)} requests); lower warmup or lengthen the window"
            )
        return self._observe(), self._info()

    def _reference_outcomes(self, workload_seed: int, sim_seed: int) -> dict[int, bool]:
        reference = Cluster(
            self.cluster_config,
            self._router(),
            batch_policy=self._batch(),
            seed=sim_seed,
        )
        result = reference.run(self._generate(workload_seed))
        return {int(row.id): bool(row.slo_met) for row in result.records().itertuples()}

    def _generate(self, workload_seed: int) -> list[Request]:
        requests = self.workload.generate(workload_seed)
        if self.load_factor != 1.0:
            for request in requests:
                request.arrival_s /= self.load_factor
        return requests

    def _advance(self) -> None:
        """Run the simulator until a decision is pending or nothing is left to simulate."""
        self._simulate_while(lambda: self._pending is None)

    def _simulate_while(self, going: Callable[[], bool]) -> None:
        """Step the simulator while ``going()`` holds and events remain, integrating requests in system."""
        env = self.sim.env
        while going() and env.peek() != math.inf:
            before = env.now
            in_system = self.sim.in_system
            env.step()
            self._area_time += in_system * (env.now - before)

    def _inline_turn(self) -> bool:
        """Whether the inline heuristic, not the agent, takes the current decision (warm-up or drain);
        a warm-up decision is used up by asking."""
        if self._draining:
            return True
        if self._warm_left > 0:
            self._warm_left -= 1
            return True
        return False

    def _answer_inline(self) -> None:
        """Answer the pending decision with the inline heuristic (subclasses that support warm-up/drain)."""
        raise NotImplementedError

    def _drain(self) -> None:
        """Simulate until every request the agent placed has finished (the inline heuristic deciding)."""
        self._draining = True
        if self._pending is not None:  # the decision the truncated episode left open: arrivals wait on it
            self._answer_inline()
            self._pending = None
        self._simulate_while(lambda: bool(self._placed))

    def _on_completion(self, request: Request) -> None:
        self._placed.discard(request.id)
        met = request.slo_met
        self._completed.append((request, met))
        self._met_total += met
        self.context.observe_completion(request.output_tokens)

    def _reward(self, clip: float = 10.0) -> float:
        if self.reward_kind == "goodput":
            value = float(sum(met for _, met in self._completed))
        elif self.reward_kind == "latency":
            value = -self._area_time / 10.0
        else:
            value = float(sum(met - self._reference.get(r.id, False) for r, met in self._completed))
        self._completed, self._area_time = [], 0.0
        return float(np.clip(value, -clip, clip))

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        if self._pending is None:
            raise RuntimeError("the episode has ended; call reset()")
        penalty = self._apply(action)
        self._pending = None
        self._decisions += 1
        self._advance()
        terminated = self._pending is None
        truncated = not terminated and self.horizon is not None and self._decisions >= self.horizon
        observation = self._observe() if not terminated else np.zeros(self.observation_space.shape, np.float32)
        if truncated and self.drain:
            self._drain()
        reward = self._reward(clip=math.inf if truncated and self.drain else 10.0) - penalty
        info = self._info()
        if terminated:
            info["summary"] = self.summary()
        return observation, reward, terminated, truncated, info

    def summary(self) -> dict[str, Any]:
        """The simulator's summary of the episode so far (the whole run once terminated)."""
        from envs.sim.metrics import SimResult

        return SimResult(self._requests, self.sim.engines, self.sim.env.now, 0.0).summary()

    def _info(self) -> dict[str, Any]:
        return {
            "sim_time": self.sim.env.now,
            "load_factor": self.load_factor,
            "decisions": self._decisions,
            "completed": len(self.sim.finished),
            "slo_met": self._met_total,
            "invalid_actions": self._invalid,
            "clipped_features": self._clipped,
        }

    # -- helpers for subclasses ------------------------------------------------------------------------
    def _features(self, view: ClusterView, request: RequestInfo, decode_phase: bool = False) -> np.ndarray:
        vector, clipped = self.spec_features.vector(view, request, self.context, decode_phase)
        self._clipped += clipped
        return vector

    def _event(self) -> simpy.Event:
        return self.sim.env.event()
