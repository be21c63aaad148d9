"""Fit performance-model coefficients so that *simulated serving* matches *measured serving*.

Each candidate coefficient vector becomes an in-memory profile (``perfmodel.profile.register_profile``)
under which every measured run is replayed (:func:`envs.sim.serving_runs.replay`); the residuals are the
log-ratios simulated/measured of each stage's TTFT, TPOT and E2E means and P90s, and scipy's bounded
least squares moves the coefficients. Software-stack terms (per-step CPU overhead, the serving stack's
per-request latency, the all-reduce latency) are shared by every GPU, model and TP degree; hardware terms
(attention's share of HBM bandwidth) are fitted per GPU present in the runs. Terms the runs cannot
identify are not fitted: the all-reduce latency only when a run has TP > 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from envs.sim.serving_runs import METRICS, STATS, ServingRun, replay
from perfmodel.catalog import get_gpu
from perfmodel.profile import Profile, load_profile, register_profile

CANDIDATE = "serving-candidate"


@dataclass(frozen=True)
class Term:
    """One fitted coefficient: its name in :class:`perfmodel.profile.Coefficients`, bounds, and whose it is
    (``gpu`` for a hardware term, None for a software-stack term shared by all)."""

    name: str
    low: float
    high: float
    gpu: str | None = None

    @property
    def label(self) -> str:
        return f"{self.gpu}.{self.name}" if self.gpu else self.name


SHARED_TERMS = (
    Term("step_overhead_ms", 0.0, 3.0),
    Term("request_overhead_ms", 0.0, 60.0),
)


def terms_for(runs: Sequence[ServingRun]) -> list[Term]:
    """The terms ``runs`` can identify: the shared ones, attention bandwidth per GPU, all-reduce latency if TP > 1."""
    terms = list(SHARED_TERMS)
    if any(run.tp > 1 for run in runs):
        terms.append(Term("comm_latency_ms", 0.001, 0.1))
    for gpu in sorted({get_gpu(run.gpu).name for run in runs}):
        terms.append(Term("attn_mem_eff", 0.3, 1.0, gpu=gpu))
    return terms


def profile_with(base: Profile, terms: Sequence[Term], values: Sequence[float], name: str) -> Profile:
    """``base`` with the terms' values: shared terms on every GPU of the profile, hardware terms on theirs."""
    gpus = sorted(set(base.gpus) | {t.gpu for t in terms if t.gpu})
    out = {}
    for gpu in gpus:
        coefficients = base.coefficients(gpu)
        mine = {t.name: float(v) for t, v in zip(terms, values, strict=True) if t.gpu in (None, gpu)}
        out[gpu] = coefficients.with_values(mine)
    return Profile(name=name, gpus=out, provenance=dict(base.provenance))


def residuals(table: Any) -> np.ndarray:
    """Log-ratios simulated/measured of every measured statistic of every stage (a saturated stage gives large
    but finite residuals: its simulated latencies are still finite)."""
    out = []
    for row in table.itertuples():
        for metric in METRICS:
            for stat in STATS:
                measured = getattr(row, f"{metric}_{stat}_measured_ms")
                sim = getattr(row, f"{metric}_{stat}_sim_ms")
                if measured and math.isfinite(measured) and measured > 0:
                    out.append(math.log(max(sim, 1e-3) / measured) if math.isfinite(sim) else 10.0)
    return np.asarray(out)


@dataclass
class Fit:
    """A fitted profile, its terms and values, and the replay tables behind its errors."""

    profile: Profile
    terms: list[Term]
    values: list[float]
    evaluations: int
    tables: dict[str, Any] = field(default_factory=dict)


def replay_all(runs: Sequence[ServingRun], profile: str, max_stage_s: float | None) -> dict[str, Any]:
    """Run name -> its measured-vs-simulated table under ``profile``."""
    return {run.name: replay(run, profile=profile, max_stage_s=max_stage_s).table for run in runs}


def fit_serving(
    runs: Sequence[ServingRun],
    base: str = "default",
    max_stage_s: float | None = 120.0,
    max_evaluations: int = 60,
    name: str = "serving",
) -> Fit:
    """Fit the identifiable terms on ``runs`` (replayed on the first ``max_stage_s`` of each stage)."""
    base_profile = load_profile(base)
    terms = terms_for(runs)
    start = [
        float(np.clip(base_profile.coefficients(t.gpu or runs[0].gpu).value(t.name), t.low, t.high)) for t in terms
    ]
    low, high = np.array([t.low for t in terms]), np.array([t.high for t in terms])
    count = 0

    def objective(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        register_profile(profile_with(base_profile, terms, x, CANDIDATE))
        return np.concatenate([residuals(table) for table in replay_all(runs, CANDIDATE, max_stage_s).values()])

    solution = least_squares(
        objective,
        np.clip(start, low + 1e-9, high - 1e-9),
        bounds=(low, high),
        diff_step=0.05,
        x_scale=high - low,
        max_nfev=max_evaluations,
    )
    values = [float(v) for v in solution.x]
    fitted = profile_with(base_profile, terms, values, name)
    fitted.provenance = {
        **base_profile.provenance,
        "serving_fit": {
            "base": base_profile.name,
            "runs": [run.name for run in runs],
            "values": {t.label: v for t, v in zip(terms, values, strict=True)},
            "max_stage_s": max_stage_s,
            "evaluations": count,
        },
    }
    return Fit(fitted, terms, values, count)
