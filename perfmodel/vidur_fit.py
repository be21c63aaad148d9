"""Offline calibration of GPU coefficients on Vidur's per-layer operator measurements.

Vidur (MIT, microsoft/vidur) timed every operator of a transformer layer — GEMMs, norms, RoPE,
activation, residual add, embedding — on A100, A40 and H100 for several models, token counts and
tensor-parallel degrees, and all-reduce latency by message size. The structural model predicts each
of those operators from its FLOPs and bytes, so the GPU's efficiencies are fitted by least squares on
log time (relative error) over all models and TP degrees at once. Vidur's attention profiles are not in
these files; three of its measured decode-attention times (:data:`VIDUR_DECODE_ATTENTION`) fix the share
of HBM bandwidth paged decode attention reaches, which every GPU takes as its prior. The CPU overhead is
not in Vidur's data at all: serving calibration fits it (:mod:`servegym.envs.sim.serving_calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from servegym.perfmodel.catalog import DATA_DIR
from servegym.perfmodel.profile import Coefficients, Profile
from servegym.perfmodel.structural import StructuralModel

MEASUREMENTS = DATA_DIR / "measurements"
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENT_OPS = {
    "input_layernorm": "norm",
    "post_attention_layernorm": "norm",
    "attn_rope": "rope",
    "mlp_act": "act",
    "add": "add",
    "emb": "emb",
}
LAYER_OPS = GEMM_OPS + tuple(op for op in ELEMENT_OPS if op != "emb")

# Vidur's measured decode attention of Llama-2-7B on A100-80GB (one layer, TP 1, KV block 16), as quoted in
# ../shared/data/serving/README.md: (batch, context per sequence, ms).
VIDUR_DECODE_ATTENTION = ((32, 1216, 0.369), (32, 1728, 0.519), (1, 1728, 0.025))
VIDUR_ATTENTION_SOURCE = (
    "microsoft/vidur attention profiles (MIT): Llama-2-7B decode attention on A100-80GB, batch 32 at context "
    "1,216 and 1,728, batch 1 at 1,728"
)


def load_ops() -> pd.DataFrame:
    """Vidur's median per-layer operator times (ms): one row per (gpu, model, tp, num_tokens)."""
    return pd.read_csv(MEASUREMENTS / "vidur_ops.csv.gz")


def load_allreduce() -> pd.DataFrame:
    """Vidur's median all-reduce latency (ms) by GPU, worker count and message size."""
    return pd.read_csv(MEASUREMENTS / "vidur_allreduce.csv.gz")


def long_form(ops: pd.DataFrame, op_names: Sequence[str]) -> pd.DataFrame:
    """Melt the operator columns into rows ``(gpu, model, tp, num_tokens, op, measured_ms)``; drops absent ops."""
    melted = ops.melt(
        id_vars=["gpu", "model", "tp", "num_tokens"], value_vars=list(op_names), var_name="op", value_name="measured_ms"
    )
    return melted.dropna(subset=["measured_ms"]).query("measured_ms > 0").reset_index(drop=True)


def predict_ops(rows: pd.DataFrame, coefficients: Coefficients, gpu: str) -> np.ndarray:
    """Predicted per-layer time (ms) of each long-form row (RangeIndex) for ``gpu`` with ``coefficients``."""
    predicted = np.empty(len(rows))
    for (model, tp), group in rows.groupby(["model", "tp"], sort=False):
        structural = StructuralModel(gpu, model, tp=int(tp), coefficients=coefficients)
        index, ops = group.index.to_numpy(), group["op"].to_numpy()
        times = structural.vidur_ops_ms(group["num_tokens"].to_numpy())
        for op in np.unique(ops):
            mask = ops == op
            predicted[index[mask]] = times[op][mask]
    return predicted


def _fit(
    rows: pd.DataFrame, gpu: str, base: Coefficients, names: list[str], lower: list[float], upper: list[float]
) -> Coefficients:
    """Least squares on log time over ``rows`` for the named coefficients (fitted in log space)."""
    measured = np.log(rows["measured_ms"].to_numpy())

    def residuals(log_values: np.ndarray) -> np.ndarray:
        trial = base.with_values(dict(zip(names, np.exp(log_values), strict=True)))
        return np.log(predict_ops(rows, trial, gpu)) - measured

    start = np.log(np.clip([base.value(n) for n in names], lower, upper))
    result = least_squares(residuals, start, bounds=(np.log(lower), np.log(upper)), loss="soft_l1", f_scale=0.05)
    return base.with_values(dict(zip(names, np.exp(result.x), strict=True)))


def fit_gpu_ops(ops: pd.DataFrame, gpu: str, base: Coefficients | None = None) -> Coefficients:
    """Fit ``gpu``'s GEMM and elementwise coefficients on its rows of ``ops`` (all models and TP degrees)."""
    base = base or Coefficients()
    mine = ops[ops["gpu"] == gpu]
    if mine.empty:
        raise ValueError(f"no Vidur operator measurements for GPU {gpu}")
    gemm_rows = long_form(mine, GEMM_OPS)
    fitted = _fit(
        gemm_rows,
        gpu,
        base,
        ["gemm_flops_eff", "gemm_mem_eff", "gemm_launch_ms", "gemm_smoothness", "gemm_pad_tokens"],
        [0.05, 0.05, 1e-4, 1.0, 0.01],
        [1.0, 1.0, 0.1, 20.0, 1024.0],
    )
    for kind in sorted(set(ELEMENT_OPS.values())):
        op_names = [op for op, k in ELEMENT_OPS.items() if k == kind]
        kind_rows = long_form(mine, op_names)
        fitted = _fit(
            kind_rows, gpu, fitted, [f"elem_mem_eff.{kind}", f"elem_launch_ms.{kind}"], [0.01, 1e-4], [1.5, 0.1]
        )
    return fitted


def fit_allreduce(collectives: pd.DataFrame, gpu: str, base: Coefficients) -> Coefficients:
    """Fit the all-reduce latency and link efficiency of ``gpu`` (ring: ``2(n-1)/n`` of the message per GPU)."""
    from servegym.perfmodel.catalog import get_gpu

    mine = collectives[collectives["gpu"] == gpu]
    if mine.empty:
        return base
    link = get_gpu(gpu).link_bandwidth
    ring_bytes = 2.0 * (mine["num_workers"] - 1) / mine["num_workers"] * mine["size_bytes"]
    measured = np.log(mine["latency_ms"].to_numpy())

    def residuals(log_values: np.ndarray) -> np.ndarray:
        latency, eff = np.exp(log_values)
        return np.log(latency + ring_bytes.to_numpy() * 1e3 / (eff * link)) - measured

    start = np.log([base.comm_latency_ms, base.comm_link_eff])
    result = least_squares(
        residuals, start, bounds=(np.log([1e-4, 0.01]), np.log([1.0, 1.5])), loss="soft_l1", f_scale=0.1
    )
    latency, eff = np.exp(result.x)
    return base.with_values({"comm_latency_ms": latency, "comm_link_eff": eff})


def fit_decode_attention(base: Coefficients, gpu: str = "A100-80GB", model: str = "Llama-2-7B") -> Coefficients:
    """Attention's share of HBM bandwidth and its per-layer fixed cost from :data:`VIDUR_DECODE_ATTENTION`.

    A decode reads every KV entry of its context once, so per layer the time is ``launch + kv_bytes /
    (eff * bandwidth)``: two parameters, three measurements (least squares on log time)."""
    from servegym.perfmodel.batch import StepBatch

    batches = [StepBatch.decode(b, b * ctx) for b, ctx, _ in VIDUR_DECODE_ATTENTION]
    measured = np.log([ms for _, _, ms in VIDUR_DECODE_ATTENTION])

    def residuals(log_values: np.ndarray) -> np.ndarray:
        eff, launch = np.exp(log_values)
        trial = StructuralModel(
            gpu, model, coefficients=base.with_values({"attn_mem_eff": eff, "attn_launch_ms": launch})
        )
        per_layer = [trial.terms(b)["attention"] / trial.layers for b in batches]
        return np.log(per_layer) - measured

    start = np.log([base.attn_mem_eff, base.attn_launch_ms])
    result = least_squares(residuals, start, bounds=(np.log([0.05, 1e-4]), np.log([1.0, 0.1])))
    eff, launch = np.exp(result.x)
    return base.with_values({"attn_mem_eff": eff, "attn_launch_ms": launch})


def fit_vidur_profile(
    ops: pd.DataFrame | None = None, collectives: pd.DataFrame | None = None, gpus: Sequence[str] | None = None
) -> Profile:
    """The shipped profile: every measured GPU's coefficients, with provenance."""
    ops = load_ops() if ops is None else ops
    collectives = load_allreduce() if collectives is None else collectives
    profile = Profile(
        name="vidur",
        provenance={
            "source": "microsoft/vidur profiling data (MIT License), compute/*/mlp.csv and network/*/all_reduce.csv",
            "fitted_by": "python -m servegym.perfmodel fit-vidur",
            "fitted_terms": "GEMM and elementwise efficiencies per GPU; all-reduce latency and link efficiency; "
            "decode attention's share of HBM bandwidth and fixed cost (A100-80GB, the prior of every GPU)",
            "attention_source": VIDUR_ATTENTION_SOURCE,
            "prior_terms": "prefill attention FLOP efficiency, host launch cost, step and per-sequence CPU overhead",
            "rows": len(ops),
        },
    )
    attention = fit_decode_attention(Coefficients())
    shared = {"attn_mem_eff": attention.attn_mem_eff, "attn_launch_ms": attention.attn_launch_ms}
    for gpu in gpus or sorted(ops["gpu"].unique()):
        coefficients = fit_gpu_ops(ops, gpu, base=Coefficients().with_values(shared))
        profile.gpus[gpu] = fit_allreduce(collectives, gpu, coefficients)
    return profile
