"""Speed benchmark of the step-latency model: one prediction (µs) and vectorised throughput (predictions/s).

Run with ``python -m servegym.perfmodel bench``. Figures are printed, never asserted: they belong to the machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from servegym.perfmodel.batch import StepBatchArray
from servegym.perfmodel.structural import StructuralModel

CASES = (("H100-SXM", "Llama-3-8B", 1), ("A100-80GB", "Llama-2-70B", 4), ("H100-SXM", "Mixtral-8x7B", 2))


def _random_batches(count: int, seed: int = 0) -> StepBatchArray:
    rng = np.random.default_rng(seed)
    decodes = rng.integers(0, 256, count).astype(np.float64)
    prefill = rng.integers(0, 2048, count).astype(np.float64)
    context = rng.integers(0, 4096, count).astype(np.float64)
    decode_kv = decodes * rng.integers(64, 4096, count)
    return StepBatchArray(
        num_tokens=decodes + prefill,
        num_seqs=decodes + (prefill > 0),
        num_decodes=decodes,
        attn_pairs=decode_kv + decodes + prefill * (context + (prefill + 1) / 2),
        kv_tokens=decode_kv + decodes + context + prefill,
        decode_kv_tokens=decode_kv + decodes,
    )


def run_benchmarks(repeats: int = 5, single_calls: int = 20_000, vector_size: int = 1_000_000) -> Iterator[str]:
    """Yield one printable line per case: best-of-``repeats`` single-call time and vector throughput."""
    batches = _random_batches(vector_size)
    singles = [batches[i] for i in range(1000)]
    for gpu, model, tp in CASES:
        perf = StructuralModel(gpu, model, tp=tp)
        best_single = float("inf")
        for _ in range(repeats):
            begin = time.perf_counter()
            for i in range(single_calls):
                perf.predict(singles[i % 1000])
            best_single = min(best_single, (time.perf_counter() - begin) / single_calls)
        best_vector = float("inf")
        for _ in range(repeats):
            begin = time.perf_counter()
            perf.predict_many(batches)
            best_vector = min(best_vector, time.perf_counter() - begin)
        yield (
            f"{gpu:>10} {model:<13} tp={tp}: predict {best_single * 1e6:5.2f} µs/step, "
            f"predict_many {vector_size / best_vector / 1e6:5.1f} M steps/s "
            f"({vector_size:,} steps in {best_vector * 1e3:.0f} ms)"
        )
