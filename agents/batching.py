"""Engine-level batching policies: SynergySched's LENS and Kossmann et al.'s LARRY.

vLLM's default and Sarathi live in the simulator (:mod:`envs.sim.engine`); these plug into the same
:class:`envs.sim.engine.BatchPolicy` protocol. One policy object serves every engine of a cluster and
keeps per-engine state keyed by the engine's index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envs.sim.engine import Engine
from envs.sim.request import Request
from perfmodel.batch import StepBatch
from perfmodel.capacity import token_budget
from perfmodel.online import OnlineRefit


@dataclass
class Lens:
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

    def attach(self, engine: Engine) -> None:
        model = OnlineRefit(engine.perf, threshold=self.refit_threshold)
        self.models[engine.index] = model
        if self.online_refit:
            engine.step_observers.append(lambda _engine, batch, latency_s: model.observe(batch, latency_s * 1e3))

    def target_s(self, queue: int) -> float:
        target = self.t_min_s + (self.slo_tpot_s - self.t_min_s) * queue / self.queue_threshold
        return min(max(target, self.t_min_s), self.slo_tpot_s)

    def token_budget(self, engine: Engine) -> int:
        base = StepBatch.decode(engine.n_dec, engine.dec_ctx_sum) if engine.n_dec else None
        extra = token_budget(
            self.models[engine.index],
            self.target_s(len(engine.waiting)) * 1e3,
            base=base,
            max_tokens=engine.config.max_num_batched_tokens,
        )
        return engine.n_dec + extra


@dataclass
class Larry:
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

    def attach(self, engine: Engine) -> None:
        self.mean_output[engine.index] = self.output_prior
        finish = engine.on_finish

        def learn_then_finish(request: Request) -> None:
            mean = self.mean_output[engine.index]
            self.mean_output[engine.index] = mean + 0.02 * (request.output_tokens - mean)
            finish(request)

        engine.on_finish = learn_then_finish

    def token_budget(self, engine: Engine) -> int:
        return engine.config.max_num_batched_tokens

    def admit(self, engine: Engine, request: Request, blocks: int) -> bool:
        if not engine.running:
            return True
        expected = self.mean_output[engine.index]
        footprint = -(-(request.prefill_target + int(expected)) // engine.block_size)
        reserve = engine.n_dec * self.reserve_fraction * expected / engine.block_size
        return engine.free_blocks >= footprint + reserve

    def choose_victim(self, engine: Engine) -> Request:
        order = list(engine.running.values())
        return max(reversed(order), key=lambda r: engine.held_blocks(r) / (engine.computed_tokens(r) + 1))
