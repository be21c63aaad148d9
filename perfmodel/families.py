"""Alternative step-latency model families, behind one interface, to compare with the structural model.

- :class:`RooflineModel`: datasheet peaks at 100% efficiency, no overheads, nothing fitted — the floor
  any structural model starts from.
- :class:`SaturationModel`: SynergySched's ``T(B,S) = w1·S/Thr(B,S) + τ_B·B + τ_S·S (+ c)`` with
  ``Thr = P_max(1 − e^(−k_B·B))(1 − e^(−k_S·S))`` (B = sequences, S = tokens of the step). Only
  ``w1/P_max`` is identifiable, so it is fitted as one parameter.
- :class:`ArrowModel`: Arrow's prefill time quadratic in the input length plus decode time linear in
  resident tokens: ``T = c + b·prefill_tokens + a·prefill_pairs + m·decode_kv_tokens``.

The last two take no architecture or hardware input, so they are fitted per configuration and cannot
transfer to an unseen model, TP degree or GPU — which the accuracy report makes visible.
"""

from __future__ import annotations

from typing import Self

import numpy as np
from scipy.optimize import least_squares, nnls
from servegym.perfmodel.batch import StepBatch, StepBatchArray
from servegym.perfmodel.profile import Coefficients
from servegym.perfmodel.structural import StructuralModel


def ideal_coefficients() -> Coefficients:
    """Every efficiency at 100% and every overhead at zero: the pure roofline."""
    base = Coefficients()
    return base.with_values(
        {
            "gemm_flops_eff": 1.0,
            "gemm_mem_eff": 1.0,
            "gemm_launch_ms": 0.0,
            "gemm_smoothness": 32.0,
            "gemm_pad_tokens": 0.0,
            "attn_flops_eff": 1.0,
            "attn_mem_eff": 1.0,
            "attn_launch_ms": 0.0,
            "comm_link_eff": 1.0,
            "comm_latency_ms": 0.0,
            "step_overhead_ms": 0.0,
            "seq_overhead_ms": 0.0,
            **{f"elem_mem_eff.{k}": 1.0 for k in base.elem_mem_eff},
            **{f"elem_launch_ms.{k}": 0.0 for k in base.elem_launch_ms},
        }
    )


class RooflineModel(StructuralModel):
    """The structural model's terms at datasheet peaks: a lower bound, never fitted."""

    def __init__(self, gpu: str, model: str, tp: int = 1, dtype: str = "bf16") -> None:
        super().__init__(gpu, model, tp=tp, dtype=dtype, coefficients=ideal_coefficients())


class SaturationModel:
    """SynergySched's saturation model over (B sequences, S tokens); parameters in :attr:`params`."""

    names = ("w1_over_pmax", "k_b", "k_s", "tau_b", "tau_s", "const")

    def __init__(self, params: np.ndarray | None = None) -> None:
        self.params = np.array([1e-3, 0.5, 0.01, 0.01, 1e-4, 0.1]) if params is None else np.asarray(params)

    @staticmethod
    def _curve(params: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
        scale, k_b, k_s, tau_b, tau_s, const = params
        throughput = (1.0 - np.exp(-k_b * b)) * (1.0 - np.exp(-k_s * s))
        return scale * s / throughput + tau_b * b + tau_s * s + const

    def predict_many(self, batches: StepBatchArray) -> np.ndarray:
        b, s = np.maximum(batches.num_seqs, 1.0), np.maximum(batches.num_tokens, 1.0)
        return np.where(batches.num_tokens > 0, self._curve(self.params, b, s), 0.0)

    def predict(self, batch: StepBatch) -> float:
        return float(self.predict_many(StepBatchArray.from_batches([batch]))[0])

    @classmethod
    def fit(cls, batches: StepBatchArray, latency_ms: np.ndarray) -> Self:
        """Bounded least squares on log latency (relative error), from a few starting points."""
        b, s = np.maximum(batches.num_seqs, 1.0), np.maximum(batches.num_tokens, 1.0)
        target = np.log(latency_ms)
        lower = np.array([1e-9, 1e-4, 1e-6, 0.0, 0.0, 0.0])
        upper = np.array([1e3, 50.0, 10.0, 1e3, 1e3, 1e4])

        def residuals(params: np.ndarray) -> np.ndarray:
            return np.log(np.maximum(cls._curve(params, b, s), 1e-12)) - target

        best = None
        slope = float(np.median(latency_ms / s))
        for k_s in (1e-3, 1e-2, 1e-1):
            start = np.clip([slope * 0.5, 0.5, k_s, 0.0, slope * 0.5, float(np.min(latency_ms)) * 0.5], lower, upper)
            result = least_squares(residuals, start, bounds=(lower, upper), loss="soft_l1", f_scale=0.05)
            if best is None or result.cost < best.cost:
                best = result
        return cls(best.x)


class ArrowModel:
    """Arrow's quadratic-prefill, linear-decode model; non-negative coefficients fitted by NNLS."""

    names = ("const", "per_prefill_token", "per_prefill_pair", "per_decode_kv_token")

    def __init__(self, params: np.ndarray | None = None) -> None:
        self.params = np.zeros(4) if params is None else np.asarray(params)

    @staticmethod
    def features(batches: StepBatchArray) -> np.ndarray:
        prefill_pairs = batches.attn_pairs - batches.decode_kv_tokens
        return np.column_stack([np.ones(len(batches)), batches.prefill_tokens, prefill_pairs, batches.decode_kv_tokens])

    def predict_many(self, batches: StepBatchArray) -> np.ndarray:
        return np.where(batches.num_tokens > 0, self.features(batches) @ self.params, 0.0)

    def predict(self, batch: StepBatch) -> float:
        return float(self.predict_many(StepBatchArray.from_batches([batch]))[0])

    @classmethod
    def fit(cls, batches: StepBatchArray, latency_ms: np.ndarray) -> Self:
        """Least squares on relative error (rows divided by the measurement), coefficients kept non-negative."""
        features = cls.features(batches)
        weights = 1.0 / np.asarray(latency_ms)
        params, _ = nnls(features * weights[:, None], np.ones(len(features)))
        return cls(params)
