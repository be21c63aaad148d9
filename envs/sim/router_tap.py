"""What a router knows of each engine from its own traffic (the router tap), and the snapshot it reads.

A router knows what it sent and what it relayed back. Per engine: requests and prompt tokens sent and
not finished; prompt tokens of requests still waiting for their first token (pending prefill); requests
past their first token (decodes) and their KV tokens (prompt + tokens streamed so far); the observed
inter-token time (an EWMA over every token gap it relays). From those counts and the engine's static
facts it derives the next step's tokens and the performance model's latency for that step.

Both sides of the observation contract keep it the same way: the live router (``serving/router.py``)
calls :meth:`RouterTap.sent`, :meth:`~RouterTap.first_token`, :meth:`~RouterTap.token` and
:meth:`~RouterTap.ended` as it relays; the simulator's cluster makes the same calls from its engines'
events (:meth:`~RouterTap.decode_steps` for a run of decode steps). Only the scraped gauges (running,
waiting, KV usage, cache blocks) are read from the engine, possibly stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from servegym.envs.sim.view import EngineInfo, EngineSnapshot
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.structural import StructuralModel

EWMA_WEIGHT = 0.1  # per relayed token gap
_KEEP = 1.0 - EWMA_WEIGHT


class ModelSource(Protocol):
    """Gives an engine's structural performance model (``servegym.envs.features.EngineModels`` does)."""

    def __call__(self, info: EngineInfo) -> StructuralModel: ...


class RouterTap:
    """Per-engine counts a router keeps itself; every update is O(1) (a run of decode steps O(steps))."""

    def __init__(self, count: int) -> None:
        self.outstanding = [0] * count
        self.outstanding_prompt = [0] * count
        self.pending_prefill = [0] * count
        self.decodes = [0] * count
        self.decode_kv = [0] * count
        self.gap_ewma_s = [0.0] * count

    def sent(self, engine: int, prompt_tokens: int) -> None:
        """A request went to ``engine``: outstanding, and pending until its first token."""
        self.outstanding[engine] += 1
        self.outstanding_prompt[engine] += prompt_tokens
        self.pending_prefill[engine] += prompt_tokens

    def first_token(self, engine: int, prompt_tokens: int) -> None:
        """Its first token came back: a decode holding its prompt and that token."""
        self.pending_prefill[engine] -= prompt_tokens
        self.decodes[engine] += 1
        self.decode_kv[engine] += prompt_tokens + 1

    def token(self, engine: int, gap_s: float) -> None:
        """Another token of a decode, ``gap_s`` after that request's previous one."""
        self.decode_kv[engine] += 1
        self.gap_ewma_s[engine] += EWMA_WEIGHT * (gap_s - self.gap_ewma_s[engine])

    def decode_steps(self, engine: int, decodes: int, gaps_s: np.ndarray | float) -> None:
        """Steps in which ``decodes`` requests each got a token, the step's duration after their previous one
        (what :meth:`token` once per token gives, in closed form)."""
        gaps = np.atleast_1d(np.asarray(gaps_s, dtype=float))
        if decodes <= 0 or not len(gaps):
            return
        keep = _KEEP**decodes  # one step's worth of per-token updates of the same gap
        weights = keep ** np.arange(len(gaps) - 1, -1, -1)
        ewma = self.gap_ewma_s[engine] * keep ** len(gaps) + (1.0 - keep) * float(np.dot(weights, gaps))
        self.gap_ewma_s[engine] = ewma
        self.decode_kv[engine] += decodes * len(gaps)

    def ended(self, engine: int, prompt_tokens: int, tokens_seen: int) -> None:
        """The request left ``engine`` (finished, failed or abandoned) after ``tokens_seen`` relayed tokens."""
        self.outstanding[engine] -= 1
        self.outstanding_prompt[engine] -= prompt_tokens
        if tokens_seen:
            self.decodes[engine] -= 1
            self.decode_kv[engine] -= prompt_tokens + tokens_seen
        else:
            self.pending_prefill[engine] -= prompt_tokens

    def moved(self, source: int, target: int, prompt_tokens: int, tokens_seen: int) -> None:
        """A prefilled request's decode moved to another engine (prefill/decode disaggregation)."""
        self.ended(source, prompt_tokens, tokens_seen)
        self.outstanding[target] += 1
        self.outstanding_prompt[target] += prompt_tokens
        self.decodes[target] += 1
        self.decode_kv[target] += prompt_tokens + tokens_seen

    def snapshots(
        self, infos: Sequence[EngineInfo], gauges: Sequence[EngineSnapshot], models: ModelSource
    ) -> list[EngineSnapshot]:
        """Each engine's snapshot: the scraped gauges of ``gauges`` with the tapped fields filled from here."""
        out = []
        for i, g in enumerate(gauges):
            info, pending, decodes, decode_kv = infos[i], self.pending_prefill[i], self.decodes[i], self.decode_kv[i]
            tokens = next_step_tokens(info, decodes, pending)
            out.append(
                EngineSnapshot(
                    g.time_s,
                    g.num_requests_running,
                    g.num_requests_waiting,
                    g.kv_cache_usage_perc,
                    g.num_gpu_blocks,
                    g.block_size,
                    pending,
                    decodes,
                    decode_kv,
                    tokens,
                    self.gap_ewma_s[i] * 1e3,
                    predicted_step_ms(models(info), decodes, decode_kv, tokens),
                    g.role,
                )
            )
        return out


def next_step_tokens(info: EngineInfo, decodes: int, pending: int) -> int:
    """Tokens of the engine's next step as the counts imply: its decodes plus a chunk of pending prefill
    up to the token budget (vLLM's chunked prefill)."""
    return decodes + max(0, min(pending, max(info.max_num_batched_tokens, decodes) - decodes))


def predicted_step_ms(model: StructuralModel, decodes: int, decode_kv: int, step_tokens: int) -> float:
    """The performance model's latency (ms) of that next step: the decodes (holding ``decode_kv`` KV tokens)
    plus a prefill chunk of the rest of ``step_tokens``; 0 for an engine with nothing to do."""
    chunk = step_tokens - decodes
    kv = decode_kv if decodes else 0
    pairs = kv + chunk * (chunk + 1) / 2
    return model.predict(StepBatch(step_tokens, decodes + (chunk > 0), decodes, pairs, kv + chunk, kv))
