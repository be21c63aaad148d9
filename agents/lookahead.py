"""One-step lookahead over a base router, by branching the simulation (``ServeGymEnv.rollout_values``),
and the oracle headroom it measures.

At a decision the lookahead evaluates each candidate engine by simulating the base router afterwards
(to the end of the counterfactual window, then the drain) and takes the best (ties: the base router's
own choice). On the *true* future (the same arrivals and step noise the episode will see) that is an
upper bound on what any router that decides one request at a time, knowing only the present, could
gain over the base; on *sampled* futures (step noise reseeded, the lengths of the requests that have
not arrived yet shuffled among them) it is what a deployable lookahead might get.

Children run only the simulator and the base heuristic (no torch: see ``servegym.envs.branch``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from servegym.agents.configs import named_configs
from servegym.agents.harness import confidence_interval, load_policy
from servegym.envs.route_env import RouteEnv
from servegym.envs.scenarios import Scenario, ScenarioError
from servegym.envs.sim.request import State

MODES = ("base", "true", "sampled")


@dataclass
class WindowOutcome:
    """One policy on one counterfactual window: SLO-meeting requests among those counted."""

    met: int
    counted: int
    changed: int = 0  # decisions where the lookahead overrode the base router
    looked: int = 0  # decisions evaluated by rollouts
    wall_s: float = 0.0

    @property
    def attainment(self) -> float:
        return self.met / self.counted if self.counted else math.nan


@dataclass
class Headroom:
    """Per-seed outcomes of the base policy and each lookahead, and their paired differences."""

    seeds: list[int]
    outcomes: dict[str, list[WindowOutcome]] = field(default_factory=dict)

    def attainment(self, mode: str) -> tuple[float, float]:
        """Mean SLO attainment over seeds and its 95% half-width."""
        return confidence_interval([o.attainment for o in self.outcomes[mode]])

    def gain(self, mode: str) -> tuple[float, float]:
        """Paired difference in attainment to the base, mean and 95% half-width."""
        return confidence_interval(
            [o.attainment - b.attainment for o, b in zip(self.outcomes[mode], self.outcomes["base"], strict=True)]
        )

    def gain_requests(self, mode: str) -> tuple[float, float]:
        """Paired difference in SLO-meeting requests per window."""
        return confidence_interval(
            [o.met - b.met for o, b in zip(self.outcomes[mode], self.outcomes["base"], strict=True)]
        )

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for mode, outcomes in self.outcomes.items():
            mean, half = self.attainment(mode)
            row = {"policy": mode, "attainment": mean, "ci": half, "met": float(np.mean([o.met for o in outcomes]))}
            row["counted"] = float(np.mean([o.counted for o in outcomes]))
            row["changed"] = float(np.mean([o.changed for o in outcomes]))
            row["wall_s"] = float(np.sum([o.wall_s for o in outcomes]))
            if mode != "base":
                row["gain"], row["gain_ci"] = self.gain(mode)
                row["gain_requests"], row["gain_requests_ci"] = self.gain_requests(mode)
            rows.append(row)
        return rows


def run_window(
    env: RouteEnv,
    seed: int,
    load_factor: float,
    mode: str = "base",
    every: int = 1,
    samples: int = 1,
    jobs: int | None = None,
) -> WindowOutcome:
    """One episode of ``env`` (its inline router = the base policy) on window ``seed``: the base router's
    own choices (``base``), or a one-step lookahead at every ``every``-th decision over the true future
    (``true``) or over ``samples`` sampled futures (``sampled``, values averaged). Counted: the requests
    that arrived before the window's truncation, simulated to the end."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    started = time.perf_counter()
    env.reset(options={"workload_seed": seed, "sim_seed": seed, "load_factor": load_factor})
    changed = looked = step = 0
    truncated = terminated = False
    end = math.inf
    while not (truncated or terminated):
        scores = None
        if mode != "base" and step % every == 0:
            scores = _scores(env, mode, samples, jobs, salt=seed * 100_003 + step)
            looked += 1
        action = base = env.inline_action(advance=True)  # the base router's state moves as in its own run
        if scores is not None and scores.get(base, -math.inf) < max(scores.values()):
            action = max(scores, key=lambda a: (scores[a], -a))
            changed += 1
        end = env.sim.env.now
        _, _, terminated, truncated, _ = env.step(action)
        step += 1
    env.sim.env.run()  # everything to the end: the counted requests' outcomes
    counted = [r for r in env._requests if r.arrival_s <= end and r.state in (State.FINISHED, State.REJECTED)]
    met = sum(r.slo_met for r in counted)
    return WindowOutcome(met, len(counted), changed, looked, time.perf_counter() - started)


def _scores(env: RouteEnv, mode: str, samples: int, jobs: int | None, salt: int) -> dict[int, float]:
    """Every allowed engine's rollout value: on the true future, or averaged over sampled ones."""
    if mode == "true":
        return dict(env.rollout_values(jobs=jobs))
    scores: dict[int, float] = {}
    for k in range(samples):
        values = env.rollout_values(jobs=jobs, reseed=salt * 31 + k, resample_lengths=True)
        for action, value in values.items():
            scores[action] = scores.get(action, 0.0) + value / samples
    return scores


def headroom(
    cluster: Mapping[str, Any],
    workload: Mapping[str, Any],
    policy: Mapping[str, Any],
    load_factor: float,
    seeds: Sequence[int],
    warmup: int = 400,
    horizon: int = 64,
    num_requests: int = 1000,
    every: int = 1,
    samples: int = 1,
    modes: Sequence[str] = MODES,
    jobs: int | None = None,
    max_instances: int = 8,
    progress: bool = False,
) -> Headroom:
    """The base policy's SLO attainment on counterfactual windows (``warmup`` decisions by the base, then
    ``horizon`` decisions, ``num_requests``-request windows of ``workload`` at ``load_factor``: random
    windows of a trace),
    and the true- and sampled-future lookaheads over it, on the same windows (``seeds``: workload and
    simulator seeds). ``policy``: a ``conf/policy`` mapping (its router is the base)."""
    workload = dict(workload, num_requests=num_requests)
    if workload.get("kind") == "trace":
        workload["random_window"] = True  # the window seed picks where in the trace
    bundle = load_policy(policy)
    env = RouteEnv(
        cluster=dict(cluster),
        workload=workload,
        max_instances=max_instances,
        router=bundle.router,
        batch=bundle.batch,
        pools=bundle.pools,
        warmup=warmup,
        horizon=horizon,
        drain=True,
    )
    result = Headroom(list(seeds), {mode: [] for mode in modes if mode != "base"})
    result.outcomes = {"base": [], **result.outcomes}
    for seed in seeds:
        for mode in result.outcomes:
            outcome = run_window(env, seed, load_factor, mode, every, samples, jobs)
            result.outcomes[mode].append(outcome)
            if progress:
                print(
                    f"  seed {seed} {mode:>7}: {outcome.met}/{outcome.counted} met, "
                    f"{outcome.changed}/{outcome.looked} changed, {outcome.wall_s:.1f} s",
                    flush=True,
                )
    env.close()
    return result


def routing_reference(scenario: Scenario) -> str:
    """The conf/policy name of the heuristic a scenario's routing is measured against."""
    if "route" not in scenario.decisions:
        raise ScenarioError(f"scenario {scenario.name!r} poses no routing decisions")
    return scenario.decisions["route"].reference


def scenario_headroom(
    scenario: Scenario,
    load_factor: float,
    seeds: Sequence[int],
    num_requests: int = 1000,
    policy: str | None = None,
    **kwargs: Any,
) -> Headroom:
    """:func:`headroom` over ``policy`` (a conf/policy name; None: the scenario's routing reference — the
    issue's bound is over the *best* heuristic, which on a scenario may be another) on its cluster and
    windows of its workload (its SLO classes included), with an engine slot for every instance; ``kwargs``
    go to :func:`headroom`."""
    reference = routing_reference(scenario) if policy is None else policy
    return headroom(
        scenario.cluster,
        scenario.window(num_requests),
        named_configs("policy", [reference])[reference],
        load_factor,
        seeds,
        num_requests=num_requests,
        max_instances=max(8, sum(int(g["count"]) for g in scenario.cluster["groups"])),
        **kwargs,
    )
