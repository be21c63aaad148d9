"""Readers of public LLM-serving traces, format detected from the file's header or first line.

- Azure LLM inference (2023 and 2024): CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock
  timestamps.
- BurstGPT: CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``, seconds from the
  start. Rows with zero response tokens are failed requests in the log: they are dropped and counted
  (``Trace.dropped["failed (zero response tokens)"]``), or kept as errors with ``zero_output="error"``.
- Mooncake: JSON lines ``{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}``,
  one hash id per 512-token prompt block.

A malformed row raises :class:`TraceError` naming the file, line and field; with ``on_error="skip"`` it is
skipped and counted in ``Trace.dropped`` instead. ``.gz`` files are read transparently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

TRACE_DIR = Path(__file__).resolve().parent / "data" / "traces"
BUILTIN_TRACES = {
    "azure_conv": TRACE_DIR / "azure_conv_2023.csv.gz",
    "azure_code": TRACE_DIR / "azure_code_2023.csv.gz",
}
MOONCAKE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """A trace that cannot be read; the message starts with ``file:line:`` where a row is at fault."""


@dataclass
class Trace:
    """Arrival times (s from the first request), prompt and output lengths, optional prefix-block hashes."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    hash_ids: list[tuple[int, ...]] | None = None
    source: str = ""
    format: str = ""
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0

    @property
    def mean_rate(self) -> float:
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("inf")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(newline="", encoding="utf-8")


def resolve_trace_path(path_or_name: str | Path) -> Path:
    """A built-in trace name (``azure_conv``, ``azure_code``) or a path."""
    if str(path_or_name) in BUILTIN_TRACES:
        return BUILTIN_TRACES[str(path_or_name)]
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file (built-in names: {', '.join(BUILTIN_TRACES)})")
    return path


def detect_format(path: Path) -> str:
    """``azure``, ``burstgpt`` or ``mooncake`` from the first non-empty line."""
    with _open_text(path) as handle:
        first = next((line for line in handle if line.strip()), "")
    header = [column.strip() for column in first.strip().split(",")]
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(header):
        return "azure"
    if {"Timestamp", "Request tokens", "Response tokens"} <= set(header):
        return "burstgpt"
    if first.lstrip().startswith("{"):
        return "mooncake"
    raise TraceError(
        f"{path}:1: unrecognised trace format (expected an Azure or BurstGPT CSV header, or Mooncake JSON lines)"
    )


def read_trace(path_or_name: str | Path, on_error: str = "raise", zero_output: str = "drop") -> Trace:
    """Read a trace of any supported format (see module docstring)."""
    if on_error not in ("raise", "skip"):
        raise TraceError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if zero_output not in ("drop", "error"):
        raise TraceError(f"zero_output must be 'drop' or 'error', got {zero_output!r}")
    path = resolve_trace_path(path_or_name)
    stat = path.stat()
    trace = _read_cached(str(path), stat.st_mtime_ns, stat.st_size, on_error, zero_output)
    return replace(
        trace, hash_ids=list(trace.hash_ids) if trace.hash_ids is not None else None, dropped=dict(trace.dropped)
    )


@lru_cache(maxsize=8)
def _read_cached(path_name: str, _mtime_ns: int, _size: int, on_error: str, zero_output: str) -> Trace:
    """One parse per file version and process (a window's replay re-reads its trace per seed, and parsing
    the Azure conversation trace costs ~0.3 s); the arrays are read-only so no caller changes the cache."""
    path = Path(path_name)
    kind = detect_format(path)
    reader = {"azure": _read_azure, "burstgpt": _read_burstgpt, "mooncake": _read_mooncake}[kind]
    dropped: Counter[str] = Counter()
    arrivals, prompts, outputs, hashes = reader(path, on_error, zero_output, dropped)
    if not arrivals:
        raise TraceError(f"{path}: no usable request in the trace")
    order = np.argsort(np.asarray(arrivals, dtype=np.float64), kind="stable")
    arrival = np.asarray(arrivals, dtype=np.float64)[order]
    columns = (
        arrival - arrival[0],
        np.asarray(prompts, dtype=np.int64)[order],
        np.asarray(outputs, dtype=np.int64)[order],
    )
    for column in columns:
        column.flags.writeable = False
    return Trace(
        arrival_s=columns[0],
        prompt_tokens=columns[1],
        output_tokens=columns[2],
        hash_ids=[hashes[i] for i in order] if hashes is not None else None,
        source=str(path),
        format=kind,
        dropped=dict(dropped),
    )


def _int_field(row: dict, name: str, where: str, minimum: int) -> int:
    raw = row.get(name)
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        raise TraceError(f"{where}: field {name!r} is not an integer: {raw!r}") from None
    if value < minimum:
        raise TraceError(f"{where}: field {name!r} must be at least {minimum}, got {value}")
    return value


def _collect(rows, path: Path, parse, on_error: str, dropped: Counter) -> tuple[list, list, list, list | None]:
    arrivals, prompts, outputs, hashes = [], [], [], []
    for number, row in rows:
        where = f"{path}:{number}"
        try:
            parsed = parse(row, where)
        except TraceError:
            if on_error == "raise":
                raise
            dropped["malformed rows"] += 1
            continue
        if parsed is None:
            continue
        arrivals.append(parsed[0])
        prompts.append(parsed[1])
        outputs.append(parsed[2])
        hashes.append(parsed[3])
    has_hashes = any(h is not None for h in hashes)
    return arrivals, prompts, outputs, (hashes if has_hashes else None)


def _csv_rows(path: Path):
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                yield reader.line_num, {"__malformed__": True}
            else:
                yield reader.line_num, row


def _csv_reader(time_column: str, parse_time, time_kind: str, prompt_column: str, output_column: str):
    """A reader for a CSV trace with one timestamp, one prompt-length and one output-length column."""

    def read(path: Path, on_error: str, zero_output: str, dropped: Counter):
        def parse(row: dict, where: str):
            if row.get("__malformed__"):
                raise TraceError(f"{where}: row does not have the header's columns")
            try:
                stamp = parse_time(str(row[time_column]).strip())
            except ValueError:
                raise TraceError(f"{where}: field {time_column!r} is not {time_kind}: {row[time_column]!r}") from None
            prompt = _int_field(row, prompt_column, where, 1)
            output = _int_field(row, output_column, where, 0)
            if output == 0:
                return _zero_output(where, zero_output, dropped)
            return stamp, prompt, output, None

        return _collect(_csv_rows(path), path, parse, on_error, dropped)

    return read


def _zero_output(where: str, zero_output: str, dropped: Counter) -> None:
    if zero_output == "error":
        raise TraceError(f"{where}: zero output tokens (a failed request); pass zero_output='drop' to count and drop")
    dropped["failed (zero response tokens)"] += 1
    return None


_read_azure = _csv_reader(
    "TIMESTAMP",
    lambda text: datetime.fromisoformat(text).timestamp(),
    "a timestamp",
    "ContextTokens",
    "GeneratedTokens",
)
_read_burstgpt = _csv_reader("Timestamp", float, "a number", "Request tokens", "Response tokens")


def _read_mooncake(path: Path, on_error: str, zero_output: str, dropped: Counter):
    def lines():
        with _open_text(path) as handle:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    yield number, text

    def parse(text: str, where: str):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise TraceError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise TraceError(f"{where}: expected a JSON object")
        for name in ("timestamp", "input_length", "output_length"):
            if name not in row:
                raise TraceError(f"{where}: field {name!r} is missing")
        if isinstance(row["timestamp"], bool) or not isinstance(row["timestamp"], (int, float)):
            raise TraceError(f"{where}: field 'timestamp' is not a number: {row['timestamp']!r}")
        prompt = _int_field(row, "input_length", where, 1)
        output = _int_field(row, "output_length", where, 0)
        hash_ids = row.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
            raise TraceError(f"{where}: field 'hash_ids' must be a list of integers")
        if len(hash_ids) > -(-prompt // MOONCAKE_BLOCK_TOKENS):
            raise TraceError(f"{where}: field 'hash_ids' has more blocks than input_length covers")
        if output == 0:
            return _zero_output(where, zero_output, dropped)
        return float(row["timestamp"]) / 1e3, prompt, output, tuple(hash_ids)

    return _collect(lines(), path, parse, on_error, dropped)
