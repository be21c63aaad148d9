"""Prefill/decode pool policies: Arrow's SLO-aware scheduler with elastic pools, and an SLA planner in
the manner of NVIDIA Dynamo's. The static ratio is :class:`servegym.envs.sim.policies.StaticPools`.
"""

from __future__ import annotations

import math

from servegym.agents.routing.classic import argmin
from servegym.envs.features import EngineModels
from servegym.envs.sim.policies import PoolPolicy, RoutingPolicy
from servegym.envs.sim.roles import Role
from servegym.envs.sim.view import ClusterView, EngineInfo, RequestInfo
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.capacity import predict_ttft

DECODE_CONTEXT_GUESS = 1024  # mean context per resident decode when a token count must become a batch


class Arrow(RoutingPolicy, PoolPolicy):
    """Arrow (arXiv 2505.11916): routes both phases and flips instance roles; use it as router *and* pool policy.

    Request scheduling (Alg. 1), lexicographic costs: a prefill on instance i costs (decode tokens resident
    on i, predicted time to prefill i's queue including r) and meets the SLO iff the second ≤ SLO_TTFT; a
    decode on i costs (prefill tokens pending on i, resident decode tokens + r − MT(i)) and meets the SLO
    iff the second ≤ 0, where MT(i) is the most resident tokens whose decode step still meets SLO_TPOT. The
    cheapest instance of the right pool that meets the SLO wins; if none does, the cheapest regardless, and
    a flip towards the short pool is requested (decode→prefill only while decode load is low). A decode
    whose prefill instance became a decode instance stays there (the simulator does that).

    Monitoring and flips (Alg. 2-3), every interval: prefill load = predicted resident prefill time /
    SLO_TTFT per instance, decode load = observed inter-token time / SLO_TPOT; pool load = mean. Flip one
    prefill instance to decode when decode load stays above ``decode_high`` for ``sustain`` intervals or
    prefill load falls below ``prefill_low``; flip one decode instance to prefill when prefill load stays
    above ``prefill_high`` while decode load is below ``decode_low``. ``cooldown_s`` between flips. The
    flipped instance is the one with the least resident work, preferring one already serving the other
    phase. Flips take effect through the cluster's monitor, so a router-requested flip waits for the
    next tick.
    """

    def __init__(
        self,
        slo_ttft_s: float = 2.0,
        slo_tpot_s: float = 0.1,
        decode_high: float = 1.0,
        prefill_low: float = 0.5,
        prefill_high: float = 1.0,
        decode_low: float = 0.5,
        sustain: int = 3,
        cooldown_s: float = 10.0,
    ) -> None:
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.decode_high, self.prefill_low, self.prefill_high, self.decode_low = (
            decode_high,
            prefill_low,
            prefill_high,
            decode_low,
        )
        self.sustain, self.cooldown_s = sustain, cooldown_s
        self.models = EngineModels()
        self._max_tokens: dict[tuple, int] = {}
        self._decode_streak = self._prefill_streak = 0
        self._last_flip = -math.inf
        self._wanted: Role | None = None  # a pool the router found short of capacity

    # -- helpers ---------------------------------------------------------------------------------------
    def prefill_time_s(self, view: ClusterView, i: int, extra_tokens: int = 0) -> float:
        """Predicted time to compute instance i's pending prefill work (plus ``extra_tokens``)."""
        s, info = view.snapshots[i], view.engines[i]
        queued = s.pending_prefill_tokens + extra_tokens
        if queued <= 0:
            return 0.0
        return (
            predict_ttft(
                self.models(info),
                1,
                queued_prefill_tokens=queued - 1,
                running=s.running_decodes(),
                max_num_batched_tokens=info.max_num_batched_tokens,
            )
            / 1e3
        )

    def max_decode_tokens(self, info: EngineInfo) -> int:
        """MT: the most resident decode tokens whose step time meets SLO_TPOT (Arrow's linear model, inverted)."""
        key = (info.gpu, info.model, info.tp)
        if key not in self._max_tokens:
            perf, low, high = self.models(info), 0, 1 << 24
            while high - low > 1:
                mid = (low + high) // 2
                seqs = max(1, mid // DECODE_CONTEXT_GUESS)
                if perf.predict(StepBatch.decode(seqs, max(0, mid - seqs))) / 1e3 <= self.slo_tpot_s:
                    low = mid
                else:
                    high = mid
            self._max_tokens[key] = low
        return self._max_tokens[key]

    # -- routing ---------------------------------------------------------------------------------------
    def route(self, request: RequestInfo, view: ClusterView) -> int:
        candidates = view.prefill_candidates
        costs = {
            i: (view.snapshots[i].decode_kv_tokens, self.prefill_time_s(view, i, request.prompt_tokens))
            for i in candidates
        }
        meeting = [i for i in candidates if costs[i][1] <= self.slo_ttft_s]
        if not meeting:
            self._wanted = Role.PREFILL
        return argmin(meeting or candidates, costs.__getitem__)

    def route_decode(self, request: RequestInfo, view: ClusterView) -> int:
        candidates = view.decode_candidates
        costs = {}
        for i in candidates:
            s = view.snapshots[i]
            costs[i] = (
                s.pending_prefill_tokens,
                s.decode_kv_tokens + request.prompt_tokens - self.max_decode_tokens(view.engines[i]),
            )
        meeting = [i for i in candidates if costs[i][1] <= 0]
        if not meeting:
            self._wanted = Role.DECODE
        return argmin(meeting or candidates, costs.__getitem__)

    # -- pools -----------------------------------------------------------------------------------------
    def loads(self, view: ClusterView) -> tuple[float, float]:
        prefill = [i for i, r in enumerate(view.roles) if r is Role.PREFILL]
        decode = [i for i, r in enumerate(view.roles) if r is Role.DECODE]
        prefill_load = (
            sum(self.prefill_time_s(view, i) for i in prefill) / len(prefill) / self.slo_ttft_s if prefill else 0.0
        )
        decode_load = (
            sum(view.snapshots[i].recent_step_ms / 1e3 for i in decode) / len(decode) / self.slo_tpot_s
            if decode
            else 0.0
        )
        return prefill_load, decode_load

    def rebalance(self, view: ClusterView) -> list[tuple[int, Role]]:
        prefill_load, decode_load = self.loads(view)
        self._decode_streak = self._decode_streak + 1 if decode_load > self.decode_high else 0
        self._prefill_streak = self._prefill_streak + 1 if prefill_load > self.prefill_high else 0
        wanted, self._wanted = self._wanted, None
        if view.now_s - self._last_flip < self.cooldown_s:
            return []
        # reading: "prefill load low" moves capacity to decode only while decode is busy (not when idle)
        idle_prefill = prefill_load < self.prefill_low and decode_load > self.decode_low
        to_decode = self._decode_streak >= self.sustain or idle_prefill or wanted is Role.DECODE
        to_prefill = (self._prefill_streak >= self.sustain or wanted is Role.PREFILL) and decode_load < self.decode_low
        if to_prefill:
            return self._flip(view, Role.DECODE, Role.PREFILL)
        if to_decode:
            return self._flip(view, Role.PREFILL, Role.DECODE)
        return []

    def _flip(self, view: ClusterView, source: Role, target: Role) -> list[tuple[int, Role]]:
        pool = [i for i, r in enumerate(view.roles) if r == source]
        if len(pool) < 2:
            return []

        def work(i: int) -> tuple[int, int]:
            s = view.snapshots[i]
            # prefer an instance already serving the other phase, then the least resident work
            serving_other = s.num_decodes > 0 if source is Role.PREFILL else s.pending_prefill_tokens > 0
            return (0 if serving_other else 1, s.pending_prefill_tokens + s.decode_kv_tokens)

        choice = argmin(pool, work)
        self._last_flip = view.now_s
        self._decode_streak = self._prefill_streak = 0
        return [(choice, target)]


class SlaPlanner(PoolPolicy):
    """Dynamo-style SLA planner: size the prefill and decode pools for the forecast load.

    Every interval it forecasts the arrival rate and mean prompt/output lengths (EWMA of what arrived and
    finished), and asks the performance model how many prefill instances keep prefill utilisation under
    ``target_utilisation`` (prefill throughput at full token budgets) and how many decode instances hold
    the expected concurrent decodes (Little's law: rate × output × TPOT) within the TPOT SLO; then flips
    one instance per interval towards those counts, after ``cooldown_s``.
    """

    def __init__(
        self,
        slo_tpot_s: float = 0.1,
        target_utilisation: float = 0.7,
        smoothing: float = 0.3,
        cooldown_s: float = 10.0,
        output_prior: float = 256.0,
    ) -> None:
        self.slo_tpot_s, self.target_utilisation, self.smoothing = slo_tpot_s, target_utilisation, smoothing
        self.cooldown_s = cooldown_s
        self.models = EngineModels()
        self.rate = self.prompt = 0.0
        self.output = output_prior
        self._arrivals = self._prompt_sum = 0
        self._last_tick = 0.0
        self._last_flip = -math.inf

    def on_arrival(self, request: RequestInfo) -> None:
        self._arrivals += 1
        self._prompt_sum += request.prompt_tokens

    def on_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        self.output += 0.02 * (output_tokens - self.output)

    def targets(self, view: ClusterView) -> tuple[int, int]:
        """(prefill, decode) instance counts for the forecast load, clipped to the cluster."""
        info = view.engines[0]
        perf = self.models(info)
        budget = info.max_num_batched_tokens
        prefill_tps = budget / (perf.predict(StepBatch.prefill(budget)) / 1e3)
        prefill = math.ceil(self.rate * self.prompt / (prefill_tps * self.target_utilisation))
        concurrent = self.rate * self.output * self.slo_tpot_s
        per_instance = 1
        while per_instance < info.max_num_seqs:
            ctx = self.prompt + self.output / 2
            step = perf.predict(StepBatch.decode(per_instance * 2, int(per_instance * 2 * ctx))) / 1e3
            if step > self.slo_tpot_s:
                break
            per_instance *= 2
        decode = math.ceil(concurrent / per_instance)
        total = len(view.roles)
        prefill = min(max(prefill, 1), total - 1)
        return prefill, max(1, min(decode, total - prefill))

    def rebalance(self, view: ClusterView) -> list[tuple[int, Role]]:
        elapsed = view.now_s - self._last_tick
        if elapsed > 0 and self._arrivals:
            self.rate += self.smoothing * (self._arrivals / elapsed - self.rate)
            self.prompt += self.smoothing * (self._prompt_sum / self._arrivals - self.prompt)
        self._last_tick, self._arrivals, self._prompt_sum = view.now_s, 0, 0
        if view.now_s - self._last_flip < self.cooldown_s:
            return []
        want_prefill, _ = self.targets(view)
        prefill = [i for i, r in enumerate(view.roles) if r is Role.PREFILL]
        decode = [i for i, r in enumerate(view.roles) if r is Role.DECODE]
        if len(prefill) < want_prefill and len(decode) > 1:
            choice = argmin(decode, lambda i: view.snapshots[i].decode_kv_tokens)
            flip = (choice, Role.PREFILL)
        elif len(prefill) > want_prefill and len(prefill) > 1:
            choice = argmin(prefill, lambda i: view.snapshots[i].pending_prefill_tokens)
            flip = (choice, Role.DECODE)
        else:
            return []
        self._last_flip = view.now_s
        return [flip]
