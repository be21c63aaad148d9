"""The observation contract: one named feature set for environments, heuristics, learned policies and the
router service.

Features are computed from a :class:`servegym.envs.sim.view.ClusterView` (what a router can see: engine metrics as
vLLM exports them, possibly stale, what it knows from its own traffic — :mod:`servegym.envs.sim.router_tap` — and
static facts)
and the :class:`servegym.envs.sim.view.RequestInfo` of the decision, with performance-model predictions. The
simulator builds the view from its snapshots; a router in front of real engines builds the same view
from scraped metrics, so a policy trained here runs unchanged there.

Every feature has a unit, a scale (raw / scale is what the array holds) and finite bounds; values are
clipped to the bounds and clips are counted. Engine features are laid out per engine slot, padded to
``max_instances`` (padding rows are zero, with ``present = 0``), followed by the request features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from servegym.envs.sim.prefix_index import PrefixIndex, capacity_segments
from servegym.envs.sim.view import ClusterView, EngineInfo, EngineSnapshot, LocalCorrection, RequestInfo
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.capacity import predict_ttft, ttft_steps
from servegym.perfmodel.profile import registry_version
from servegym.perfmodel.structural import StructuralModel, structural_model

# 2: prompts sent since the snapshot (PRISM's decision-lag correction) in the load features;
# 3: pending prefill, decodes, their KV, step time and next step from the router tap (live, router-side,
#    the same in the simulator and the router service); no corrected pending; tokens_per_step -> next_step_tokens;
# 4: affinity within AFFINITY_WINDOW_S (PRISM's s_kv), so PRISM's whole score is a function of the observation
# 5: prefix_match and cache_fill from the router's prefix index (what PrefixAware and llm-d's scorer route on)
FEATURE_VERSION = 5
AFFINITY_WINDOW_S = 300.0  # a session routed here longer ago than this has no affinity (PRISM's window)


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
    Feature("pending_prefill_s", "s", 10.0, 10.0, "tapped prompt tokens awaiting their first token / prefill capacity"),
    Feature("sent_since_snapshot", "requests", 16.0, 8.0, "requests this router sent here since the gauges' scrape"),
    Feature("decode_kv_share", "fraction", 1.0, 1.0, "tapped decode KV tokens (prompt + streamed) / KV capacity"),
    Feature("next_step_tokens", "tokens", 8192.0, 2.0, "tapped decodes + a budget chunk of pending prefill"),
    Feature("step_ms", "ms", 100.0, 10.0, "EWMA of the inter-token gaps the router relayed"),
    Feature("predicted_step_ms", "ms", 100.0, 10.0, "performance model: that next step's latency"),
    Feature("predicted_ttft_s", "s", 10.0, 10.0, "performance model: TTFT if routed here, through the pending prefill"),
    Feature("predicted_tpot_ms", "ms", 100.0, 10.0, "performance model: decode step with this request added"),
    Feature("prefill_capacity", "tokens/s", 100_000.0, 10.0, "static: prefill tokens/s at full budget"),
    Feature("kv_capacity", "tokens", 1_000_000.0, 10.0, "static: KV cache capacity"),
    Feature("affinity", "flag", 1.0, 1.0, "the request's session was last routed here, within 300 s"),
    Feature("prefix_match", "fraction", 1.0, 1.0, "share of the prompt's prefix segments this router sent here (LRU)"),
    Feature("cache_fill", "fraction", 1.0, 1.0, "prefix segments this router believes cached here / KV capacity"),
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
    structural model (the one the simulator's engines share, :func:`servegym.perfmodel.structural.structural_model`)
    and its prefill capacity."""

    def __init__(self) -> None:
        # per EngineInfo object (a cluster's infos live as long as it does): (registry version, model, capacity)
        self._known: dict[int, tuple[int, EngineInfo, StructuralModel, float]] = {}

    def _entry(self, info: EngineInfo) -> tuple[int, EngineInfo, StructuralModel, float]:
        entry, version = self._known.get(id(info)), registry_version()
        if entry is None or entry[0] != version or entry[1] is not info:
            model = structural_model(
                info.gpu, info.model, tp=info.tp, dtype=info.dtype, profile=info.profile, cuda_graphs=info.cuda_graphs
            )
            budget = info.max_num_batched_tokens
            entry = (version, info, model, budget / (model.predict(StepBatch.prefill(budget)) / 1e3))
            if len(self._known) > 4096:  # infos of clusters long gone
                self._known.clear()
            self._known[id(info)] = entry
        return entry

    def __call__(self, info: EngineInfo) -> StructuralModel:
        return self._entry(info)[2]

    def prefill_capacity(self, info: EngineInfo) -> float:
        """Tokens per second the engine computes with full token budgets (PRISM's capacity)."""
        return self._entry(info)[3]

    def routed_latency_ms(self, info: EngineInfo, snap: EngineSnapshot, prompt_tokens: int) -> tuple[float, float]:
        """Predicted TTFT and TPOT (ms) of a request of ``prompt_tokens`` routed to this engine: through its
        pending prefill work with its decodes held fixed, then a decode step of its batch with this
        request added."""
        perf = self(info)
        ttft = predict_ttft(
            perf,
            prompt_tokens,
            queued_prefill_tokens=snap.pending_prefill_tokens,
            running=snap.running_decodes(),
            max_num_batched_tokens=info.max_num_batched_tokens,
        )
        resident = max(0, snap.decode_kv_tokens - snap.num_decodes)
        tpot = perf.predict(StepBatch.decode(snap.num_decodes + 1, resident + prompt_tokens))
        return ttft, tpot

    def routed_latency_many(
        self, infos: list[EngineInfo], snaps: list[EngineSnapshot], prompt_tokens: int
    ) -> tuple[list[float], list[float]]:
        """:meth:`routed_latency_ms` for every engine, without building intermediate batches (the hot path
        of every decision: the performance model remembers the linear-layer times of repeated counts)."""
        ttfts, tpots = [], []
        for info, snap in zip(infos, snaps, strict=True):
            perf, d = self(info), snap.num_decodes
            kv = max(snap.decode_kv_tokens, d) if d else 0  # the running decodes' KV as running_decodes() has it
            ttft = 0.0
            for steps, tokens, seqs, decodes, pairs, chunk_kv, decode_kv in ttft_steps(
                prompt_tokens, snap.pending_prefill_tokens, d, info.max_num_batched_tokens
            ):
                batch = StepBatch(d + tokens, d + seqs, d + decodes, kv + pairs, kv + chunk_kv, kv + decode_kv)
                ttft += steps * perf.predict(batch)
            total = kv - d + prompt_tokens + d + 1  # a decode step with this request added
            ttfts.append(ttft)
            tpots.append(perf.predict(StepBatch(d + 1, d + 1, d + 1, total, total, total)))
        return ttfts, tpots


@dataclass
class FeatureContext:
    """Router-side state the features need: engine models, session table, prefix index, output estimate."""

    output_mean: float = 256.0
    engines: EngineModels = field(default_factory=EngineModels)
    sessions: dict[int, tuple[int, float]] = field(default_factory=dict)  # session -> (engine, when routed)

    correction: LocalCorrection = field(default_factory=LocalCorrection)  # requests sent since each scrape
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)  # prompt segments sent to each engine

    def observe_route(self, request: RequestInfo, engine: int, view: ClusterView) -> None:
        """Record a placement: the session table, the prefix index and what was sent since the engine's
        gauges were scraped."""
        self.correction.record(view, engine, request)
        if request.session_id >= 0:
            self.sessions[request.session_id] = (engine, view.now_s)
        if request.hash_ids:
            self.prefixes.add(engine, request.hash_ids, capacity_segments(view, engine))

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

    def feature_names(self) -> list[str]:
        """Observation column names in the layout (``engine3.kv_usage``, ..., ``request.prompt_tokens``)."""
        return feature_names(self.manifest())

    def raw(
        self, view: ClusterView, request: RequestInfo, context: FeatureContext, decode_phase: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled engine matrix (num_engines x features) and request vector, in the features' units."""
        if view.num_engines > self.max_instances:
            raise ValueError(f"the cluster has {view.num_engines} engines; the spec holds {self.max_instances}")
        expected = float(request.output_tokens) if request.output_tokens is not None else context.output_mean
        engines, snapshots = view.engines, view.snapshots
        last = context.sessions.get(request.session_id) if request.session_id >= 0 else None
        affine = last[0] if last is not None and view.now_s - last[1] <= AFFINITY_WINDOW_S else None
        ttft_ms, tpot = context.engines.routed_latency_many(engines, snapshots, request.prompt_tokens)
        hashes = request.hash_ids
        share = 1.0 / len(hashes) if hashes else 0.0
        outstanding, outstanding_prompt, correction = (
            view.outstanding_requests,
            view.outstanding_prompt_tokens,
            context.correction,
        )
        rows = []
        for i, (info, snap) in enumerate(zip(engines, snapshots, strict=True)):
            role = view.roles[i]
            capacity = context.engines.prefill_capacity(info)
            rows.append((
                1.0,
                float(role.accepts_new),
                float(role.accepts_decode),
                snap.num_requests_running,
                snap.num_requests_waiting,
                snap.kv_cache_usage_perc,
                outstanding[i],
                outstanding_prompt[i],
                snap.pending_prefill_tokens / capacity,
                correction.requests(view, i),
                snap.decode_kv_tokens / max(info.kv_capacity_tokens, 1),
                snap.next_step_tokens,
                snap.recent_step_ms,
                snap.predicted_step_ms,
                ttft_ms[i] / 1e3,
                tpot[i],
                capacity,
                info.kv_capacity_tokens,
                float(affine == i),
                context.prefixes.match(i, hashes) * share if hashes else 0.0,
                context.prefixes.size(i) / capacity_segments(view, i),
            ))  # fmt: skip
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
        return np.array(rows, dtype=float).reshape(len(rows), len(ENGINE_FEATURES)), req

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


def feature_names(manifest: dict) -> list[str]:
    """Column names of the observation a contract manifest (:meth:`FeatureSpec.manifest`, or a saved policy's
    copy of it) describes: engine slots row-major, then the request features."""
    engine = [f["name"] for f in manifest["engine_features"]]
    request = [f["name"] for f in manifest["request_features"]]
    return [f"engine{i}.{n}" for i in range(int(manifest["max_instances"])) for n in engine] + [
        f"request.{n}" for n in request
    ]


def observation_table(extra_rows: tuple[tuple[str, str, str], ...] = ()) -> str:
    """The observation as a table (what the environments' spec sheets show): every engine feature per
    slot, then the request features, each with its unit, scale and bounds; ``extra_rows`` (name, unit,
    meaning) for what an environment appends."""
    lines = ["| feature | unit | scale | bounds (scaled) | meaning |", "|---|---|---|---|---|"]
    for prefix, features in (("engine[i].", ENGINE_FEATURES), ("request.", REQUEST_FEATURES)):
        for f in features:
            lines.append(f"| {prefix}{f.name} | {f.unit} | {f.scale:g} | [{f.low:g}, {f.high:g}] | {f.doc} |")
    lines.extend(f"| {name} | {unit} | 1 | [0, 1] | {meaning} |" for name, unit, meaning in extra_rows)
    return "\n".join(lines)
