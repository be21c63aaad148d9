"""Batch composition of one engine step, reduced to the aggregates step latency depends on.

A step computes, for each sequence in the batch, ``new`` tokens on top of ``context`` tokens already in
its KV cache: a decode is ``(1, ctx)``, a prefill chunk ``(chunk, already_done)``. Latency depends on
the batch only through a handful of sums, so the simulator can keep them up to date in O(1) per
admission or completion instead of walking every sequence each step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
from servegym.perfmodel.errors import PerfModelError


class BatchError(PerfModelError):
    """A malformed batch: the message names the offending sequence."""


@dataclass(slots=True)  # not frozen: construction is 8x cheaper, and it is on every step and decision
class StepBatch:
    """Aggregate composition of one engine step.

    Attributes:
        num_tokens: new tokens computed in the step (rows through every linear layer).
        num_seqs: sequences in the batch (each samples one token if it reaches its end).
        num_decodes: sequences computing exactly one token on top of a non-empty context.
        attn_pairs: causal query-key pairs per head, ``sum(new * (context + (new + 1) / 2))``.
        kv_tokens: KV entries attention reads, ``sum(context + new)``.
        decode_kv_tokens: the part of ``kv_tokens`` that belongs to decodes.
    """

    num_tokens: int = 0
    num_seqs: int = 0
    num_decodes: int = 0
    attn_pairs: float = 0.0
    kv_tokens: int = 0
    decode_kv_tokens: int = 0

    @property
    def prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decodes

    @classmethod
    def from_seqs(cls, seqs: Iterable[Sequence[int]]) -> StepBatch:
        """Aggregate ``[(new_tokens, context_tokens), ...]``; raises :class:`BatchError` on bad entries."""
        num_tokens = num_seqs = num_decodes = kv_tokens = decode_kv = 0
        pairs = 0.0
        for index, seq in enumerate(seqs):
            new, context = _check_seq(index, seq)
            num_tokens += new
            num_seqs += 1
            pairs += new * (context + (new + 1) / 2)
            kv_tokens += context + new
            if new == 1 and context > 0:
                num_decodes += 1
                decode_kv += context + 1
        return cls(num_tokens, num_seqs, num_decodes, pairs, kv_tokens, decode_kv)

    @classmethod
    def decode(cls, num_seqs: int, kv_tokens: int) -> StepBatch:
        """A decode-only step of ``num_seqs`` sequences holding ``kv_tokens`` KV entries in total (before the step)."""
        total = kv_tokens + num_seqs
        return cls(num_seqs, num_seqs, num_seqs, float(total), total, total)

    @classmethod
    def prefill(cls, tokens: int, context: int = 0) -> StepBatch:
        """A single prefill chunk of ``tokens`` new tokens after ``context`` already computed ones."""
        new, context = _check_seq(0, (tokens, context))
        kv = context + new
        if new == 1 and context > 0:  # one token on a context is a decode, as from_seqs counts it
            return cls(1, 1, 1, float(kv), kv, kv)
        return cls(new, 1, 0, new * (context + (new + 1) / 2), kv, 0)

    def __add__(self, other: StepBatch) -> StepBatch:
        return StepBatch(
            self.num_tokens + other.num_tokens,
            self.num_seqs + other.num_seqs,
            self.num_decodes + other.num_decodes,
            self.attn_pairs + other.attn_pairs,
            self.kv_tokens + other.kv_tokens,
            self.decode_kv_tokens + other.decode_kv_tokens,
        )


def _check_seq(index: int, seq: Sequence[int]) -> tuple[int, int]:
    try:
        new, context = seq
    except (TypeError, ValueError):
        raise BatchError(f"sequence {index}: expected [new_tokens, context_tokens], got {seq!r}") from None
    for name, value in (("new_tokens", new), ("context_tokens", context)):
        if isinstance(value, bool) or (
            not isinstance(value, (int, np.integer)) and not (isinstance(value, float) and value.is_integer())
        ):
            raise BatchError(f"sequence {index}: {name} must be an integer, got {value!r}")
        if value < 0:
            raise BatchError(f"sequence {index}: {name} must be non-negative, got {value}")
    if new == 0:
        raise BatchError(f"sequence {index}: new_tokens must be at least 1 (a sequence in a step computes a token)")
    return int(new), int(context)


@dataclass(frozen=True)
class StepBatchArray:
    """Many step batches as a struct of equally long float64 arrays, for vectorised prediction."""

    num_tokens: np.ndarray
    num_seqs: np.ndarray
    num_decodes: np.ndarray
    attn_pairs: np.ndarray
    kv_tokens: np.ndarray
    decode_kv_tokens: np.ndarray

    def __post_init__(self) -> None:
        lengths = {f.name: len(np.atleast_1d(getattr(self, f.name))) for f in fields(self)}
        if len(set(lengths.values())) != 1:
            raise BatchError(f"StepBatchArray fields differ in length: {lengths}")
        for f in fields(self):
            object.__setattr__(self, f.name, np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64)))

    def __len__(self) -> int:
        return len(self.num_tokens)

    @classmethod
    def from_batches(cls, batches: Sequence[StepBatch]) -> StepBatchArray:
        return cls(**{f.name: np.array([getattr(b, f.name) for b in batches], dtype=np.float64) for f in fields(cls)})

    @property
    def prefill_tokens(self) -> np.ndarray:
        return self.num_tokens - self.num_decodes

    def __getitem__(self, index: int) -> StepBatch:
        n, s, d, pairs, kv, decode_kv = (getattr(self, f.name)[index] for f in fields(self))
        return StepBatch(int(n), int(s), int(d), float(pairs), int(kv), int(decode_kv))
