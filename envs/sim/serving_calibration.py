"""Fit performance-model coefficients so that *simulated serving* matches *measured serving*.

Each candidate coefficient vector becomes an in-memory profile (``servegym.perfmodel.profile.register_profile``)
under which every measured run is replayed (:func:`servegym.envs.sim.serving_runs.replay`); the residuals are the
log-ratios simulated/measured of each stage's TTFT, TPOT and E2E means and P90s, and scipy's bounded
least squares moves the coefficients. Software-stack terms (per-step CPU overhead, the serving stack's
per-request latency, the all-reduce latency) are shared by every GPU, model and TP degree; hardware terms
(attention's share of HBM bandwidth, the GEMM tile padding that makes a step grow with its batch) are fitted
per GPU present in the runs. Terms the runs cannot identify are not fitted: the all-reduce latency only
when a run has TP > 1; otherwise it keeps the serving-stack prior (:data:`NVLINK_PRIORS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from servegym.envs.sim.serving_runs import METRICS, STATS, ServingRun, replay
from servegym.perfmodel.catalog import get_gpu
from servegym.perfmodel.profile import Coefficients, Profile, load_profile, register_profile

CANDIDATE = "serving-candidate"


@dataclass(frozen=True)
class Term:
    """One fitted coefficient: its name in :class:`servegym.perfmodel.profile.Coefficients`, bounds, and whose it is
    (``gpu`` for a hardware term, None for a software-stack term shared by all)."""

    name: str
    low: float
    high: float
    gpu: str | None = None
    # pull towards the prior (the base profile's value with the serving priors), per unit of
    # (value - prior) / (high - low), for a term whose prior is measured or physical (decode attention's
    # bandwidth share from Vidur's attention timings; the GEMM tile padding): runs that barely exercise it
    # (GQA models read little KV; a model whose step hardly grows with its batch) leave it near the prior
    prior_weight: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.gpu}.{self.name}" if self.gpu else self.name


# What a vLLM serving stack runs that the operator benchmarks behind the base profile did not:
# - vLLM's custom all-reduce (one-shot over NVLink peer memory) instead of NCCL: measured on H100 at
#   decode-sized messages (512 B to 32 KiB, TP 2 to 8, no CUDA graphs) 8.7-10.1 us per call
#   (sgl-project/sglang#2904), against the ~30 us of Vidur's NCCL fit. Only on NVLink GPUs (PCIe keeps NCCL).
# - GEMM kernels that compute whole 128-row tiles, so a batch of n rows costs on average n + 64 rows of FLOPs;
#   Vidur's harness fitted 152 on H100, which makes a memory-bound decode step grow with its batch faster
#   than vLLM's does. A prior only: the runs refit it where their load varies enough.
# - Asynchronous scheduling (vLLM's default, replayed here): the scheduler's and input preparation's work for
#   each running sequence overlaps the GPU's previous step, so a step pays no per-sequence CPU time (the
#   operator-level base keeps the eager engine's 5 us per sequence). The per-step constant stays fitted.
NVLINK_PRIORS = {"comm_latency_ms": 0.009}
KERNEL_PRIORS = {"gemm_pad_tokens": 64.0, "seq_overhead_ms": 0.0}


def with_serving_priors(coefficients: Coefficients, gpu: str) -> Coefficients:
    """``coefficients`` with the serving-stack priors that apply to ``gpu`` (custom all-reduce needs NVLink)."""
    coefficients = coefficients.with_values(KERNEL_PRIORS)
    if get_gpu(gpu).link.startswith("nvlink"):
        return coefficients.with_values(NVLINK_PRIORS)
    return coefficients


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
        terms.append(Term("attn_mem_eff", 0.3, 1.0, gpu=gpu, prior_weight=1.0))
        terms.append(Term("gemm_pad_tokens", 0.0, 256.0, gpu=gpu, prior_weight=1.0))
    return terms


def profile_with(base: Profile, terms: Sequence[Term], values: Sequence[float], name: str) -> Profile:
    """``base`` with the terms' values: shared terms on every GPU of the profile, hardware terms on theirs."""
    gpus = sorted(set(base.gpus) | {t.gpu for t in terms if t.gpu})
    out = {}
    for gpu in gpus:
        coefficients = with_serving_priors(base.coefficients(gpu), gpu)
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
    base: str = "vidur",
    max_stage_s: float | None = 120.0,
    max_evaluations: int = 60,
    name: str = "serving",
) -> Fit:
    """Fit the identifiable terms on ``runs`` (replayed on the first ``max_stage_s`` of each stage)."""
    base_profile = load_profile(base)
    terms = terms_for(runs)
    start = []
    for t in terms:
        gpu = get_gpu(t.gpu or runs[0].gpu).name
        start.append(
            float(np.clip(with_serving_priors(base_profile.coefficients(gpu), gpu).value(t.name), t.low, t.high))
        )
    low, high = np.array([t.low for t in terms]), np.array([t.high for t in terms])
    prior = np.array([t.prior_weight for t in terms]) / (high - low)
    anchor = np.array(start)
    count = 0

    def objective(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        register_profile(profile_with(base_profile, terms, x, CANDIDATE))
        measured = [residuals(table) for table in replay_all(runs, CANDIDATE, max_stage_s).values()]
        return np.concatenate([*measured, prior * (x - anchor)])

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
