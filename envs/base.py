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
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from servegym.envs import render
from servegym.envs.branch import Worker, fork_map
from servegym.envs.features import FeatureContext, FeatureSpec, observation_table
from servegym.envs.plugins import policy_object
from servegym.envs.render import RENDER_MODES
from servegym.envs.sim.cluster import Cluster, ClusterConfig, check_buildable
from servegym.envs.sim.config import cluster_from, workload_from
from servegym.envs.sim.metrics import SimResult
from servegym.envs.sim.policies import (
    BatchPolicy,
    Decision,
    DecisionKind,
    EngineView,
    LeastOutstandingRequests,
    Observer,
    PoolPolicy,
    RoutingPolicy,
    StaticPools,
    VllmPolicy,
    check_policy,
    least_outstanding,
)
from servegym.envs.sim.request import Request, State
from servegym.envs.sim.view import ClusterView, RequestInfo
from servegym.envs.sim.workload import scale_load

ROUTING_KINDS = (DecisionKind.ROUTE, DecisionKind.ROUTE_DECODE)
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
    "rate_scale": 8.5,  # half the default scenario's x17 on half its cluster
    "num_requests": 1000,
    "random_window": True,
    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}],
}


class ServeGymEnv(gym.Env):
    """Base class. A subclass names the decision kinds its agent answers (:attr:`decision_kinds`), sets the
    action space and says how an action answers a :class:`Decision` (:meth:`_answer_of`), how it is
    masked (:meth:`_mask`) and observed (:meth:`_observe`); this class runs the simulator to the next
    pending decision, lets the inline heuristics answer warm-up and drain decisions, falls back on an
    invalid action, and computes rewards — the same way for every kind.

    Args:
        cluster: a cluster mapping (as in ``conf/cluster``) or a :class:`ClusterConfig`.
        workload: a workload mapping (as in ``conf/workload``).
        max_instances: engine slots in observations and actions (>= the cluster's engines).
        reward: ``goodput`` (+1 per request finishing within its SLO, on the step it finishes),
            ``latency`` (minus the request-seconds spent in the system since the last decision, / 10), or
            ``relative`` (+1/−1 per finishing request that meets/misses its SLO where the reference heuristic
            on the same arrivals missed/met it). Rewards are not clipped: an episode's return is exactly the
            outcome the reward names (SLO-meeting requests, minus request-seconds / 10, or the difference
            to the reference) minus 1 per masked action; SB3's ``VecNormalize`` scales them for learning.
        horizon: decisions per episode before truncation (None: until the workload is drained).
        horizon_s: simulated seconds of agent control per episode before truncation, counted from the
            agent's first decision (None: no time limit). Batch-v0 decides every engine step (a few ms), so
            its episodes are measured in simulated time: 100 decisions covered 0.1–0.3 s, where nothing
            finishes.
        load_range: ``(low, high)``: every episode compresses the workload's arrival times by a factor
            drawn uniformly from this range (1.2 = 20% more load), so one policy trains across loads rather
            than at the single rate it will not be deployed at. ``None``: the workload as configured.
        warmup: decisions made by the inline heuristic at the start of every episode before the agent takes
            over (the agent then acts in a loaded cluster instead of an empty one).
        warmup_s: simulated seconds during which the inline heuristic decides, before (and in addition to)
            ``warmup`` decisions.
        windows: episodes replay one of this many fixed windows (workload seed, simulator seed and load
            factor drawn once from the environment's seed), so the ``relative`` reward's reference run is
            simulated once per window and cached, not once per reset (None: every reset draws a new window).
        drain: at truncation, keep simulating (the inline heuristic deciding) until every request the agent
            placed (routing), or every request in the system (batching, pools: the agent's steps and flips
            touched them all), has finished, and pay their outcomes in the last step's reward.
            With the ``relative`` reward and ``gamma`` = 1, an episode's return is then exactly how many more
            requests met their SLO than under the reference heuristic because of the agent's ``horizon``
            decisions: the counterfactual credit that per-step rewards, arriving hundreds of decisions
            after the choice that caused them, do not give.
        router / batch / pools: the heuristics of the ``relative`` reward (and the inline decisions the agent
            does not make): policy objects, or a class by import path (``pkg.module:Class``, ``file.py:Class``).
        branches: simulate the warm-up once per *snapshot* and branch this many agent episodes from it
            (None: every reset simulates its own). The snapshot (the state at the agent's first decision)
            stays in this process; each episode runs in a forked worker (:class:`servegym.envs.branch.Worker`,
            Linux fork, no torch in it) that ``step`` drives through a pipe, and the relative reward's
            reference is the inline heuristics' continuation of the snapshot (equal to the run from reset),
            simulated once per snapshot. Episodes of one snapshot share its arrivals and step noise: they
            differ only by the agent's actions. ``reset(seed=...)`` or ``options`` start a new snapshot.
        drain_until: ``finished`` (the drain runs until every request it waits for has finished) or
            ``decided`` (until each has finished or can no longer meet its SLO — its TTFT deadline passed
            without a first token, its TPOT or E2E target already exceeded, or rejected; those are paid as
            misses at once). The agent's requests get the same outcomes either way; requests outside the
            agent's window that would have finished during the longer drain are not paid.
        hard_snapshots: with ``branches``: keep a snapshot whose reference meets every SLO among the next
            ``horizon`` arrivals (the agent's window) only with this probability (snapshots with a
            reference miss are always kept), so training sees more of the windows where routing matters;
            ``info["snapshot_weight"]`` is 1/p for a kept easy snapshot and 1 otherwise (weights that undo
            the sampling), ``snapshot_stats`` counts what was built and kept.
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 4}  # noqa: RUF012 (Gymnasium's convention)
    decision_kinds: tuple[DecisionKind, ...] = ()

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
        horizon_s: float | None = None,
        warmup_s: float = 0.0,
        windows: int | None = None,
        render_mode: str | None = None,
        branches: int | None = None,
        drain_until: str = "finished",
        hard_snapshots: float | None = None,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        if horizon is not None and not _positive_int(horizon):
            raise ValueError(f"horizon must be a positive number of decisions (or None), got {horizon!r}")
        if load_range is not None:
            load_range = (float(load_range[0]), float(load_range[1]))
            if not 0 < load_range[0] <= load_range[1]:
                raise ValueError(f"load_range must be (low, high) with 0 < low <= high, got {load_range}")
        self.load_range = load_range
        self.load_factor = 1.0
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 decisions, got {warmup}")
        if horizon_s is not None and not (isinstance(horizon_s, numbers.Real) and horizon_s > 0):
            raise ValueError(f"horizon_s must be a positive number of simulated seconds (or None), got {horizon_s!r}")
        if not (isinstance(warmup_s, numbers.Real) and warmup_s >= 0):
            raise ValueError(f"warmup_s must be >= 0 simulated seconds, got {warmup_s!r}")
        if windows is not None and not _positive_int(windows):
            raise ValueError(f"windows must be a positive number of episode windows (or None), got {windows!r}")
        if drain and horizon is None and horizon_s is None:
            raise ValueError("drain needs a horizon or horizon_s (it acts when an episode is truncated)")
        self.warmup, self.drain = int(warmup), bool(drain)
        self.horizon_s, self.warmup_s = (float(horizon_s) if horizon_s is not None else None), float(warmup_s)
        self.windows = int(windows) if windows is not None else None
        if branches is not None and not _positive_int(branches):
            raise ValueError(f"branches must be a positive number of episodes per snapshot (or None), got {branches!r}")
        if drain_until not in ("finished", "decided"):
            raise ValueError(f"drain_until must be 'finished' or 'decided', got {drain_until!r}")
        if hard_snapshots is not None:
            if branches is None:
                raise ValueError("hard_snapshots needs branches (it samples the snapshots episodes branch from)")
            if not (isinstance(hard_snapshots, numbers.Real) and 0 < hard_snapshots <= 1):
                raise ValueError(f"hard_snapshots must be a probability in (0, 1], got {hard_snapshots!r}")
        self.branches, self.drain_until = (int(branches) if branches is not None else None), drain_until
        self.hard_snapshots = float(hard_snapshots) if hard_snapshots is not None else None
        self._worker: Worker | None = None
        self._snapshot: tuple[np.ndarray, dict] | None = None
        self._snapshot_left = 0
        self.snapshot_stats = {"built": 0, "kept_hard": 0, "kept_easy": 0, "dropped": 0, "episodes": 0}
        self._window_table: list[tuple[int, int, float]] | None = None
        self._reference_cache: dict[tuple[int, int, float], dict[int, bool]] = {}
        router = policy_object("router", router, RoutingPolicy)  # a user's class by import path, too
        batch, pools = policy_object("batch", batch, BatchPolicy), policy_object("pools", pools, PoolPolicy)
        for name, value, base in (
            ("router", router, RoutingPolicy),
            ("batch", batch, BatchPolicy),
            ("pools", pools, PoolPolicy),
        ):
            if value is not None:
                check_policy(name, value, base)
        self.cluster_config = (
            cluster if isinstance(cluster, ClusterConfig) else cluster_from(cluster or DEFAULT_CLUSTER)
        )
        check_buildable(self.cluster_config)
        self.workload = workload_from(workload or DEFAULT_WORKLOAD)
        self.workload.generate(0)  # a missing trace or an empty window is named now, not inside reset()
        engines = sum(g.count for g in self.cluster_config.groups)
        if engines > max_instances:
            raise ValueError(f"the cluster has {engines} engines but max_instances is {max_instances}")
        self.max_instances, self.reward_kind, self.horizon = max_instances, reward, horizon
        self.spec_features = FeatureSpec(max_instances)
        self.inline_router, self.inline_batch, self.inline_pools = router, batch, pools
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be one of {list(RENDER_MODES)} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.sim: Cluster | None = None
        self._pending: Decision | None = None

    # -- what a subclass says about its actions ----------------------------------------------------------
    def _build(self, requests: list[Request], seed: int) -> Cluster:
        """The episode's cluster, with the agent installed for :attr:`decision_kinds` (see :meth:`_agent`)."""
        raise NotImplementedError

    def _observe(self, decision: Decision) -> np.ndarray:
        raise NotImplementedError

    def _mask(self, decision: Decision | None) -> np.ndarray:
        """Allowed actions for ``decision`` (None: nothing pending, any action is ignored)."""
        raise NotImplementedError

    def _answer_of(self, decision: Decision, action: Any) -> Any:
        """What ``action`` answers to ``decision``, or None if the action is invalid there."""
        raise NotImplementedError

    def action_manifest(self) -> dict[str, Any]:
        """What an action means (``action``, plus what a saved policy needs to decode it), for manifests."""
        raise NotImplementedError

    # -- the inline heuristics (warm-up, drain, the decisions the agent does not make, the reference) ---
    # Heuristics keep state (round-robin's turn, local corrections, LENS's refitted models): every cluster
    # an episode or the reference run builds gets its own copies, taken together so that one object
    # serving two roles (Arrow: router and pool policy) stays one object.
    def _heuristics(self) -> tuple[RoutingPolicy, BatchPolicy, PoolPolicy | None]:
        """Fresh copies of the inline router, batch former and pool policy (None: static pools, no monitor)."""
        router, batch, pools = copy.deepcopy((self.inline_router, self.inline_batch, self.inline_pools))
        return router or LeastOutstandingRequests(), batch or VllmPolicy(), pools

    def _agent(self) -> _Agent:
        """The policy object that turns the simulator's questions of this environment's kinds into decisions."""
        return _Agent(self._ask, self._inline_batch, lambda: self.sim.view())

    def _inline_answer(
        self, kind: DecisionKind, view: ClusterView, request: RequestInfo | None, engine: EngineView | None
    ) -> Any:
        if kind is DecisionKind.ROUTE:
            choice = self._inline_router.route(request, view)
            self.context.observe_route(request, choice, view)
            return choice
        if kind is DecisionKind.ROUTE_DECODE:
            return self._inline_router.route_decode(request, view)
        if kind is DecisionKind.BATCH:
            return self._inline_batch.token_budget(engine)
        return (self._inline_pools or StaticPools()).rebalance(view)

    def _fallback(self, decision: Decision) -> Any:
        """The answer to an invalid action: least outstanding requests for routing, the largest listed budget
        for batching, no flip for pools."""
        if decision.kind is DecisionKind.ROUTE:
            return least_outstanding(decision.view, decision.view.prefill_candidates)
        if decision.kind is DecisionKind.ROUTE_DECODE:
            return least_outstanding(decision.view, decision.view.decode_candidates)
        if decision.kind is DecisionKind.BATCH:
            return self.budgets[-1]
        return []

    def _ask(
        self,
        kind: DecisionKind,
        view: ClusterView,
        request: RequestInfo | None = None,
        engine: EngineView | None = None,
    ) -> Any:
        """The simulator asks: the inline heuristic answers (warm-up, drain) or the question becomes pending."""
        if self._inline_turn():
            return self._inline_answer(kind, view, request, engine)
        self._pending = Decision(kind, view, self.sim.env.event(), request, engine)
        return self._pending.event

    @property
    def decision(self) -> Decision | None:
        """The pending decision, as a heuristic would see it (None once the episode has ended)."""
        if self._worker is not None:
            raise RuntimeError("with branches, the pending decision lives in the episode worker (see action_masks())")
        return self._pending

    def subscribe(self, observer: Observer) -> None:
        """Let ``observer`` follow the current episode's cluster (an expert being imitated, a logger)."""
        if self.sim is None:
            raise RuntimeError("call reset() before subscribe()")
        if self.branches is not None:
            raise RuntimeError("subscribe() is not available with branches: the episode runs in a forked worker")
        self.sim.subscribe(observer)

    def action_masks(self) -> np.ndarray:
        if self._worker is not None:
            return self._worker_mask
        return self._mask(self._pending)

    def render(self) -> str | np.ndarray | None:
        """The state at the pending decision as the router sees it: a per-engine text table (``"ansi"``) or
        a small plot of queues and KV usage (``"rgb_array"``); None without a render mode."""
        if self.render_mode is None:
            return None
        if self._worker is not None:
            return self._worker.call("render")
        if self.sim is None:
            raise RuntimeError("call reset() before render()")
        view = self._pending.view if self._pending is not None else self.sim.view()
        if self.render_mode == "ansi":
            return render.ansi(view, self._pending, self._decisions, self.action_masks())
        return render.rgb_array(view, self._pending, self._decisions)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if self.branches is None:
            return self._reset(seed, options)
        self._close_worker()
        if seed is not None or options or self._snapshot_left <= 0:
            self._snapshot = self._new_snapshot(seed, options)
            self._snapshot_left = self.branches
        self._snapshot_left -= 1
        self.snapshot_stats["episodes"] += 1
        self._worker = Worker(self)
        observation, info = self._snapshot
        self._worker_mask = info["action_mask"]
        return observation.copy(), dict(info)

    def _new_snapshot(self, seed: int | None, options: dict | None) -> tuple[np.ndarray, dict]:
        """Simulate to the agent's first decision (kept here: episodes fork from it) and the reference's
        continuation from it; with ``hard_snapshots``, draw again until a snapshot is kept."""
        while True:
            observation, info = self._reset(seed, options, reference=False)
            seed = None
            self.snapshot_stats["built"] += 1
            if self.reward_kind == "relative" or self.hard_snapshots is not None:
                key = (self._workload_seed, self._sim_seed, self.load_factor)
                if key not in self._reference_cache:
                    if len(self._reference_cache) >= (self.windows or 1):
                        self._reference_cache.pop(next(iter(self._reference_cache)))
                    self._reference_cache[key] = fork_map(lambda _: self._reference_continuation(), [0])[0]
                self._reference = self._reference_cache[key]
            weight = 1.0
            if self.hard_snapshots is not None:
                now = self.sim.env.now
                window = [r for r in self._requests if r.arrival_s >= now][: self.horizon or len(self._requests)]
                if any(not self._reference.get(r.id, False) for r in window):
                    self.snapshot_stats["kept_hard"] += 1
                elif self.np_random.uniform() < self.hard_snapshots:
                    self.snapshot_stats["kept_easy"] += 1
                    weight = 1.0 / self.hard_snapshots
                else:
                    self.snapshot_stats["dropped"] += 1
                    if options:  # a fixed window cannot be drawn again
                        raise ValueError("hard_snapshots dropped the window fixed by options; give no options")
                    continue
            info["snapshot_weight"] = weight
            return observation, info

    def _reference_continuation(self) -> dict[int, bool]:
        """In a branch of the snapshot: the inline heuristics decide everything to the end of the workload;
        which requests meet their SLO (the reference run from reset, without re-simulating its warm-up)."""
        self._draining = True
        pending = self._pending
        pending.answer(self._inline_answer(pending.kind, pending.view, pending.request, pending.engine))
        self._pending = None
        self.sim.env.run()
        return {request.id: request.slo_met for request in self._requests}

    def _close_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def close(self) -> None:
        self._close_worker()
        super().close()

    def _reset(self, seed: int | None, options: dict | None, reference: bool = True) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._window_table = None  # a new seed draws new fixed windows
        options = options or {}
        drawn = self._draw_window()
        workload_seed = int(options.get("workload_seed", drawn[0]))
        sim_seed = int(options.get("sim_seed", drawn[1]))
        self.load_factor = float(options.get("load_factor", drawn[2]))
        requests = self._generate(workload_seed)
        self._workload_seed, self._sim_seed = workload_seed, sim_seed
        relative = self.reward_kind == "relative" and reference
        self._reference = self._reference_outcomes(workload_seed, sim_seed) if relative else {}
        self._paid_early: set[int] = set()
        self.context = FeatureContext()
        self._pending = None
        self._completed: list[tuple[Request, bool]] = []
        self._decisions = self._invalid = self._clipped = self._met_total = 0
        self._invalid_reason: str | None = None
        self._warned_malformed = False
        self._area_time = 0.0
        self._warm_left, self._draining, self._placed = self.warmup, False, set()
        self._agent_start: float | None = None
        self._inline_router, self._inline_batch, self._inline_pools = self._heuristics()
        self.sim = self._build(requests, sim_seed)
        self.sim.subscribe(_EpisodeLedger(self._on_completion))
        for heuristic in (self._inline_router, self._inline_batch, self._inline_pools):
            if heuristic is not None:
                self.sim.subscribe(heuristic)  # what the inline decisions know (output means, refits)
        self._requests = requests
        self.sim.start(requests)
        self._last_time = 0.0
        self._advance()
        if self._pending is None:
            raise ValueError(
                f"the episode has no decision for the agent: warmup ({self.warmup}) consumed the whole workload "
                f"window ({len(requests)} requests); lower warmup or lengthen the window"
            )
        return self._observe(self._pending), self._info()

    def _draw_window(self) -> tuple[int, int, float]:
        """The episode's (workload seed, simulator seed, load factor): a fresh draw, or one of the fixed
        ``windows`` drawn once from the environment's seed."""

        def draw() -> tuple[int, int, float]:
            return (
                int(self.np_random.integers(0, 2**31 - 1)),
                int(self.np_random.integers(0, 2**31 - 1)),
                float(self.np_random.uniform(*self.load_range)) if self.load_range else 1.0,
            )

        if self.windows is None:
            return draw()
        if self._window_table is None:
            self._window_table = [draw() for _ in range(self.windows)]
        return self._window_table[int(self.np_random.integers(0, self.windows))]

    def _reference_outcomes(self, workload_seed: int, sim_seed: int) -> dict[int, bool]:
        """Which requests meet their SLO when the inline heuristics make every decision (router, batch
        former and pool policy alike) on the same arrivals and simulator seed; simulated once per window
        (the cache holds the ``windows`` fixed ones, or the last window when every reset draws anew)."""
        key = (workload_seed, sim_seed, self.load_factor)
        if key not in self._reference_cache:
            router, batch, pools = self._heuristics()
            reference = Cluster(self.cluster_config, router, batch_policy=batch, seed=sim_seed, pool_policy=pools)
            requests = self._generate(workload_seed)
            reference.run(requests)
            if len(self._reference_cache) >= (self.windows or 1):
                self._reference_cache.pop(next(iter(self._reference_cache)))
            self._reference_cache[key] = {request.id: request.slo_met for request in requests}
        return self._reference_cache[key]

    def _generate(self, workload_seed: int) -> list[Request]:
        return scale_load(self.workload, self.load_factor).generate(workload_seed)

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
        if self.sim.env.now < self.warmup_s:
            return True
        if self._warm_left > 0:
            self._warm_left -= 1
            return True
        if self._agent_start is None:
            self._agent_start = self.sim.env.now
        return False

    def _drain(self) -> None:
        """Simulate until every request the agent placed (routing) or every request in the system (other
        kinds: the agent's budgets and flips touched them all) has finished, the inline heuristic deciding."""
        self._draining = True
        if not set(self.decision_kinds) & set(ROUTING_KINDS):
            now, ended = self.sim.env.now, (State.FINISHED, State.REJECTED)
            self._placed = {r.id for r in self._requests if r.arrival_s <= now and r.state not in ended}
        pending = self._pending
        if pending is not None:  # the decision the truncated episode left open: arrivals wait on it
            pending.answer(self._inline_answer(pending.kind, pending.view, pending.request, pending.engine))
            self._pending = None
        if self.drain_until == "finished":
            self._simulate_while(lambda: bool(self._placed))
            return
        waiting = {r.id: r for r in self._requests if r.id in self._placed}
        ticks = 0

        def going() -> bool:
            nonlocal ticks
            ticks += 1
            if ticks % 64 == 0:
                self._pay_decided(waiting)
            return bool(self._placed)

        self._pay_decided(waiting)
        self._simulate_while(going)

    def _pay_decided(self, waiting: dict[int, Request]) -> None:
        """Pay as misses the drained requests that can no longer meet their SLO (``drain_until="decided"``)."""
        now = self.sim.env.now
        for rid in [rid for rid in self._placed if _surely_missed(waiting[rid], now)]:
            self._placed.discard(rid)
            self._paid_early.add(rid)
            self._completed.append((waiting[rid], False))

    def _on_completion(self, request: Request) -> None:
        if self._paid_early and request.id in self._paid_early:
            return
        self._placed.discard(request.id)
        met = request.slo_met
        self._completed.append((request, met))
        self._met_total += met
        self.context.observe_completion(request.output_tokens)

    def _reward(self) -> float:
        """What happened since the previous step, unclipped, so that the rewards of an episode sum to its
        outcome (a clip at ±10 used to eat most of a Pools-v0 interval's and every drain's signal)."""
        if self.reward_kind == "goodput":
            value = float(sum(met for _, met in self._completed))
        elif self.reward_kind == "latency":
            value = -self._area_time / 10.0
        else:
            value = float(sum(met - self._reference.get(r.id, False) for r, met in self._completed))
        self._completed, self._area_time = [], 0.0
        return value

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._worker is not None:
            outcome = self._worker.call("step", action)
            self._worker_mask = outcome[4]["action_mask"]
            outcome[4]["snapshot_weight"] = self._snapshot[1]["snapshot_weight"]
            return outcome
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        if self._pending is None:
            raise RuntimeError("the episode has ended; call reset()")
        self._invalid_reason = None
        penalty = self._apply(self._pending, action)
        self._pending = None
        self._decisions += 1
        self._advance()
        terminated = self._pending is None
        truncated = not terminated and (
            (self.horizon is not None and self._decisions >= self.horizon)
            or (self.horizon_s is not None and self.sim.env.now - self._agent_start >= self.horizon_s)
        )
        observation = (
            self._observe(self._pending) if not terminated else np.zeros(self.observation_space.shape, np.float32)
        )
        if truncated and self.drain:
            self._drain()
        reward = self._reward() - penalty
        info = self._info()
        if terminated:
            info["summary"] = self.summary()
        return observation, reward, terminated, truncated, info

    def _apply(self, decision: Decision, action: Any) -> float:
        """Answer ``decision`` with ``action``; an invalid action — masked here, or no action of the space at
        all (NaN, None, 2.7, out of range) — gets the fallback and a penalty of 1, counted and explained in
        ``info``; the first value that is no action at all also warns (it is usually a caller's bug)."""
        try:
            answer = self._answer_of(decision, action)
            why = f"action {action!r} is masked for this {decision.kind} decision"
        except InvalidAction as error:
            answer, why = None, str(error)
            if not self._warned_malformed:
                self._warned_malformed = True
                warnings.warn(f"{why}; taking the fallback (counted in info['invalid_actions'])", stacklevel=3)
        penalty = 0.0
        if answer is None:
            answer, penalty = self._fallback(decision), 1.0
            self._invalid += 1
            self._invalid_reason = f"{why}: the fallback {answer!r} was taken and the step's reward reduced by 1"
        if decision.kind is DecisionKind.ROUTE:
            self.context.observe_route(decision.request, answer, decision.view)
            self._placed.add(decision.request.id)
        decision.answer(answer)
        return penalty

    # -- branching: continuations of the current state in forked children (envs/branch.py) ---------------
    def branch(
        self,
        fn: Callable[[ServeGymEnv, Any], Any],
        items: Sequence[Any],
        jobs: int | None = None,
        reseed: int | None = None,
        resample_lengths: bool = False,
    ) -> list[Any]:
        """``[fn(env, item) for item in items]``, each call on a copy of this environment as it is now, in a
        forked child (:func:`servegym.envs.branch.fork_map`: no torch in ``fn``, Linux fork only); this
        environment is unchanged. ``fn`` may step the copy, answer its pending decision, simulate on; its
        result must pickle. Every branch has the same random numbers (step noise, the workload's future
        arrivals), so branches differ only by what ``fn`` does, unless ``reseed`` is given: then every
        branch draws its step noise from ``default_rng([reseed, engine])`` instead — one *sampled* future,
        shared by all branches, other than the true one — and with ``resample_lengths`` the requests that
        have not arrived yet swap their (prompt, output, prefix, session) at random among themselves
        (the arrival times stay: the marginal length distribution is the workload's own)."""
        if self.sim is None:
            raise RuntimeError("call reset() before branch()")

        def run(item: Any) -> Any:
            if reseed is not None:
                self._resample_future(int(reseed), resample_lengths)
            return fn(self, item)

        return fork_map(run, items, jobs=jobs)

    def _resample_future(self, seed: int, lengths: bool) -> None:
        """In a branch: step noise from ``seed``, and optionally the future arrivals' lengths permuted."""
        for engine in self.sim.engines:
            engine.rng = np.random.default_rng([seed, engine.index])
        if lengths:
            now = self.sim.env.now
            future = [r for r in self._requests if r.state is State.PENDING and r.arrival_s > now]
            rng = np.random.default_rng([seed, 1 << 20])
            drawn = [(r.prompt_tokens, r.output_tokens, r.hash_ids, r.session_id) for r in future]
            for request, index in zip(future, rng.permutation(len(future)), strict=True):
                request.prompt_tokens, request.output_tokens, request.hash_ids, request.session_id = drawn[index]

    def rollout_values(
        self,
        actions: Sequence[int] | None = None,
        decisions: int | None = None,
        jobs: int | None = None,
        reseed: int | None = None,
        resample_lengths: bool = False,
    ) -> RolloutValues:
        """The value of each action at the pending decision, by simulation: in a forked child per action,
        answer the decision with it, let the inline router (``router=``, e.g. PRISM) make every later
        decision for ``decisions`` more decisions (None: until the episode would truncate, at ``horizon``
        decisions or ``horizon_s``; without either, to the end of the workload), then simulate on until
        every counted request has finished. The value is the number of counted requests that meet their
        SLO; counted are the requests unfinished at the branch point (the pending one included) and those
        arriving before the continuation ended — the same set in every branch, so differences between
        actions are their effects on one shared future (``reseed``/``resample_lengths``: a sampled one, see
        :meth:`branch`). This environment does not step (its state is unchanged).

        Returns a dict action → value (default actions: every unmasked one; a masked action is answered
        with the fallback, as ``step`` would) with ``.base_action`` (what the inline router would choose)
        and ``.base_value`` (its value), so an advantage is ``values[a] - values.base_value``."""
        if self._worker is not None:
            return self._worker.call("rollout_values", actions, decisions, jobs, reseed, resample_lengths)
        if self._pending is None:
            raise RuntimeError("no pending decision to branch (call reset(), or the episode has ended)")
        if actions is None:
            actions = [int(a) for a in np.flatnonzero(self._mask(self._pending))]
        actions = list(dict.fromkeys(actions))
        if decisions is not None and (not isinstance(decisions, numbers.Integral) or decisions < 0):
            raise ValueError(f"decisions must be a number of decisions >= 0 (or None), got {decisions!r}")

        def value(env: ServeGymEnv, action: Any) -> tuple[Any, float]:
            return env._continuation(action, decisions)

        outcomes = self.branch(value, [_BASE_ACTION, *actions], jobs, reseed, resample_lengths)
        base_action = outcomes[0][0]
        values = RolloutValues({action: outcome[1] for action, outcome in zip(actions, outcomes[1:], strict=True)})
        values.base_action = base_action
        if base_action in values:
            values.base_value = values[base_action]
        else:
            values.base_value = self.branch(value, [base_action], jobs, reseed, resample_lengths)[0][1]
        return values

    def inline_action(self, advance: bool = False) -> Any:
        """What the inline router (``router=``) would answer at the pending decision. ``advance=False``:
        computed in a branch, so that its state (session affinities, local corrections) does not move here;
        ``True``: asked here, its state moving as when it decides inline (then ``step`` with the answer, or
        another action, to stay the base policy's trajectory). The environment does not step."""
        if self._worker is not None:
            return self._worker.call("inline_action", advance)
        pending = self._pending
        if pending is None:
            raise RuntimeError("no pending decision (call reset(), or the episode has ended)")
        if advance:
            if pending.kind is DecisionKind.ROUTE:
                return self._inline_router.route(pending.request, pending.view)
            return self._inline_answer(pending.kind, pending.view, pending.request, pending.engine)
        return self.branch(lambda env, _: env._continuation(_BASE_ACTION, None)[0], [0])[0]

    def rollout_value_of_base(
        self, decisions: int | None = None, reseed: int | None = None, resample_lengths: bool = False
    ) -> tuple[Any, float]:
        """(the inline router's action at the pending decision, its rollout value) — see :meth:`rollout_values`."""
        values = self.rollout_values(actions=[], decisions=decisions, reseed=reseed, resample_lengths=resample_lengths)
        return values.base_action, values.base_value

    def _continuation(self, action: Any, decisions: int | None) -> tuple[Any, float]:
        """In a branch: answer the pending decision with ``action`` (``_BASE_ACTION``: the inline router's
        answer, which is then only returned, with no value), continue under the inline heuristics, drain
        the counted requests; (the answer given, their SLO-meeting count)."""
        pending, ended = self._pending, (State.FINISHED, State.REJECTED)
        if action is _BASE_ACTION:
            return self._inline_answer(pending.kind, pending.view, pending.request, pending.engine), math.nan
        start = self.sim.env.now
        counted = [r for r in self._requests if r.arrival_s <= start and r.state not in ended]
        self._apply(pending, action)
        self._pending = None
        self._draining = True  # every later question is answered inline
        if decisions is None:
            left = self.horizon - self._decisions - 1 if self.horizon is not None else math.inf
            deadline = self._agent_start + self.horizon_s if self.horizon_s is not None else math.inf
        else:
            left, deadline = decisions, math.inf
        asked, end = 0, [math.inf]
        inline = self._inline_answer

        def counting(kind, view, request, engine):  # the questions the agent would have been asked
            nonlocal asked
            if end[0] == math.inf:
                if asked >= left or view.now_s >= deadline:
                    end[0] = view.now_s  # where step() would have truncated
                asked += 1
            return inline(kind, view, request, engine)

        self._inline_answer = counting
        self._simulate_while(lambda: end[0] == math.inf)
        counted += [r for r in self._requests if start < r.arrival_s < end[0]]
        self._placed = {r.id for r in counted if r.state not in ended}
        ticks = 0

        def going() -> bool:  # until every counted request has finished or can no longer meet its SLO
            nonlocal ticks
            ticks += 1
            if ticks % 64 == 0:
                now = self.sim.env.now
                self._placed = {r.id for r in counted if r.state is not State.FINISHED and not _surely_missed(r, now)}
            return bool(self._placed)

        self._simulate_while(going)
        if isinstance(action, np.generic):
            action = action.item()
        return action, float(sum(r.slo_met for r in counted))

    def summary(self) -> dict[str, Any]:
        """The simulator's summary of the episode so far (the whole run once terminated)."""
        if self._worker is not None:
            return self._worker.call("summary")
        return SimResult(self._requests, self.sim.engines, self.sim.env.now, 0.0).summary()

    def _info(self) -> dict[str, Any]:
        return {
            "sim_time": self.sim.env.now,
            "load_factor": self.load_factor,
            "decisions": self._decisions,
            "completed": self.sim.completed,
            "slo_met": self._met_total,
            "invalid_actions": self._invalid,
            "invalid_reason": self._invalid_reason,
            "clipped_features": self._clipped,
            "action_mask": self.action_masks(),  # the same as action_masks(), for agents that read info
        }

    # -- helpers for subclasses ------------------------------------------------------------------------
    def _features(self, view: ClusterView, request: RequestInfo, decode_phase: bool = False) -> np.ndarray:
        vector, clipped = self.spec_features.vector(view, request, self.context, decode_phase)
        self._clipped += clipped
        return vector


_BASE_ACTION = "<the inline router's action>"


class RolloutValues(dict):
    """:meth:`ServeGymEnv.rollout_values`' answer: action → value, plus ``base_action`` (the inline router's
    choice at the decision) and ``base_value`` (its value)."""

    base_action: Any = None
    base_value: float = math.nan

    def advantages(self) -> dict[Any, float]:
        """``values[a] - base_value`` for every action."""
        return {action: value - self.base_value for action, value in self.items()}


def _surely_missed(request: Request, now: float) -> bool:
    """Whether ``request`` (not finished) can no longer meet its SLO at ``now``."""
    if request.state is State.REJECTED:
        return True
    if request.state is State.FINISHED:
        return False
    slo = request.slo
    if slo.e2e_s is not None and now - request.arrival_s > slo.e2e_s:
        return True
    if math.isnan(request.first_token_s):
        return slo.ttft_s is not None and now - request.arrival_s > slo.ttft_s
    return slo.tpot_s is not None and now - request.first_token_s > slo.tpot_s * max(request.output_tokens - 1, 0)


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


class InvalidAction(ValueError):
    """A value that is no action of the environment's space; the message names the environment, the space
    and the value. ``step`` answers it with the fallback and counts it (never a crash, never a truncation)."""


def action_index(action: Any, env: str, space: gym.spaces.Discrete) -> int:
    """A discrete action as an int: an integer, or an integer-valued number or one-element array, inside
    ``space``. Anything else (NaN, inf, None, a string, 2.7, a value outside the space, an array of several
    values) raises :class:`InvalidAction` naming the environment, its action space and the value, never a
    truncation (2.7 is not action 2)."""
    value = action
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise InvalidAction(f"{env}: expected one discrete action of {space}, got {action!r} (shape {value.shape})")
        value = value.reshape(-1)[0]
    integral = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not integral and (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or float(value) != int(value)
    ):
        raise InvalidAction(f"{env}: the action must be an integer of {space}, got {action!r}")
    index = int(value)
    if not space.contains(index):
        raise InvalidAction(f"{env}: the action {action!r} is outside the action space {space}")
    return index


def continuous_action(action: Any, env: str, space: gym.spaces.Box) -> np.ndarray:
    """A continuous action as a float array of ``space``'s shape, inside its bounds; NaN, inf, None, strings,
    other shapes and values outside the bounds raise :class:`InvalidAction` naming the environment, the
    space and the value (SB3 clips its Gaussian actions to the bounds before ``step``, so none of these is
    an agent's decision)."""
    raw = np.asarray(action, dtype=object if action is None else None)
    if raw.dtype.kind not in "fiu" or raw.size != int(np.prod(space.shape)):
        raise InvalidAction(f"{env}: the action must be a number array of {space}, got {action!r}")
    value = raw.astype(np.float64)
    value = value.reshape(space.shape)
    if not np.all(np.isfinite(value)):
        raise InvalidAction(f"{env}: the action must be finite, got {action!r} for {space}")
    if np.any(value < space.low) or np.any(value > space.high):
        raise InvalidAction(f"{env}: the action {action!r} is outside the action space {space}")
    return value


class _EpisodeLedger(Observer):
    """The environment's own listener: every finished request goes to its rewards."""

    def __init__(self, record: Callable[[Request], None]) -> None:
        self._record = record

    def on_finish(self, request: Request) -> None:
        self._record(request)


class _Agent(RoutingPolicy, BatchPolicy, PoolPolicy):
    """Installed in the cluster for the environment's decision kinds: each question becomes a call of the
    environment's ``ask`` (a pending decision for the agent, or an inline answer during warm-up/drain).

    As a batch policy it is the configured batch former with the budget left to the agent: its chunk
    cap, prefill order, admission veto and preemption choice are the inline policy's.
    """

    name = "agent"
    supports_decode_jumps = False  # every step is a decision

    def __init__(self, ask: Callable[..., Any], batch: BatchPolicy, view: Callable[[], ClusterView]) -> None:
        self._ask, self._batch, self._view = ask, batch, view
        self.max_chunk_tokens, self.prefill_order = batch.max_chunk_tokens, batch.prefill_order

    def route(self, request: RequestInfo, view: ClusterView) -> Any:
        return self._ask(DecisionKind.ROUTE, view, request=request)

    def route_decode(self, request: RequestInfo, view: ClusterView) -> Any:
        return self._ask(DecisionKind.ROUTE_DECODE, view, request=request)

    def rebalance(self, view: ClusterView) -> Any:
        return self._ask(DecisionKind.POOLS, view)

    def attach(self, engine: EngineView) -> None:
        self._batch.attach(engine)

    def request_budget(self, engine: EngineView) -> Any:
        return self._ask(DecisionKind.BATCH, self._view(), engine=engine)

    def admit(self, engine: EngineView, request: Request, blocks: int) -> bool:
        return self._batch.admit(engine, request, blocks)

    def choose_victim(self, engine: EngineView) -> Request:
        return self._batch.choose_victim(engine)


_SPEC_SHEET_COMMON = """## Rewards
``goodput`` (+1 per request finishing within its SLO), ``latency`` (−request-seconds / 10) or
``relative`` (+1/−1 per request meeting/missing its SLO where the reference heuristics on the same
arrivals missed/met it); −1 per invalid action. Not clipped: a return is exactly that outcome.

## Episode end
Terminated when the workload is exhausted and drained; truncated after ``horizon`` decisions or
``horizon_s`` simulated seconds of agent control (with ``drain``, {drained} simulated to the end
first and paid in the last step).

## Arguments
See :class:`servegym.envs.base.ServeGymEnv`: ``cluster``, ``workload``, ``max_instances``, ``reward``,
``horizon``, ``horizon_s``, ``load_range``, ``warmup``, ``warmup_s``, ``windows``, ``drain``, ``router``
/ ``batch`` / ``pools`` (the inline and reference heuristics), ``render_mode`` (``"ansi"``,
``"rgb_array"``){arguments}."""


def fill_spec_sheet(
    env_class: type, drained: str, arguments: str = "", extra_rows: tuple[tuple[str, str, str], ...] = ()
) -> None:
    """Complete an environment's spec-sheet docstring: its ``{table}`` (the contract's observation table,
    plus ``extra_rows``) and ``{common}`` (rewards, episode end — ``drained`` says what a drain finishes —
    and the arguments every environment takes, plus its own ``arguments``)."""
    common = _SPEC_SHEET_COMMON.format(drained=drained, arguments=f"; {arguments}" if arguments else "")
    env_class.__doc__ = env_class.__doc__.replace("{table}", observation_table(extra_rows).replace("\n", "\n    "))
    env_class.__doc__ = env_class.__doc__.replace("{common}", common.replace("\n", "\n    "))
