"""The observation contract: one named feature set for environments, heuristics, learned policies and the
router service.

Features are computed from a :class:`envs.sim.view.ClusterView` (what a router can see: engine metrics as
vLLM exports them, possibly stale, plus what engines push, the router's own bookkeeping and static facts)
and the :class:`envs.sim.view.RequestInfo` of the decision, with performance-model predictions. The
simulator builds the view from its snapshots; a router in front of real engines builds the same view
from scraped metrics, so a policy trained here runs unchanged there.

Every feature has a unit, a scale (raw / scale is what the array holds) and finite bounds; values are
clipped to the bounds and clips are counted. Engine features are laid out per engine slot, padded to
``max_instances`` (padding rows are zero, with ``present = 0``), followed by the request features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.sim.view import ClusterView, EngineInfo, EngineSnapshot, LocalCorrection, RequestInfo
from perfmodel.batch import StepBatch
from perfmodel.capacity import predict_ttft
from perfmodel.profile import registry_version
from perfmodel.structural import StructuralModel, structural_model

FEATURE_VERSION = 2  # 2: prompts sent since the snapshot (PRISM's decision-lag correction) in the load features


@dataclass(frozen=True)
class Feature:
    """One column: ``value = clip(raw / scale, low, high)``."""

    name: str
    unit: str
    scale: float
    high: float
    doc: str
    low: float = 0.0


ENGINE_FEATURES: tuple[Feature, ...] = (
    Feature("present", "flag", 1.0, 1.0, "1 for an engine, 0 for a padding slot"),
    Feature("accepts_new", "flag", 1.0, 1.0, "role takes new requests (prefill or both, not draining)"),
    Feature("accepts_decode", "flag", 1.0, 1.0, "role takes handed-over decodes (decode or both)"),
    Feature("running", "requests", 256.0, 4.0, "vllm:num_requests_running"),
    Feature("waiting", "requests", 256.0, 4.0, "vllm:num_requests_waiting"),
    Feature("kv_usage", "fraction", 1.0, 1.0, "vllm:kv_cache_usage_perc"),
    Feature("outstanding", "requests", 256.0, 4.0, "requests this router sent and has not seen finish"),
    Feature("outstanding_prompt", "tokens", 100_000.0, 10.0, "their prompt tokens"),
    Feature("pending_prefill_s", "s", 10.0, 10.0, "pushed pending prefill tokens / prefill capacity"),
    Feature("sent_since_snapshot", "requests", 16.0, 8.0, "requests this router sent here since the snapshot"),
    Feature(
        "corrected_pending_s", "s", 10.0, 10.0, "(pushed pending + prompt tokens sent since the snapshot) / capacity"
    ),
    Feature("decode_kv_share", "fraction", 1.0, 1.0, "resident decode KV tokens / KV capacity"),
    Feature("tokens_per_step", "tokens", 8192.0, 2.0, "recent tokens per step (scheduling mode)"),
    Feature("step_ms", "ms", 100.0, 10.0, "recent step latency (observed inter-token time)"),
    Feature("predicted_step_ms", "ms", 100.0, 10.0, "performance model: next step latency"),
    Feature("predicted_ttft_s", "s", 10.0, 10.0, "performance model: TTFT if routed here (incl. prompts sent since)"),
    Feature("predicted_tpot_ms", "ms", 100.0, 10.0, "performance model: decode step with this request added"),
    Feature("prefill_capacity", "tokens/s", 100_000.0, 10.0, "static: prefill tokens/s at full budget"),
    Feature("kv_capacity", "tokens", 1_000_000.0, 10.0, "static: KV cache capacity"),
    Feature("affinity", "flag", 1.0, 1.0, "the request's session was last routed here"),
)
REQUEST_FEATURES: tuple[Feature, ...] = (
    Feature("prompt_tokens", "tokens", 8192.0, 16.0, "the request's prompt length"),
    Feature("expected_output", "tokens", 1024.0, 16.0, "true output length in oracle mode, else observed mean"),
    Feature("slo_ttft_s", "s", 10.0, 10.0, "the request's TTFT SLO (0 if none)"),
    Feature("slo_tpot_ms", "ms", 100.0, 10.0, "the request's TPOT SLO (0 if none)"),
    Feature("load", "requests", 1024.0, 8.0, "requests outstanding cluster-wide"),
    Feature("decode_phase", "flag", 1.0, 1.0, "1 when placing a prefilled request's decode (PD clusters)"),
)


class EngineModels:
    """The performance-model side of every predictive router and of the features: each engine's
    structural model (the one the simulator's engines share, :func:`perfmodel.structural.structural_model`)
    and its prefill capacity."""

    def __init__(self) -> None:
        self._capacity: dict[tuple, float] = {}

    def __call__(self, info: EngineInfo) -> StructuralModel:
        return structural_model(
            info.gpu, info.model, tp=info.tp, dtype=info.dtype, profile=info.profile, cuda_graphs=info.cuda_graphs
        )

    def prefill_capacity(self, info: EngineInfo) -> float:
        """Tokens per second the engine computes with full token budgets (PRISM's capacity)."""
        key = (info.gpu, info.model, info.tp, info.dtype, info.profile, info.cuda_graphs, registry_version(),
               info.max_num_batched_tokens)  # fmt: skip
        if key not in self._capacity:
            budget = info.max_num_batched_tokens
            self._capacity[key] = budget / (self(info).predict(StepBatch.prefill(budget)) / 1e3)
        return self._capacity[key]

    def routed_latency_ms(
        self, info: EngineInfo, snap: EngineSnapshot, prompt_tokens: int, queued_extra: int = 0
    ) -> tuple[float, float]:
        """Predicted TTFT and TPOT (ms) of a request of ``prompt_tokens`` routed to this engine: through its
        pending prefill work (plus ``queued_extra`` tokens sent since the snapshot) with its decodes held
        fixed, then a decode step of its batch with this request added."""
        perf = self(info)
        ttft = predict_ttft(
            perf,
            prompt_tokens,
            queued_prefill_tokens=snap.pending_prefill_tokens + queued_extra,
            running=snap.running_decodes(),
            max_num_batched_tokens=info.max_num_batched_tokens,
        )
        resident = max(0, snap.decode_kv_tokens - snap.num_decodes)
        tpot = perf.predict(StepBatch.decode(snap.num_decodes + 1, resident + prompt_tokens))
        return ttft, tpot


@dataclass
class FeatureContext:
    """Router-side state the features need: engine models, session table, output estimate."""

    output_mean: float = 256.0
    engines: EngineModels = field(default_factory=EngineModels)
    sessions: dict[int, int] = field(default_factory=dict)

    correction: LocalCorrection = field(default_factory=LocalCorrection)

    def observe_route(self, request: RequestInfo, engine: int, view: ClusterView) -> None:
        """Record a placement: the session table and what was sent since the engine's snapshot."""
        self.correction.record(view, engine, request)
        if request.session_id >= 0:
            self.sessions[request.session_id] = engine

    def observe_completion(self, output_tokens: int) -> None:
        self.output_mean += 0.01 * (output_tokens - self.output_mean)


class FeatureSpec:
    """Names, order, units, bounds and the computation of the observation vector."""

    def __init__(self, max_instances: int) -> None:
        if max_instances < 1:
            raise ValueError(f"max_instances must be at least 1, got {max_instances}")
        self.max_instances = max_instances
        per_engine = len(ENGINE_FEATURES)
        self.low = np.array(
            [f.low for f in ENGINE_FEATURES] * max_instances + [f.low for f in REQUEST_FEATURES], dtype=np.float32
        )
        self.high = np.array(
            [f.high for f in ENGINE_FEATURES] * max_instances + [f.high for f in REQUEST_FEATURES], dtype=np.float32
        )
        self._engine_scale = np.array([f.scale for f in ENGINE_FEATURES])
        self._request_scale = np.array([f.scale for f in REQUEST_FEATURES])
        self.size = per_engine * max_instances + len(REQUEST_FEATURES)

    def manifest(self) -> dict:
        """Everything a consumer must agree on (the router service checks this against an exported policy)."""
        return {
            "version": FEATURE_VERSION,
            "max_instances": self.max_instances,
            "engine_features": [vars(f) for f in ENGINE_FEATURES],
            "request_features": [vars(f) for f in REQUEST_FEATURES],
            "layout": "engine slots (max_instances x engine_features, row-major) then request features",
        }

    def raw(
        self, view: ClusterView, request: RequestInfo, context: FeatureContext, decode_phase: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled engine matrix (num_engines x features) and request vector, in the features' units."""
        if view.num_engines > self.max_instances:
            raise ValueError(f"the cluster has {view.num_engines} engines; the spec holds {self.max_instances}")
        expected = float(request.output_tokens) if request.output_tokens is not None else context.output_mean
        rows = np.zeros((view.num_engines, len(ENGINE_FEATURES)))
        last = context.sessions.get(request.session_id) if request.session_id >= 0 else None
        for i, (info, snap) in enumerate(zip(view.engines, view.snapshots, strict=True)):
            role = view.roles[i]
            capacity = context.engines.prefill_capacity(info)
            queued = snap.pending_prefill_tokens
            sent_requests, sent_tokens = context.correction.sent(view, i)
            ttft_ms, tpot = context.engines.routed_latency_ms(
                info, snap, request.prompt_tokens, queued_extra=sent_tokens
            )
            ttft = ttft_ms / 1e3
            rows[i] = (
                1.0,
                float(role.accepts_new),
                float(role.accepts_decode),
                snap.num_requests_running,
                snap.num_requests_waiting,
                snap.kv_cache_usage_perc,
                view.outstanding_requests[i],
                view.outstanding_prompt_tokens[i],
                queued / capacity,
                sent_requests,
                (queued + sent_tokens) / capacity,
                snap.decode_kv_tokens / max(info.kv_capacity_tokens, 1),
                snap.recent_tokens_per_step,
                snap.recent_step_ms,
                snap.predicted_step_ms,
                ttft,
                tpot,
                capacity,
                info.kv_capacity_tokens,
                float(last == i),
            )
        slo = request.slo
        req = np.array(
            [
                request.prompt_tokens,
                expected,
                slo.ttft_s or 0.0,
                (slo.tpot_s or 0.0) * 1e3,
                sum(view.outstanding_requests),
                float(decode_phase),
            ],
            dtype=float,
        )
        return rows, req

    def vector(
        self, view: ClusterView, request: RequestInfo, context: FeatureContext, decode_phase: bool = False
    ) -> tuple[np.ndarray, int]:
        """The float32 observation and how many values were clipped to their bounds."""
        rows, req = self.raw(view, request, context, decode_phase)
        engines = np.zeros((self.max_instances, len(ENGINE_FEATURES)))
        engines[: len(rows)] = rows / self._engine_scale
        flat = np.concatenate([engines.ravel(), req / self._request_scale])
        clipped = int(np.sum((flat < self.low) | (flat > self.high)))
        return np.clip(flat, self.low, self.high).astype(np.float32), clipped

    def named(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        """Per-feature arrays from an observation: engine features as (max_instances,) arrays, request scalars."""
        per_engine = len(ENGINE_FEATURES)
        engines = observation[: per_engine * self.max_instances].reshape(self.max_instances, per_engine)
        out = {f.name: engines[:, j] for j, f in enumerate(ENGINE_FEATURES)}
        tail = observation[per_engine * self.max_instances :]
        out.update({f"request.{f.name}": tail[j] for j, f in enumerate(REQUEST_FEATURES)})
        return out
