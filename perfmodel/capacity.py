"""What an engine can hold and how fast it answers: KV capacity, token budgets, predicted TTFT and TPOT.

These are the derived quantities the simulator (KV blocks per engine), the predictive baselines (LENS
inverts the latency model for a token budget; PRISM and Block predict latency if a request is routed
here) and the observation features are built on.
"""

from __future__ import annotations

from dataclasses import dataclass

from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.catalog import DTYPE_BYTES, CatalogError
from servegym.perfmodel.structural import StructuralModel

GIB = 1024**3
RUNTIME_RESERVE_BYTES = 1.0 * GIB  # CUDA context, NCCL buffers and CUDA graphs, per GPU (vLLM-like)


@dataclass(frozen=True)
class KvCapacity:
    """KV-cache capacity of one engine (a TP group); byte figures are per GPU."""

    num_blocks: int
    block_size: int
    usable_bytes: float
    weight_bytes: float
    activation_bytes: float
    kv_bytes_per_token: float

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_capacity(
    perf: StructuralModel,
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
) -> KvCapacity:
    """KV blocks an engine gets: (memory × utilization − weights − activations − runtime) / block bytes.

    Raises :class:`CatalogError` naming the shortfall when the model does not fit the GPUs at this TP degree.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise CatalogError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if block_size < 1 or max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise CatalogError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
    m, tp, b = perf.model, perf.tp, DTYPE_BYTES[perf.dtype]
    weights = m.weight_bytes(perf.dtype) / tp
    per_token_activation = (4 * m.hidden_size + (m.q_size + 2 * m.kv_size + 3 * m.intermediate_size) / tp) * b
    activations = max_num_batched_tokens * per_token_activation + max_num_seqs * m.vocab_size / tp * 4
    budget = perf.gpu.memory_bytes * gpu_memory_utilization
    usable = budget - weights - activations - RUNTIME_RESERVE_BYTES
    kv_per_token = 2 * m.num_hidden_layers * perf.kv_heads_per_gpu * m.head_dim * b
    blocks = int(usable // (kv_per_token * block_size)) if usable > 0 else 0
    if blocks < 1:
        raise CatalogError(
            f"{m.name} does not fit {tp}x {perf.gpu.name} ({perf.gpu.memory_gb:g} GB) at "
            f"gpu_memory_utilization={gpu_memory_utilization}: weights {weights / GIB:.1f} GiB + activations "
            f"{activations / GIB:.1f} GiB + runtime {RUNTIME_RESERVE_BYTES / GIB:.1f} GiB per GPU leave no KV block; "
            "raise tp or choose a larger GPU"
        )
    return KvCapacity(blocks, block_size, usable, weights, activations, kv_per_token)


def token_budget(
    perf: StructuralModel, target_ms: float, base: StepBatch | None = None, context: int = 0, max_tokens: int = 1 << 16
) -> int:
    """Largest number of prefill tokens (one chunk after ``context`` tokens) that, added to ``base``, keeps
    the predicted step time at or below ``target_ms``. The inverse LENS uses; 0 if even ``base`` alone is over.
    """
    base = base or StepBatch()

    def fits(tokens: int) -> bool:
        batch = base + StepBatch.prefill(tokens, context) if tokens else base
        return perf.predict(batch) <= target_ms

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= max_tokens and fits(high):
        low, high = high, high * 2
    high = min(high, max_tokens + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high) (or high beyond max_tokens)
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def predict_ttft(
    perf: StructuralModel,
    prompt_tokens: int,
    queued_prefill_tokens: int = 0,
    running: StepBatch | None = None,
    max_num_batched_tokens: int = 8192,
    cached_tokens: int = 0,
) -> float:
    """Predicted time (ms) to a new request's first token on an engine with chunked prefill.

    Each step serves the ``running`` decodes first, then FCFS prefill chunks from the
    ``queued_prefill_tokens`` ahead of the request, then the request's own uncached prompt. Decode
    state is held fixed over the prediction; queued prompts are charged their chunks' own attention.
    """
    running = running or StepBatch()
    total = 0.0
    for count, *chunks in ttft_steps(
        prompt_tokens, queued_prefill_tokens, running.num_decodes, max_num_batched_tokens, cached_tokens
    ):
        total += count * perf.predict(running + StepBatch(*chunks))
    return total


# (how many such steps, then the StepBatch fields of their prefill chunks: tokens, sequences, decodes,
# attention pairs, KV tokens, decode KV tokens)
TtftStep = tuple[int, int, int, int, float, int, int]


def ttft_steps(
    prompt_tokens: int,
    queued_prefill_tokens: int,
    num_decodes: int,
    max_num_batched_tokens: int,
    cached_tokens: int = 0,
) -> list[TtftStep]:
    """The prefill chunks of each step up to a new request's first token (see :func:`predict_ttft`), as
    aggregates to add to the running batch: plain arithmetic, so callers can predict many engines at once."""
    chunk = max_num_batched_tokens - num_decodes
    if chunk < 1:
        raise CatalogError("the running decodes fill the whole token budget; no prefill can be scheduled")
    queued, own = max(0, queued_prefill_tokens), max(1, prompt_tokens - cached_tokens)
    full_queue_steps, remainder = divmod(queued, chunk)
    steps: list[TtftStep] = []
    if full_queue_steps:
        steps.append((full_queue_steps, *_chunk(chunk, 0)))
    done = cached_tokens
    if remainder:  # the step that finishes the queue starts the request's prompt
        first = min(chunk - remainder, own)
        steps.append((1, *(a + b for a, b in zip(_chunk(remainder, 0), _chunk(first, done), strict=True))))
        done, own = done + first, own - first
    while own > 0:
        step = min(chunk, own)
        steps.append((1, *_chunk(step, done)))
        done, own = done + step, own - step
    return steps


def _chunk(new: int, context: int) -> tuple[int, int, int, float, int, int]:
    """:meth:`StepBatch.prefill`'s fields without building one (one token on a context is a decode)."""
    kv = context + new
    if new == 1 and context > 0:
        return 1, 1, 1, float(kv), kv, kv
    return new, 1, 0, new * (context + (new + 1) / 2), kv, 0


def predict_tpot(perf: StructuralModel, running: StepBatch, prefill_tokens_per_step: int = 0) -> float:
    """Predicted time (ms) between output tokens for a batch, with optional prefill interference per step."""
    if running.num_seqs == 0:
        raise CatalogError("predict_tpot needs at least one running sequence")
    extra = StepBatch.prefill(prefill_tokens_per_step) if prefill_tokens_per_step > 0 else StepBatch()
    return perf.predict(running + extra)
