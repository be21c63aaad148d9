"""Evolution strategies on the residual router's bilinear bonus: search the policy on whole windows.

PPO and rollout distillation both judge one decision at a time, against PRISM continuing. Some of what a
router can win needs many decisions to agree — on multi-slo, keeping the H100s' batches small for the
requests with a 30 ms TPOT target only pays once most such requests go there and most of the loose ones go
elsewhere; a single deviation moves about 0.2 requests (docs/training.md). Evolution strategies (Salimans et
al., 2017) score whole policies instead: each candidate bonus ``W`` routes whole training windows, its fitness
is their mean SLO attainment, and ``W`` follows the antithetic, rank-normalised estimate of the fitness
gradient. All candidates of a generation run on the same windows (common random numbers: arrivals and step
noise), each generation on fresh ones; 21 × 7 weights keep the search small enough for a few hundred
windows.
The bonus reads its inputs centred, scaled and clipped
(:meth:`servegym.agents.residual_policy.ResidualFeatures.set_bonus_gains`), so one ``sigma`` fits every weight —
ES, like any finite-difference search, is not invariant to the parameters' scales (OpenAI-ES normalises its
observations for the same reason) — and weights whose features never differ between engines (``active``)
are not searched.

Candidates route with :class:`BonusRouter` — the residual policy's greedy decision, the same float32 logits
(:meth:`servegym.agents.residual_policy.ResidualFeatures.bilinear_logits`) without stable-baselines3's per-call
overhead — built from a plain config, so the harness's worker processes can run them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from servegym.agents.harness import Task, run_tasks
from servegym.agents.learned import FeatureRouter
from servegym.agents.residual_policy import ResidualFeatures
from servegym.envs.features import FeatureSpec


class BonusRouter(FeatureRouter):
    """PRISM's score from the observation contract plus ``engine · W · [request, 1]``, greedy over the
    candidates: what the residual policy with ``residual="bilinear"`` and this ``W`` decides."""

    def __init__(
        self,
        bilinear: list[list[float]],
        max_instances: int = 8,
        slo_tpot_s: float = 0.1,
        weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        temperature: float = 0.05,
        engine_gain: list[float] | None = None,
        request_gain: list[float] | None = None,
        request_offset: list[float] | None = None,
        bonus_clip: float = 3.0,
        bonus_features: list[str] | None = None,
    ) -> None:
        spec = FeatureSpec(max_instances)
        super().__init__(spec.manifest(), "an evolution candidate")
        torch.set_num_threads(1)  # one decision's tensors are tiny: threads only contend
        space = spaces.Box(spec.low, spec.high, dtype=np.float32)
        self.features = ResidualFeatures(
            space,
            slo_tpot_s=slo_tpot_s,
            weights=tuple(weights),
            temperature=temperature,
            residual="bilinear",
            bonus_clip=bonus_clip,
            bonus_features=bonus_features,
        )
        with torch.no_grad():
            self.features.bilinear.copy_(torch.tensor(bilinear, dtype=torch.float64))
            for name, value in (
                ("engine_gain", engine_gain),
                ("request_gain", request_gain),
                ("request_offset", request_offset),
            ):
                if value is not None:
                    getattr(self.features, name).copy_(torch.tensor(value, dtype=torch.float64))

    def act(self, observation: np.ndarray, mask: np.ndarray) -> int:
        with torch.no_grad():
            logits = self.features.bilinear_logits(torch.as_tensor(observation[None]))[0].numpy()
        return int(np.argmax(np.where(mask, logits, -np.inf)))


def candidate_spec(bilinear: np.ndarray, base: Mapping[str, Any], max_instances: int) -> dict[str, Any]:
    """A policy config (the harness's format) whose router is :class:`BonusRouter` with ``bilinear``; ``base``
    holds the residual features' other arguments and, optionally, their input gains and offset."""
    keys = (
        "slo_tpot_s",
        "weights",
        "temperature",
        "bonus_clip",
        "bonus_features",
        "engine_gain",
        "request_gain",
        "request_offset",
    )
    router = {
        "_target_": "servegym.agents.evolution.BonusRouter",
        "bilinear": np.asarray(bilinear, dtype=float).tolist(),
        "max_instances": int(max_instances),
        **{k: base[k] for k in keys if k in base},
    }
    return {"name": "candidate", "router": router, "batch": {"_target_": "servegym.envs.sim.policies.VllmPolicy"}}


def centered_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [−0.5, 0.5] (ties share their mean rank): the update ignores fitness outliers."""
    order = np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(float)
    for value in np.unique(values):  # ties: the mean of their ranks, so equal fitness pulls nowhere
        same = values == value
        order[same] = order[same].mean()
    return order / max(len(values) - 1, 1) - 0.5


@dataclass
class Evolution:
    """OpenAI-ES with antithetic pairs, centred ranks and Adam on the flat ``W``; weights outside ``active``
    (a boolean mask of ``shape``; None: all) are neither perturbed nor moved, and draw no random numbers (a
    feature added to the contract, or left out of ``bonus_features``, leaves the search of the others as it was)."""

    shape: tuple[int, int]
    pairs: int = 8
    sigma: float = 0.5
    learning_rate: float = 0.1
    seed: int = 0
    active: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def run(
        self, fitness: Callable[[list[np.ndarray], int], np.ndarray], generations: int, start: np.ndarray | None = None
    ) -> np.ndarray:
        """``generations`` updates from ``start`` (zero: PRISM). ``fitness(candidates, generation)`` returns
        one number per candidate (higher is better); the last candidate of each call is the current ``W``."""
        rng = np.random.default_rng(self.seed)
        theta = np.zeros(self.shape).ravel() if start is None else np.asarray(start, float).ravel().copy()
        m, v = np.zeros_like(theta), np.zeros_like(theta)
        active = np.ones(theta.size, bool) if self.active is None else np.asarray(self.active, bool).ravel()
        if active.size != theta.size:
            raise ValueError(f"active has {active.size} entries, the weights {theta.size}")
        for generation in range(generations):
            noise = np.zeros((self.pairs, theta.size))  # only the active weights draw: a weight no input
            noise[:, active] = rng.standard_normal((self.pairs, int(active.sum())))  # feeds costs no randomness
            candidates = [theta + self.sigma * e for e in noise] + [theta - self.sigma * e for e in noise] + [theta]
            values = np.asarray(fitness([c.reshape(self.shape) for c in candidates], generation), dtype=float)
            ranks = centered_ranks(values[:-1])
            gradient = (ranks[: self.pairs] - ranks[self.pairs :]) @ noise / (2 * self.pairs * self.sigma)
            m = 0.9 * m + 0.1 * gradient
            v = 0.999 * v + 0.001 * gradient**2
            step = generation + 1
            theta = theta + self.learning_rate * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
            self.history.append(
                {
                    "generation": generation + 1,
                    "current": float(values[-1]),
                    "best_candidate": float(values[:-1].max()),
                    "mean_candidate": float(values[:-1].mean()),
                    "norm": float(np.linalg.norm(theta)),
                }
            )
        return theta.reshape(self.shape)


def window_fitness(
    settings: list[tuple[Mapping[str, Any], float]],
    cluster: Mapping[str, Any],
    base: Mapping[str, Any],
    max_instances: int,
    windows: int,
    seed: int,
    pool=None,
    shortfall_weight: float = 0.0,
) -> Callable[[list[np.ndarray], int], np.ndarray]:
    """Fitness = mean SLO attainment of a candidate over ``windows`` random windows of each (workload,
    load) setting; generation ``g`` uses window seeds ``seed + g·windows …``, the same for all its candidates.

    With ``shortfall_weight`` λ > 0, minus λ × the candidate's shortfall against PRISM (the zero bonus, run on
    the same windows) averaged over the settings, each setting's shortfall ``max(0, PRISM's mean − the
    candidate's)``: a bonus that wins at one load and loses at another no longer nets the two (on prefix-chat
    the plain mean learnt to trade ×1.3 for ×1.5, docs/training.md)."""
    if not shortfall_weight >= 0:
        raise ValueError(f"shortfall_weight must be >= 0, got {shortfall_weight!r}")
    workloads = {f"setting{i}": dict(workload) for i, (workload, _) in enumerate(settings)}
    loads = {f"setting{i}": float(load) for i, (_, load) in enumerate(settings)}

    def fitness(candidates: list[np.ndarray], generation: int) -> np.ndarray:
        everyone = list(candidates)
        # PRISM is the zero bonus: one among the candidates (train.py passes it for its paired figure) serves
        prism = next((k for k, c in enumerate(candidates) if not np.any(c)), None)
        if shortfall_weight > 0 and prism is None:
            prism = len(everyone)
            everyone.append(np.zeros_like(np.asarray(candidates[0], dtype=float)))
        specs = {f"c{k}": candidate_spec(c, base, max_instances) for k, c in enumerate(everyone)}
        seeds = [seed + generation * windows + w for w in range(windows)]
        tasks = [Task(name, w, s, loads[w]) for name in specs for w in workloads for s in seeds]
        rows = run_tasks(tasks, specs, workloads, dict(cluster), progress=False, pool=pool)
        score: dict[str, list[float]] = {name: [] for name in specs}
        by_setting: dict[tuple[str, str], list[float]] = {(name, w): [] for name in specs for w in workloads}
        for row in rows:
            score[row["policy"]].append(row["slo_attainment"])
            by_setting[row["policy"], row["workload"]].append(row["slo_attainment"])
        values = np.array([np.mean(score[name]) for name in specs])
        if shortfall_weight == 0:
            return values
        means = np.array([[np.mean(by_setting[name, w]) for w in workloads] for name in specs])
        shortfall = np.clip(means[prism] - means, 0.0, None).mean(axis=1)
        return (values - shortfall_weight * shortfall)[: len(candidates)]

    return fitness


__all__ = ["BonusRouter", "Evolution", "candidate_spec", "centered_ranks", "window_fitness"]
