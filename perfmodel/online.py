"""Online refit of the step-latency model from observed steps, so predictions follow a drift.

The structural model's prediction is a sum of terms (CPU overhead per step and per sequence, linear
layers, attention, communication). Online, a recursive least-squares filter with exponential
forgetting estimates one weight per term from each observed ``(batch, latency)``; the structure
itself stays fixed, as SynergySched keeps its structural parameters frozen because online data is
~90% decode-only and cannot identify them. As in SynergySched, the applied weights change only when
the recent error of the applied model exceeds a threshold (checked every ``check_every`` steps with
at least ``min_samples`` in the window); ``threshold=0`` applies every update.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.structural import StructuralModel

WEIGHT_NAMES = ("step_overhead_ms", "seq_overhead_ms", "linear_scale", "attention_scale", "communication_scale")


class OnlineRefit:
    """A structural model whose term weights are re-estimated from observed steps.

    Args:
        perf: the offline-calibrated model supplying the terms and the starting weights.
        forgetting: RLS forgetting factor λ (effective memory ≈ 1/(1−λ) steps).
        threshold: refit when the applied model's recent MAPE exceeds this (SynergySched uses 0.15).
        window: how many recent errors the trigger looks at.
        min_samples: observations needed in the window before a refit may happen.
        check_every: observations between trigger checks.
    """

    def __init__(
        self,
        perf: StructuralModel,
        forgetting: float = 0.995,
        threshold: float = 0.15,
        window: int = 200,
        min_samples: int = 50,
        check_every: int = 25,
    ) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.perf = perf
        c = perf.coefficients
        self._prior = np.array([c.step_overhead_ms, c.seq_overhead_ms, 1.0, 1.0, 1.0])
        self.weights = self._prior.copy()  # applied
        self._estimate = self._prior.copy()  # RLS state
        self._p0 = np.diag(np.maximum(self._prior, 1e-3) ** 2)
        self._cov = self._p0.copy()
        self.forgetting = forgetting
        self.threshold = threshold
        self.min_samples = min_samples
        self.check_every = check_every
        self._errors: deque[float] = deque(maxlen=window)
        self.observations = 0
        self.refits = 0

    def features(self, batch: StepBatch) -> np.ndarray:
        """The regressors: 1, sequences, and the linear, attention and communication terms (ms)."""
        return self._terms(batch)[0]

    def _terms(self, batch: StepBatch) -> tuple[np.ndarray, float]:
        """The regressors and the host-launch wait, which is kept as modelled (an offset, not a weight)."""
        t = self.perf.terms(batch)
        phi = np.array([1.0, float(batch.num_seqs), t["linear"], t["attention"], t["communication"]])
        return phi, float(t["host_wait"])

    def predict(self, batch: StepBatch) -> float:
        """Latency (ms) under the applied weights."""
        if batch.num_tokens <= 0:
            return 0.0
        phi, offset = self._terms(batch)
        return float(phi @ self.weights) + offset

    @property
    def recent_mape(self) -> float:
        return float(np.mean(self._errors)) if self._errors else 0.0

    def observe(self, batch: StepBatch, latency_ms: float) -> bool:
        """Feed one measured step; returns True when this observation triggered a refit."""
        if batch.num_tokens <= 0 or not latency_ms > 0:
            raise ValueError(f"observe needs a non-empty batch and a positive latency, got {latency_ms!r}")
        phi, offset = self._terms(batch)
        self._errors.append(abs((float(phi @ self.weights) + offset) / latency_ms - 1.0))
        x = phi / latency_ms  # relative-error regression: target 1 less the offset's share
        gain_denominator = self.forgetting + x @ self._cov @ x
        gain = self._cov @ x / gain_denominator
        self._estimate = self._estimate + gain * (1.0 - offset / latency_ms - x @ self._estimate)
        self._cov = (self._cov - np.outer(gain, x @ self._cov)) / self.forgetting
        trace, trace0 = np.trace(self._cov), np.trace(self._p0)
        if trace > trace0:  # directions the data do not excite must not wind up without bound
            self._cov *= trace0 / trace
        self._estimate = np.clip(self._estimate, 0.0, np.maximum(self._prior, 1e-3) * 20.0)
        self.observations += 1
        if self.observations % self.check_every or len(self._errors) < self.min_samples:
            return False
        if self.recent_mape <= self.threshold:
            return False
        self.weights = self._estimate.copy()
        self._errors.clear()
        self.refits += 1
        return True
