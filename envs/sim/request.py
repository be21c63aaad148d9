"""A request's exogenous description (what the workload draws) and its lifecycle in the simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, slots=True)
class SloClass:
    """Latency targets of a request class; ``None`` means not constrained. Times in seconds."""

    name: str = "default"
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, ttft: float, tpot: float, e2e: float) -> bool:
        return (
            (self.ttft_s is None or ttft <= self.ttft_s)
            and (self.tpot_s is None or tpot <= self.tpot_s)
            and (self.e2e_s is None or e2e <= self.e2e_s)
        )


class State(Enum):
    PENDING = "pending"  # not yet arrived
    WAITING = "waiting"  # queued at an engine
    PREFILL = "prefill"  # running, prompt (or recompute) not finished
    DECODE = "decode"  # running, generating
    TRANSFER = "transfer"  # prefilled on a prefill instance, KV on its way to a decode instance
    INCOMING = "incoming"  # KV arrived at a decode instance, waiting for admission
    FINISHED = "finished"
    REJECTED = "rejected"


@dataclass(slots=True, eq=False)
class Request:
    """One request. The first block is exogenous (fixed by the workload seed); the rest is simulator state.

    Token accounting follows vLLM: after a prefill of ``n`` tokens the KV cache holds ``n`` tokens and one
    output token is sampled; each decode step writes the previous token's KV and samples the next, so a
    request that finishes holds ``prompt_tokens + output_tokens - 1`` tokens of KV.
    """

    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    slo: SloClass = field(default_factory=SloClass)
    session_id: int = -1
    hash_ids: tuple[int, ...] = ()  # one hash per prefix segment of the prompt (prefix caching)

    state: State = State.PENDING
    instance: int = -1
    prefill_instance: int = -1  # where the prompt was computed (differs from ``instance`` after a PD handoff)
    transfer_s: float = 0.0  # KV transfer time of a PD handoff
    generated: int = 0
    prefill_target: int = 0  # tokens this (re)prefill must compute: prompt + tokens generated before a preemption
    computed: int = 0  # KV tokens computed so far in the current prefill
    blocks: int = 0  # KV blocks held (prefill phase; decodes are accounted in aggregate by the engine)
    decode_entry_step: int = 0  # engine step count when the request joined the decode set
    decode_entry_ctx: int = 0  # KV tokens at that moment
    decode_entry_generated: int = 0
    heap_version: int = 0  # invalidates stale completion-heap entries after a preemption
    ready_step: int = 0  # first engine step that may schedule it (asynchronous scheduling looks one step ahead)
    first_scheduled_s: float = math.nan
    first_token_s: float = math.nan
    last_token_s: float = math.nan
    finished_s: float = math.nan
    max_gap_s: float = 0.0
    preemptions: int = 0
    reject_reason: str = ""
    shared: list[int] = field(default_factory=list)  # prefix-cache segments this request references
    shared_blocks: int = 0  # KV blocks those segments cover (not counted in ``blocks``)
    prefix_hit_tokens: int = 0
    aborted: bool = False  # its client went away (Engine.abort): it ended before its output length

    def latencies(self) -> tuple[float, float, float]:
        """(TTFT, TPOT, E2E) in seconds; NaN for what has not happened. TPOT = (finish − first token) /
        (output − 1), 0 for a single-token output."""
        ttft = self.first_token_s - self.arrival_s
        e2e = self.finished_s - self.arrival_s
        tpot = (self.finished_s - self.first_token_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0
        return ttft, tpot, e2e

    @property
    def slo_met(self) -> bool:
        """Finished within every target of its SLO class."""
        return self.state is State.FINISHED and self.slo.met(*self.latencies())

    @property
    def max_kv_tokens(self) -> int:
        """KV tokens held at the end: prompt plus every output token but the last."""
        return self.prompt_tokens + self.output_tokens - 1
