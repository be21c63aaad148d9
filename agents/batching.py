"""Engine-level batching policies: SynergySched's LENS and Kossmann et al.'s LARRY.

vLLM's default and Sarathi live in the simulator (:mod:`servegym.envs.sim.policies`); these subclass the same
:class:`servegym.envs.sim.policies.BatchPolicy` and read engines through its read-only
:class:`servegym.envs.sim.policies.EngineView`. One policy object serves every engine of a cluster and keeps
per-engine state keyed by the engine's index; both learn from the cluster's notifications (they are
observers the cluster subscribes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from servegym.envs.sim.policies import BatchPolicy, EngineView
from servegym.envs.sim.request import Request
from servegym.envs.sim.view import RequestInfo
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.capacity import token_budget
from servegym.perfmodel.online import OnlineRefit


@dataclass
class Lens(BatchPolicy):
    """LENS: SLO-aware adaptive batching.

    Each step: a target step time grows with the waiting queue Q, ``T = T_min + (SLO_TPOT − T_min)·Q/Q_thr``
    clamped to [T_min, SLO_TPOT] — short steps when idle, steps up to the TPOT SLO under load; the
    engine's latency model (refitted online from its observed steps) is inverted for the largest token
    budget whose predicted step time meets the target with the running decodes in the batch; the budget
    is filled greedily — every decode one token, running prefills shortest-remaining first in chunks of at
    most ``max_chunk_tokens``, then waiting requests FCFS. Inverting with the actual decode set as the
    base batch is the allocation whose predicted time is closest to the target from below, which is
    what LENS's search over candidate batch sizes selects.
    """

    slo_tpot_s: float = 0.05
    t_min_s: float = 0.015
    queue_threshold: int = 5
    max_chunk_tokens: int = 512
    online_refit: bool = True
    refit_threshold: float = 0.15
    name: str = "lens"
    supports_decode_jumps: bool = True  # the budget never drops below the running decodes
    prefill_order: str = "shortest_remaining"
    models: dict[int, OnlineRefit] = field(default_factory=dict, repr=False)

    def attach(self, engine: EngineView) -> None:
        self.models[engine.index] = OnlineRefit(engine.perf, threshold=self.refit_threshold)

    def on_step(self, engine: EngineView, batch: StepBatch, latency_s: float) -> None:
        if self.online_refit:
            self.models[engine.index].observe(batch, latency_s * 1e3)

    def target_s(self, queue: int) -> float:
        target = self.t_min_s + (self.slo_tpot_s - self.t_min_s) * queue / self.queue_threshold
        return min(max(target, self.t_min_s), self.slo_tpot_s)

    def token_budget(self, engine: EngineView) -> int:
        decodes = engine.num_decodes
        base = StepBatch.decode(decodes, engine.decode_context_tokens) if decodes else None
        extra = token_budget(
            self.models[engine.index],
            self.target_s(engine.num_waiting) * 1e3,
            base=base,
            max_tokens=engine.max_num_batched_tokens,
        )
        return decodes + extra


@dataclass
class Larry(BatchPolicy):
    """LARRY-style memory-aware admission and preemption (reading of Kossmann et al., rules unpublished).

    Admission: a waiting request is admitted only if the engine's free KV blocks cover its expected
    footprint (prompt + expected output) plus a reserve for the running decodes' expected growth (half
    an expected output each), unless nothing is running. Expected output = running mean of the lengths
    this engine has completed. Preemption, when a block is missing anyway: the running request that
    frees the most blocks per token of lost work (blocks held / tokens computed), newest on ties — not
    vLLM's newest-first.
    """

    output_prior: float = 256.0
    reserve_fraction: float = 0.5
    name: str = "larry"
    supports_decode_jumps: bool = True
    mean_output: dict[int, float] = field(default_factory=dict, repr=False)

    def attach(self, engine: EngineView) -> None:
        self.mean_output[engine.index] = self.output_prior

    def on_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        if instance in self.mean_output:  # the engine that finished it learns its length
            mean = self.mean_output[instance]
            self.mean_output[instance] = mean + 0.02 * (output_tokens - mean)

    def admit(self, engine: EngineView, request: Request, blocks: int) -> bool:
        if not engine.num_running:
            return True
        expected = self.mean_output[engine.index]
        footprint = -(-(request.prefill_target + int(expected)) // engine.block_size)
        reserve = engine.num_decodes * self.reserve_fraction * expected / engine.block_size
        return engine.free_blocks >= footprint + reserve

    def choose_victim(self, engine: EngineView) -> Request:
        order = engine.running_requests()
        return max(reversed(order), key=lambda r: engine.held_blocks(r) / (engine.computed_tokens(r) + 1))
