"""Calibration from whole-step measurements (a vLLM deployment's step log, or the microbenchmark's).

Each GPU in the log gets its own coefficients, fitted on all its models and TP degrees together by
least squares on log latency (relative error). Coefficients the log cannot pin down stay near the
base profile: every fitted coefficient carries a weak log-space prior towards its base value; with the
default ``prior_weight=0.01`` a coefficient a factor e away from its base costs as much as one step
predicted 10% off, so a few dozen informative steps override it. Because the model is structural, a
profile fitted on TP 1 and 2 predicts TP 4, and one fitted on one model predicts another.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from perfmodel.batch import StepBatchArray
from perfmodel.profile import Coefficients, Profile, default_profile
from perfmodel.steplog import StepRecord, read_steps
from perfmodel.structural import StructuralModel

# name: (lower, upper) bounds; communication terms are fitted only where the log has TP > 1
STEP_COEFFICIENTS = {
    "gemm_flops_eff": (0.02, 1.0),
    "gemm_mem_eff": (0.02, 1.0),
    "attn_flops_eff": (0.01, 1.0),
    "attn_mem_eff": (0.01, 1.0),
    "step_overhead_ms": (1e-3, 100.0),
    "seq_overhead_ms": (1e-5, 1.0),
}
COMM_COEFFICIENTS = {"comm_link_eff": (0.01, 1.5), "comm_latency_ms": (1e-4, 1.0)}


def _groups(records: Sequence[StepRecord]) -> dict[tuple[str, int, str], tuple[StepBatchArray, np.ndarray]]:
    by_config: dict[tuple[str, int, str], list[StepRecord]] = defaultdict(list)
    for record in records:
        by_config[(record.model, record.tp, record.dtype)].append(record)
    return {
        key: (StepBatchArray.from_batches([r.batch for r in rs]), np.array([r.latency_ms for r in rs]))
        for key, rs in by_config.items()
    }


def predict_records(gpu: str, groups: dict, coefficients: Coefficients) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, measured) latency of every grouped record of one GPU under ``coefficients``."""
    predicted, measured = [], []
    for (model, tp, dtype), (batches, latency) in groups.items():
        perf = StructuralModel(gpu, model, tp=tp, dtype=dtype, coefficients=coefficients)
        predicted.append(perf.predict_many(batches))
        measured.append(latency)
    return np.concatenate(predicted), np.concatenate(measured)


def fit_gpu_steps(
    gpu: str, records: Sequence[StepRecord], base: Coefficients, prior_weight: float = 0.01
) -> Coefficients:
    """Fit one GPU's coefficients to its measured steps, with a log-space prior towards ``base``."""
    groups = _groups(records)
    bounds = dict(STEP_COEFFICIENTS)
    if any(tp > 1 for (_, tp, _) in groups):
        bounds.update(COMM_COEFFICIENTS)
    names = list(bounds)
    lower = np.log([bounds[n][0] for n in names])
    upper = np.log([bounds[n][1] for n in names])
    start = np.clip(np.log([base.value(n) for n in names]), lower, upper)
    prior_scale = np.sqrt(prior_weight)

    def residuals(log_values: np.ndarray) -> np.ndarray:
        trial = base.with_values(dict(zip(names, np.exp(log_values), strict=True)))
        predicted, measured = predict_records(gpu, groups, trial)
        return np.concatenate([np.log(predicted / measured), prior_scale * (log_values - start)])

    result = least_squares(residuals, start, bounds=(lower, upper), loss="soft_l1", f_scale=0.05)
    return base.with_values(dict(zip(names, np.exp(result.x), strict=True)))


def calibrate(
    records: Sequence[StepRecord], base: Profile | None = None, prior_weight: float = 0.01, source: str = "step log"
) -> Profile:
    """A profile with every GPU of ``records`` refitted; GPUs absent from the log keep ``base``'s values."""
    base = base or default_profile()
    if not records:
        raise ValueError(f"{source}: no measured steps to calibrate on")
    by_gpu: dict[str, list[StepRecord]] = defaultdict(list)
    for record in records:
        by_gpu[record.gpu].append(record)
    profile = Profile(
        name=f"{base.name}+steps",
        gpus=dict(base.gpus),
        provenance={
            "base": {"name": base.name, **base.provenance},
            "calibrated_on": source,
            "steps": len(records),
            "fit": {},
        },
    )
    for gpu, mine in sorted(by_gpu.items()):
        fitted = fit_gpu_steps(gpu, mine, base.coefficients(gpu), prior_weight=prior_weight)
        predicted, measured = predict_records(gpu, _groups(mine), fitted)
        ape = np.abs(predicted / measured - 1.0)
        profile.gpus[gpu] = fitted
        profile.provenance["fit"][gpu] = {
            "steps": len(mine),
            "models": sorted({r.model for r in mine}),
            "tp": sorted({r.tp for r in mine}),
            "in_sample_mape": round(float(ape.mean()), 4),
        }
    return profile


def calibrate_file(path: str | Path, base: Profile | None = None, prior_weight: float = 0.01) -> Profile:
    """Read a measured step log (every line needs ``latency_ms``) and calibrate on it."""
    records = list(read_steps(path, need_latency=True))
    return calibrate(records, base=base, prior_weight=prior_weight, source=str(path))
