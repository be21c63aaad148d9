"""The router's own, exact and live, account of each backend, and the snapshot a policy reads.

A router knows what it sent and what it relayed back. Per backend: requests and prompt tokens sent and
not finished (the simulator's ``outstanding_requests`` / ``outstanding_prompt_tokens``), and, by tapping
the relayed stream: prompt tokens of requests still waiting for their first token (pending prefill),
requests past their first token (decodes), their KV tokens (prompt + tokens streamed so far), and the
observed inter-token time. Scraped gauges (running, waiting, KV usage, cache blocks) complete the
:class:`envs.sim.view.EngineSnapshot`.
"""

from __future__ import annotations

from envs.features import EngineModels
from envs.sim.view import EngineInfo, EngineSnapshot
from perfmodel.batch import StepBatch
from serving.scrape import EngineMetrics

EWMA_WEIGHT = 0.1  # per observed token gap (the engine's step EWMA uses 0.1 per step)


class Bookkeeping:
    """Per-backend counts the router keeps itself; every method is O(1)."""

    def __init__(self, count: int) -> None:
        self.outstanding = [0] * count
        self.outstanding_prompt = [0] * count
        self.pending_prefill = [0] * count
        self.decodes = [0] * count
        self.decode_kv = [0] * count
        self.gap_ewma_s = [0.0] * count

    def sent(self, backend: int, prompt_tokens: int) -> None:
        self.outstanding[backend] += 1
        self.outstanding_prompt[backend] += prompt_tokens
        self.pending_prefill[backend] += prompt_tokens

    def first_token(self, backend: int, prompt_tokens: int) -> None:
        self.pending_prefill[backend] -= prompt_tokens
        self.decodes[backend] += 1
        self.decode_kv[backend] += prompt_tokens + 1

    def token(self, backend: int, gap_s: float) -> None:
        self.decode_kv[backend] += 1
        self.gap_ewma_s[backend] += EWMA_WEIGHT * (gap_s - self.gap_ewma_s[backend])

    def ended(self, backend: int, prompt_tokens: int, tokens_seen: int) -> None:
        """The request left the backend (finished, failed or abandoned), after ``tokens_seen`` streamed tokens."""
        self.outstanding[backend] -= 1
        self.outstanding_prompt[backend] -= prompt_tokens
        if tokens_seen:
            self.decodes[backend] -= 1
            self.decode_kv[backend] -= prompt_tokens + tokens_seen
        else:
            self.pending_prefill[backend] -= prompt_tokens


def predicted_step_ms(models: EngineModels, info: EngineInfo, decodes: int, decode_kv: int, pending: int) -> float:
    """The performance model's next step for these counts, as ``Engine.predicted_next_step_ms`` computes it
    from the engine's own state: the decodes plus a prefill chunk of the budget."""
    if not decodes and not pending:
        return 0.0
    budget = max(info.max_num_batched_tokens, decodes)
    prefill = min(pending, budget - decodes)
    batch = StepBatch.decode(decodes, max(0, decode_kv - decodes)) if decodes else StepBatch()
    if prefill > 0:
        batch = batch + StepBatch.prefill(prefill)
    return models(info).predict(batch)


def snapshot(
    info: EngineInfo,
    scraped: EngineMetrics | None,
    scraped_at_s: float,
    book: Bookkeeping,
    models: EngineModels,
) -> EngineSnapshot:
    """One backend's snapshot: scraped gauges (zeros before the first scrape) and the router's live counts."""
    i = info.index
    scraped = scraped or EngineMetrics()
    block_size = scraped.block_size or 16
    blocks = scraped.num_gpu_blocks or max(1, info.kv_capacity_tokens // block_size)
    return EngineSnapshot(
        time_s=scraped_at_s,
        num_requests_running=scraped.num_requests_running,
        num_requests_waiting=scraped.num_requests_waiting,
        kv_cache_usage_perc=scraped.kv_cache_usage_perc,
        num_gpu_blocks=blocks,
        block_size=block_size,
        pending_prefill_tokens=book.pending_prefill[i],
        num_decodes=book.decodes[i],
        decode_kv_tokens=book.decode_kv[i],
        recent_tokens_per_step=0.0,  # not observable from outside the engine (docs/serving.md)
        recent_step_ms=book.gap_ewma_s[i] * 1e3,
        predicted_step_ms=predicted_step_ms(models, info, book.decodes[i], book.decode_kv[i], book.pending_prefill[i]),
    )
