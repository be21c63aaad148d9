"""Calibration from whole-step measurements (a vLLM deployment's step log, or the microbenchmark's).

One least-squares fit on log latency (relative error) over every GPU, model and TP degree of the log.
What a step costs splits into terms that shrink with tensor parallelism (GEMM and attention efficiencies,
the all-reduce's bytes over the link) and terms that do not (each kernel's fixed GPU cost, each
all-reduce's latency, the host's launch of every eager kernel, the CPU's work per step and per
sequence). The first are hardware terms, fitted per GPU; of the second, the CPU and host terms are the
serving stack's and are shared by every GPU of the log, the rest are fitted per GPU. Because both kinds
enter the model with the structure they have on the hardware (per layer, per kernel, per all-reduce), a
fit on some TP degrees predicts the others (``hold_out_tp`` measures it).

Coefficients the log cannot pin down stay near the base profile: every fitted coefficient carries a weak
log-space prior towards its base value; with the default ``prior_weight=0.01`` a coefficient a factor e
away from its base costs as much as one step predicted 10% off, so a few dozen informative steps
override it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from servegym.perfmodel.batch import StepBatchArray
from servegym.perfmodel.catalog import get_model
from servegym.perfmodel.profile import Coefficients, Profile, default_profile
from servegym.perfmodel.steplog import StepRecord
from servegym.perfmodel.structural import StructuralModel

# name: (lower, upper) bounds. Per GPU: efficiencies and fixed kernel costs; shared: the serving stack's CPU.
GPU_COEFFICIENTS = {
    "gemm_flops_eff": (0.02, 1.0),
    "gemm_mem_eff": (0.02, 1.0),
    "gemm_launch_ms": (1e-4, 0.1),
    "gemm_pad_tokens": (0.01, 1024.0),
    "attn_flops_eff": (0.01, 1.0),
    "attn_mem_eff": (0.01, 1.0),
    "attn_launch_ms": (1e-4, 0.1),
}
SHARED_COEFFICIENTS = {
    "step_overhead_ms": (1e-3, 100.0),
    "seq_overhead_ms": (1e-5, 1.0),
    "host_launch_ms": (1e-4, 0.1),
}
COMM_COEFFICIENTS = {"comm_link_eff": (0.01, 1.5), "comm_latency_ms": (1e-4, 1.0)}  # where the GPU has TP > 1

GroupKey = tuple[str, int, str, bool]  # model, TP, dtype, CUDA graphs


def _groups(records: Sequence[StepRecord]) -> dict[GroupKey, tuple[StepBatchArray, np.ndarray]]:
    by_config: dict[GroupKey, list[StepRecord]] = defaultdict(list)
    for record in records:
        by_config[(record.model, record.tp, record.dtype, record.cuda_graphs)].append(record)
    return {
        key: (StepBatchArray.from_batches([r.batch for r in rs]), np.array([r.latency_ms for r in rs]))
        for key, rs in by_config.items()
    }


def predict_records(gpu: str, groups: dict, coefficients: Coefficients) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, measured) latency of every grouped record of one GPU under ``coefficients``."""
    predicted, measured = [], []
    for (model, tp, dtype, graphs), (batches, latency) in groups.items():
        perf = StructuralModel(gpu, model, tp=tp, dtype=dtype, coefficients=coefficients, cuda_graphs=graphs)
        predicted.append(perf.predict_many(batches))
        measured.append(latency)
    return np.concatenate(predicted), np.concatenate(measured)


@dataclass(frozen=True)
class _Slot:
    """One entry of the fitted vector: a coefficient, and the GPU it belongs to (None: shared by all)."""

    name: str
    gpu: str | None
    low: float
    high: float


PER_LAYER_COSTS = ("gemm_launch_ms", "attn_launch_ms")  # told apart from the per-step CPU by layer counts


def _slots(by_gpu: dict[str, dict]) -> list[_Slot]:
    """What the log identifies: all-reduce terms only with TP > 1, and fixed per-layer kernel costs only with
    models of different depths (one depth cannot tell a cost per layer from one per step)."""
    slots = [_Slot(name, None, *bounds) for name, bounds in SHARED_COEFFICIENTS.items()]
    for gpu, groups in sorted(by_gpu.items()):
        mine = dict(GPU_COEFFICIENTS)
        if any(tp > 1 for (_, tp, _, _) in groups):
            mine.update(COMM_COEFFICIENTS)
        if len({get_model(model).num_hidden_layers for (model, _, _, _) in groups}) < 2:
            for name in PER_LAYER_COSTS:
                del mine[name]
        slots += [_Slot(name, gpu, *bounds) for name, bounds in mine.items()]
    return slots


def fit_steps(records: Sequence[StepRecord], base: Profile, prior_weight: float = 0.01) -> dict[str, Coefficients]:
    """Fitted coefficients of every GPU of ``records``: per-GPU hardware terms, shared CPU and host terms."""
    by_record_gpu: dict[str, list[StepRecord]] = defaultdict(list)
    for record in records:
        by_record_gpu[record.gpu].append(record)
    by_gpu = {gpu: _groups(mine) for gpu, mine in by_record_gpu.items()}
    bases = {gpu: base.coefficients(gpu) for gpu in by_gpu}
    slots = _slots(by_gpu)
    first = sorted(by_gpu)[0]
    lower = np.log([s.low for s in slots])
    upper = np.log([s.high for s in slots])
    base_values = np.array([bases[s.gpu or first].value(s.name) for s in slots])
    start = np.clip(np.log(np.maximum(base_values, 1e-12)), lower, upper)
    # a base value of zero (a term the base profile switched off) carries no magnitude to pull towards
    prior_scale = np.sqrt(prior_weight) * (base_values > np.exp(lower))

    def coefficients_of(log_values: np.ndarray) -> dict[str, Coefficients]:
        values = np.exp(log_values)
        return {
            gpu: bases[gpu].with_values({s.name: v for s, v in zip(slots, values, strict=True) if s.gpu in (None, gpu)})
            for gpu in by_gpu
        }

    def residuals(log_values: np.ndarray) -> np.ndarray:
        fitted = coefficients_of(log_values)
        errors = []
        for gpu, groups in by_gpu.items():
            predicted, measured = predict_records(gpu, groups, fitted[gpu])
            errors.append(np.log(predicted / measured))
        return np.concatenate([*errors, prior_scale * (log_values - start)])

    result = least_squares(residuals, start, bounds=(lower, upper), loss="soft_l1", f_scale=0.05)
    return coefficients_of(result.x)


def calibrate(
    records: Sequence[StepRecord], base: Profile | None = None, prior_weight: float = 0.01, source: str = "step log"
) -> Profile:
    """A profile with every GPU of ``records`` refitted; GPUs absent from the log keep ``base``'s values."""
    base = base or default_profile()
    if not records:
        raise ValueError(f"{source}: no measured steps to calibrate on")
    fitted = fit_steps(records, base, prior_weight)
    profile = Profile(
        name=f"{base.name}+steps",
        gpus=dict(base.gpus),
        provenance={
            "base": {"name": base.name, **base.provenance},
            "calibrated_on": source,
            "steps": len(records),
            "shared_terms": sorted(SHARED_COEFFICIENTS),
            "fit": {},
        },
    )
    for gpu, coefficients in sorted(fitted.items()):
        mine = [r for r in records if r.gpu == gpu]
        predicted, measured = predict_records(gpu, _groups(mine), coefficients)
        profile.gpus[gpu] = coefficients
        profile.provenance["fit"][gpu] = {
            "steps": len(mine),
            "models": sorted({r.model for r in mine}),
            "tp": sorted({r.tp for r in mine}),
            "in_sample_mape": round(float(np.abs(predicted / measured - 1.0).mean()), 4),
        }
    return profile


def holdout_errors(records: Sequence[StepRecord], profile: Profile) -> list[tuple[str, str, int, int, float, float]]:
    """(GPU, model, TP, steps, MAPE, P90 APE) of ``records`` under ``profile``, one row per configuration."""
    rows = []
    by_config: dict[tuple[str, str, int], list[StepRecord]] = defaultdict(list)
    for record in records:
        by_config[(record.gpu, record.model, record.tp)].append(record)
    for (gpu, model, tp), mine in sorted(by_config.items()):
        predicted, measured = predict_records(gpu, _groups(mine), profile.coefficients(gpu))
        ape = np.abs(predicted / measured - 1.0)
        rows.append((gpu, model, tp, len(mine), float(ape.mean()), float(np.quantile(ape, 0.9))))
    return rows


def split_by_tp(records: Sequence[StepRecord], held_out: Sequence[int]) -> tuple[list[StepRecord], list[StepRecord]]:
    """(fit, held-out) records: the held-out TP degrees are never seen by the fit."""
    held = set(held_out)
    fit = [r for r in records if r.tp not in held]
    test = [r for r in records if r.tp in held]
    if not fit or not test:
        degrees = sorted({r.tp for r in records})
        raise ValueError(
            f"holding out TP {sorted(held)} of the log's TP degrees {degrees} leaves nothing to fit or test"
        )
    return fit, test
