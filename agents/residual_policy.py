"""A residual router: PRISM's own score plus a learned correction, so learning starts *at* the expert.

Cloning PRISM into a network started ~1 point below it (65–75% agreement) and reinforcement learning spent
its budget recovering that. Here the policy's logits are

    logit_i = PRISM score_i(observation) · exp(sharpness) + residual_i(observation)

with the residual's last layer initialised to zero: the untrained policy's greedy decisions *are* PRISM's
(tests/agents/test_residual_policy.py checks every step), and training moves only where it finds a reason.
``sharpness`` is a learned scalar (the inverse temperature): lowering exploration never reorders engines.

PRISM's score comes from the observation contract alone (:mod:`servegym.envs.features`; version 4 added
the affinity window) — ``predicted_step_ms``, ``pending_prefill_s``, ``next_step_tokens`` and ``affinity`` —
so the same graph runs in training, evaluation, the ONNX export and the router service. The observation
must not be normalised by VecNormalize (``conf/agent/maskable_ppo_residual.yaml`` sets
``normalize_obs: false``): the contract's scales already keep every value within [0, 16].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from servegym.agents.slot_policy import SlotFeatures, _SlotActor
from servegym.envs.features import ENGINE_FEATURES
from torch import nn

_COLUMN = {f.name: (j, f.scale) for j, f in enumerate(ENGINE_FEATURES)}


class PrismScore(nn.Module):
    """PRISM's score of every engine slot (:class:`servegym.agents.routing.predictive.Prism`) from the
    contract's engine features, in float64 so that its order matches the heuristic's to the last bit that
    float32 observations keep."""

    def __init__(self, slots: int, slo_tpot_s: float = 0.1, weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.slots, self.per_engine = slots, len(ENGINE_FEATURES)
        self.slo_tpot_s, self.weights = float(slo_tpot_s), tuple(float(w) for w in weights)

    def _column(self, engines: torch.Tensor, name: str) -> torch.Tensor:
        j, scale = _COLUMN[name]
        return engines[:, :, j] * scale  # back to the feature's unit

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        batch = observations.shape[0]
        engines = observations[:, : self.slots * self.per_engine].reshape(batch, self.slots, self.per_engine).double()
        step_s = self._column(engines, "predicted_step_ms") / 1e3
        s_lat = torch.clamp(1.0 - torch.clamp(step_s / self.slo_tpot_s, max=5.0), min=0.0)
        s_load = 1.0 - torch.tanh(self._column(engines, "pending_prefill_s") / 1.0)
        tokens = self._column(engines, "next_step_tokens")
        s_mode = torch.where(tokens < 256, 1.0, torch.where(tokens <= 1024, 0.5, 0.0)).double()
        s_kv = self._column(engines, "affinity")
        w_lat, w_load, w_mode, w_kv = self.weights
        return w_lat * s_lat + w_load * s_load + w_mode * s_mode + w_kv * s_kv


class ResidualFeatures(SlotFeatures):
    """:class:`SlotFeatures` whose slot logits are PRISM's score, sharpened, plus a residual that is zero at
    initialisation; the pooled context for the critic follows as before.

    ``residual="mlp"``: the shared scorer's output, added to the logits. ``residual="bilinear"``: a score
    bonus ``e · W · r`` added to PRISM's score *before* sharpening (so ``W`` reads in PRISM's units: a bonus
    of 1 is worth as much as the whole latency term), 21 × 7 weights — few enough to fit from a few hundred
    labelled states, and able to say "requests with a tight TPOT target prefer the engines with the high
    prefill capacity", which PRISM's one target cannot. ``e`` is each engine feature minus its mean over
    the decision's present engines (a bonus common to all engines changes no decision), times
    ``engine_gain``; ``r`` is ``[request features, 1]`` minus ``request_offset``, times ``request_gain``;
    both clipped to ±``bonus_clip``. ``bonus_features`` names the engine features it reads (None: all).
    The gains (buffers, saved with the policy) start at 1 and are set once from routed states by
    :meth:`set_bonus_gains`: then a weight of 1 moves its term's bonus by about one score unit on typical
    states, whatever the feature's scale, and the clip keeps a load feature that explodes under a
    bad policy (a queue of 1,000 where PRISM keeps 10) from outvoting PRISM's bounded score."""

    def __init__(
        self,
        observation_space: spaces.Box,
        hidden: int = 64,
        slo_tpot_s: float = 0.1,
        weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        temperature: float = 0.05,
        residual: str = "mlp",
        bonus_clip: float = 3.0,
        bonus_features: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        if residual not in ("mlp", "bilinear"):
            raise ValueError(f"residual must be 'mlp' or 'bilinear', got {residual!r}")
        if not bonus_clip > 0:
            raise ValueError(f"bonus_clip must be positive, got {bonus_clip!r}")
        unknown = sorted(set(bonus_features or ()) - set(_COLUMN))
        if unknown:
            raise ValueError(f"bonus_features: unknown engine features {unknown}; the contract has {sorted(_COLUMN)}")
        super().__init__(observation_space, hidden)
        self.kind, self.bonus_clip = residual, float(bonus_clip)
        # the engine features the bonus reads (None: all); the others' gains stay 0
        named = set(_COLUMN if bonus_features is None else bonus_features)
        self.bonus_mask = np.array([f.name in named for f in ENGINE_FEATURES])
        self.bilinear = None  # (no parameter for the mlp kind: its saved runs keep their state dict)
        if residual == "bilinear":
            self.bilinear = nn.Parameter(torch.zeros(self.per_engine, self.request + 1, dtype=torch.float64))
            self.register_buffer("engine_gain", torch.as_tensor(self.bonus_mask, dtype=torch.float64))
            self.register_buffer("request_gain", torch.ones(self.request + 1, dtype=torch.float64))
            self.register_buffer("request_offset", torch.zeros(self.request + 1, dtype=torch.float64))
        self.zero_residual()
        self.base = PrismScore(self.slots, slo_tpot_s, weights)
        self.sharpness = nn.Parameter(torch.tensor(-math.log(temperature), dtype=torch.float32))

    def bonus_inputs(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bilinear bonus's engine inputs ``(batch, slots, features)`` and request inputs ``(batch,
        features + 1)``: centred over the present engines, scaled by the gains, clipped."""
        batch = observations.shape[0]
        engines = observations[:, : self.slots * self.per_engine].reshape(batch, self.slots, self.per_engine)
        engines = engines.double()
        present = engines[:, :, :1]  # ENGINE_FEATURES[0] is the "present" flag
        mean = (engines * present).sum(dim=1, keepdim=True) / present.sum(dim=1, keepdim=True).clamp(min=1.0)
        engines = torch.clamp((engines - mean) * self.engine_gain, -self.bonus_clip, self.bonus_clip)
        request = observations[:, self.slots * self.per_engine :].double()
        request = torch.cat([request, torch.ones_like(request[:, :1])], dim=1)
        request = torch.clamp((request - self.request_offset) * self.request_gain, -self.bonus_clip, self.bonus_clip)
        return engines, request

    def set_bonus_gains(self, observations: np.ndarray) -> np.ndarray:
        """Set the gains from routed (contract-scaled) observations: 1 / the engine feature's standard deviation
        across a decision's present engines (averaged over decisions); each request feature's mean as its
        offset and 1 / its standard deviation as its gain (the constant stays 1), so that the weights on a
        request feature say how requests *differ* (a tight TPOT class against a loose one) while the constant's
        say where the average request goes; 0 for a feature that never differs or is not among
        ``bonus_features`` (its weights then change nothing). Returns the mask of the weights that can matter."""
        observations = np.asarray(observations, dtype=float)
        engines = observations[:, : self.slots * self.per_engine].reshape(-1, self.slots, self.per_engine)
        spreads = [e[e[:, 0] > 0.5].std(axis=0) for e in engines if (e[:, 0] > 0.5).sum() > 1]
        if not spreads:
            raise ValueError("set_bonus_gains needs observations with at least two present engines")
        request = observations[:, self.slots * self.per_engine :]
        offset, spread = np.append(request.mean(axis=0), 0.0), np.append(request.std(axis=0), 1.0)
        gains = []
        for scale in (np.mean(spreads, axis=0), spread):
            gains.append(np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 1e-9))
        gains[0] = gains[0] * self.bonus_mask
        with torch.no_grad():
            self.engine_gain.copy_(torch.as_tensor(gains[0]))
            self.request_gain.copy_(torch.as_tensor(gains[1]))
            self.request_offset.copy_(torch.as_tensor(offset * (gains[1] > 0)))
        return self.active_weights()

    def active_weights(self) -> np.ndarray:
        """The mask of the bilinear weights that can change a decision: both their inputs' gains nonzero."""
        return np.outer(self.engine_gain.numpy() > 0, self.request_gain.numpy() > 0)

    def _bonus(self, observations: torch.Tensor) -> torch.Tensor:
        engines, request = self.bonus_inputs(observations)
        return torch.einsum("bse,er,br->bs", engines, self.bilinear, request)

    def bilinear_logits(self, observations: torch.Tensor) -> torch.Tensor:
        """The bilinear kind's slot logits (float32, as the policy's action head sees them)."""
        return ((self.base(observations) + self._bonus(observations)) * self.sharpness.double().exp()).float()

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        if self.kind == "bilinear":  # the shared scorer plays no part: only the critic's pooled context
            return torch.cat([self.bilinear_logits(observations), self.context(observations)], dim=1)
        out = super().forward(observations)
        # the float64 base decides the order; adding the float32 residual in float64 keeps it when it is zero
        base = self.base(observations) * self.sharpness.double().exp()
        logits = (base + out[:, : self.slots].double()).float()
        return torch.cat([logits, out[:, self.slots :]], dim=1)

    def zero_residual(self) -> None:
        """The residual to zero: the policy is PRISM (again)."""
        with torch.no_grad():
            self.scorer[-1].weight.zero_()
            self.scorer[-1].bias.zero_()
            if self.bilinear is not None:
                self.bilinear.zero_()

    def residual(self, observations: torch.Tensor) -> torch.Tensor:
        """The learned correction alone, in logits (for diagnostics: how far the policy has moved from PRISM)."""
        if self.kind == "bilinear":
            return (self._bonus(observations) * self.sharpness.double().exp()).float()
        return SlotFeatures.forward(self, observations)[:, : self.slots]


class ResidualSlotPolicy(_SlotActor, MaskableActorCriticPolicy):
    """MaskablePPO's policy with :class:`ResidualFeatures`: the actor is PRISM plus the residual, the critic
    reads them detached (as :class:`servegym.agents.slot_policy.SlotPolicy` does)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("features_extractor_class", ResidualFeatures)
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.features_extractor.zero_residual()  # SB3's orthogonal initialisation rewrote it
