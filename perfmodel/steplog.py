"""Step logs: JSON lines of one engine step each, as ``predict`` reads and ``calibrate`` fits.

A line is ``{"gpu": "H100-SXM", "model": "Llama-2-70B", "tp": 4, "seqs": [[512, 0], [1, 900]]}``
with optional ``"dtype"`` (default bf16), ``"cuda_graphs"`` (default false: the step ran eagerly, as
the microbenchmark's do; true for a vLLM engine's decode-only steps) and, in measurements,
``"latency_ms"``. Other keys are kept and echoed back. Every problem is reported as ``FILE:LINE: what is wrong``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servegym.perfmodel.batch import BatchError, StepBatch
from servegym.perfmodel.catalog import CatalogError, check_dtype, get_gpu, get_model
from servegym.perfmodel.errors import PerfModelError


class StepLogError(PerfModelError):
    """A malformed step-log line; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class StepRecord:
    """One validated step-log line."""

    gpu: str
    model: str
    tp: int
    dtype: str
    batch: StepBatch
    latency_ms: float | None
    raw: dict[str, Any] = field(repr=False)
    cuda_graphs: bool = False


def parse_line(text: str, where: str, need_latency: bool = False) -> StepRecord:
    """Validate one JSON line; ``where`` (``file:line``) prefixes any error."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise StepLogError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(raw, dict):
        raise StepLogError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [key for key in ("gpu", "model", "seqs") if key not in raw]
    if need_latency and "latency_ms" not in raw:
        missing.append("latency_ms")
    if missing:
        raise StepLogError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        gpu, model = get_gpu(str(raw["gpu"])).name, get_model(str(raw["model"])).name
        dtype = check_dtype(str(raw.get("dtype", "bf16")))
    except CatalogError as error:
        raise StepLogError(f"{where}: {error}") from None
    tp = raw.get("tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise StepLogError(f"{where}: tp must be a positive integer, got {tp!r}")
    heads = get_model(model).num_attention_heads
    if heads % tp:
        raise StepLogError(f"{where}: tp={tp} does not divide the {heads} attention heads of {model}")
    if not isinstance(raw["seqs"], list) or not raw["seqs"]:
        raise StepLogError(f"{where}: seqs must be a non-empty list of [new_tokens, context_tokens]")
    try:
        batch = StepBatch.from_seqs(raw["seqs"])
    except BatchError as error:
        raise StepLogError(f"{where}: {error}") from None
    graphs = raw.get("cuda_graphs", False)
    if not isinstance(graphs, bool):
        raise StepLogError(f"{where}: cuda_graphs must be true or false, got {graphs!r}")
    latency = raw.get("latency_ms")
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency <= 0):
        raise StepLogError(f"{where}: latency_ms must be a positive number, got {latency!r}")
    return StepRecord(gpu, model, tp, dtype, batch, None if latency is None else float(latency), raw, graphs)


def read_steps(path: str | Path, need_latency: bool = False) -> Iterator[StepRecord]:
    """Yield validated records of a step log, skipping blank lines; the first bad line raises :class:`StepLogError`."""
    path = Path(path)
    try:
        handle = path.open()
    except OSError as error:
        raise StepLogError(f"{path}: cannot open ({error.strerror})") from None
    with handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield parse_line(text, f"{path}:{number}", need_latency=need_latency)
