"""Workloads: the exogenous input process (arrival times, prompt and output lengths, SLO classes).

A workload has its own seed, separate from the simulator's, so that policies are compared on identical
arrivals. Arrivals of any rate shape come from one construction: a unit-rate renewal process (exponential
gaps for Poisson, Gamma gaps with a chosen coefficient of variation for bursty traffic) mapped through the
inverse of the cumulative rate Λ(t) (time rescaling), which covers constant, piecewise-constant and
diurnal rates alike.
"""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from servegym.envs.sim.request import Request, SloClass
from servegym.envs.sim.traces import TRACE_DIR, Trace, TraceError, read_trace

LENGTH_SAMPLES = {"arxiv": TRACE_DIR / "arxiv_summarization_lengths.csv.gz"}
STREAMS = {"arrivals": 0, "lengths": 1, "slo": 2, "sessions": 3, "mixture": 4}


class WorkloadError(ValueError):
    """An impossible workload configuration; the message names the parameter."""


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream]])


# -- arrival processes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateSchedule:
    """Requests per second over time: ``pieces`` of (duration_s, rate) repeated, optionally with a sine.

    ``rate(t) = piece_rate(t) * (1 + diurnal_amplitude * sin(2π t / diurnal_period_s))``; a single piece
    is a constant rate. ``cv`` is the coefficient of variation of inter-arrival gaps (1 = Poisson,
    > 1 bursty, < 1 regular, 0 = evenly spaced: a benchmark client's constant load, with every gap
    1/rate and the first arrival half a gap in, so a piece of ``d`` seconds at rate ``r`` holds exactly
    ``r·d`` arrivals when that is a whole number; no random number is drawn).
    """

    pieces: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    cv: float = 1.0
    diurnal_amplitude: float = 0.0
    diurnal_period_s: float = 86400.0

    def __post_init__(self) -> None:
        if not self.pieces or any(d <= 0 or r < 0 for d, r in self.pieces):
            raise WorkloadError(f"rate pieces need positive durations and non-negative rates, got {self.pieces}")
        if all(r == 0 for _, r in self.pieces):
            raise WorkloadError("every rate piece is zero: no request would ever arrive")
        if self.cv < 0:
            raise WorkloadError(f"cv must be positive, or 0 for evenly spaced arrivals, got {self.cv}")
        if not 0 <= self.diurnal_amplitude < 1:
            raise WorkloadError(f"diurnal_amplitude must be in [0, 1), got {self.diurnal_amplitude}")

    def rate(self, t: np.ndarray) -> np.ndarray:
        durations = np.array([d for d, _ in self.pieces])
        rates = np.array([r for _, r in self.pieces])
        edges = np.concatenate([[0.0], np.cumsum(durations)])
        phase = np.mod(t, edges[-1])
        piece = np.clip(np.searchsorted(edges, phase, side="right") - 1, 0, len(rates) - 1)
        base = rates[piece]
        if self.diurnal_amplitude:
            base = base * (1 + self.diurnal_amplitude * np.sin(2 * np.pi * t / self.diurnal_period_s))
        return base

    def arrivals(self, count: int, rng: np.random.Generator, horizon_s: float | None = None) -> np.ndarray:
        """``count`` arrival times (s), or all arrivals before ``horizon_s`` when given."""
        mean_rate = float(np.mean([r for _, r in self.pieces]))
        expected = count if horizon_s is None else int(horizon_s * mean_rate * 1.5) + 64
        while True:
            if self.cv == 0:  # evenly spaced: unit gaps, the first event half a gap in
                unit_times = np.arange(expected, dtype=np.float64) + 0.5
            else:
                shape = 1.0 / self.cv**2
                gaps = rng.gamma(shape, 1.0 / shape, size=expected)  # unit mean
                unit_times = np.cumsum(gaps)
            times = self._invert(unit_times)
            if horizon_s is None and len(times) >= count:
                return times[:count]
            if horizon_s is not None and times[-1] >= horizon_s:
                return times[times < horizon_s]
            expected *= 2

    def _invert(self, unit_times: np.ndarray) -> np.ndarray:
        """Map unit-rate event times through Λ⁻¹ (Λ integrated on a fine grid)."""
        step = min(min(d for d, _ in self.pieces) / 16, self.diurnal_period_s / 256 if self.diurnal_amplitude else 1e9)
        mean_rate = float(np.mean([r for _, r in self.pieces]))
        horizon = unit_times[-1] / max(mean_rate * (1 - self.diurnal_amplitude), 1e-12) * 1.05 + step
        grid = np.arange(0.0, horizon + step, step)
        midpoints = self.rate(grid[:-1] + step / 2)
        cumulative = np.concatenate([[0.0], np.cumsum(midpoints * step)])
        return np.interp(unit_times, cumulative, grid)


# -- lengths -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LengthSampler:
    """Prompt and output lengths: ``fixed``, ``lognormal`` (median and sigma of the log) or ``empirical``.

    ``empirical`` draws (prompt, output) pairs jointly from ``source``: a built-in sample (``arxiv``,
    ``azure_conv``, ``azure_code``) or a trace path.
    """

    kind: str = "fixed"
    prompt: float = 512
    output: float = 128
    prompt_sigma: float = 0.0
    output_sigma: float = 0.0
    source: str = ""
    max_prompt: int = 32768
    max_output: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "lognormal", "empirical"):
            raise WorkloadError(f"lengths.kind must be fixed, lognormal or empirical, got {self.kind!r}")
        if self.kind != "empirical" and (self.prompt < 1 or self.output < 1):
            raise WorkloadError(f"prompt and output lengths must be at least 1, got {self.prompt}, {self.output}")
        if self.kind == "empirical" and not self.source:
            raise WorkloadError("empirical lengths need a source (arxiv, azure_conv, azure_code or a trace path)")

    def sample(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "fixed":
            prompts, outputs = np.full(count, self.prompt), np.full(count, self.output)
        elif self.kind == "lognormal":
            prompts = self.prompt * np.exp(self.prompt_sigma * rng.standard_normal(count))
            outputs = self.output * np.exp(self.output_sigma * rng.standard_normal(count))
        else:
            pool_prompts, pool_outputs = _length_pool(self.source)
            index = rng.integers(0, len(pool_prompts), count)
            prompts, outputs = pool_prompts[index], pool_outputs[index]
        prompts = np.clip(np.rint(prompts), 1, self.max_prompt).astype(np.int64)
        outputs = np.clip(np.rint(outputs), 1, self.max_output).astype(np.int64)
        return prompts, outputs


def _length_pool(source: str) -> tuple[np.ndarray, np.ndarray]:
    """The (prompt, output) pairs an empirical sampler draws from (read once per process, read-only)."""
    if source in LENGTH_SAMPLES:
        return _length_sample(source)
    trace = read_trace(source)  # cached per file version
    return trace.prompt_tokens, trace.output_tokens


@lru_cache(maxsize=8)
def _length_sample(source: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    with gzip.open(LENGTH_SAMPLES[source], "rb") as handle:
        frame = pd.read_csv(io.BytesIO(handle.read()))
    pool = frame["num_prefill_tokens"].to_numpy(), frame["num_decode_tokens"].to_numpy()
    for column in pool:
        column.flags.writeable = False
    return pool


# -- SLO classes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SloMix:
    """Classes with weights; each request draws its class independently."""

    classes: tuple[SloClass, ...] = (SloClass("default", ttft_s=2.0, tpot_s=0.1),)
    weights: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.weights) or not self.classes:
            raise WorkloadError("slo classes and weights must be non-empty and of equal length")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise WorkloadError(f"slo weights must be non-negative with a positive sum, got {self.weights}")

    @classmethod
    def from_config(cls, entries: Sequence[dict] | None) -> SloMix:
        """From ``[{name, ttft_s, tpot_s, e2e_s, weight}, ...]`` (hydra lists of dicts)."""
        if not entries:
            return cls()
        classes, weights = [], []
        for entry in entries:
            entry = dict(entry)
            weights.append(float(entry.pop("weight", 1.0)))
            unknown = set(entry) - {"name", "ttft_s", "tpot_s", "e2e_s"}
            if unknown:
                raise WorkloadError(f"unknown SLO class field(s) {sorted(unknown)}")
            classes.append(SloClass(**entry))
        return cls(tuple(classes), tuple(weights))

    def draw(self, count: int, rng: np.random.Generator) -> list[SloClass]:
        probabilities = np.asarray(self.weights) / sum(self.weights)
        picks = rng.choice(len(self.classes), size=count, p=probabilities)
        return [self.classes[i] for i in picks]


# -- workloads ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticWorkload:
    """Arrivals from a :class:`RateSchedule`, lengths from a :class:`LengthSampler`, classes from a :class:`SloMix`.

    ``num_requests`` and ``duration_s`` bound the workload (at least one; both: whichever ends it first).
    """

    arrivals: RateSchedule = field(default_factory=RateSchedule)
    lengths: LengthSampler = field(default_factory=LengthSampler)
    slo: SloMix = field(default_factory=SloMix)
    num_requests: int | None = None
    duration_s: float | None = None
    sessions: int = 0  # >0: each request belongs to one of this many chat sessions (for affinity and prefix reuse)

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise WorkloadError("give num_requests or duration_s (or both) to bound the workload")
        if self.num_requests is not None and self.num_requests < 1:
            raise WorkloadError(f"num_requests must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise WorkloadError(f"duration_s must be positive, got {self.duration_s}")

    def generate(self, seed: int) -> list[Request]:
        times = self.arrivals.arrivals(self.num_requests or 0, _rng(seed, "arrivals"), horizon_s=self.duration_s)
        if self.num_requests is not None:
            times = times[: self.num_requests]
        prompts, outputs = self.lengths.sample(len(times), _rng(seed, "lengths"))
        return _requests(times, prompts, outputs, self.slo, seed, self.sessions)


SEGMENT_TOKENS = 512  # prompt tokens per prefix hash, as in Mooncake traces


@dataclass(frozen=True)
class TraceWorkload:
    """Replay of a real trace at its timestamps, rescaled (``rate_scale`` multiplies the rate, or
    ``target_rate`` sets the mean requests/s), over a window of replay time (``start_s`` and
    ``duration_s``, and at most ``num_requests``), shifted to start at 0.
    """

    path: str = "azure_conv"
    rate_scale: float = 1.0
    target_rate: float | None = None
    start_s: float = 0.0
    duration_s: float | None = None
    num_requests: int | None = None
    slo: SloMix = field(default_factory=SloMix)
    on_error: str = "raise"
    sessions: int = 0
    random_window: bool = False  # the workload seed picks where a shorter window starts in the trace

    def __post_init__(self) -> None:
        if self.rate_scale <= 0:
            raise WorkloadError(f"rate_scale must be positive, got {self.rate_scale}")
        if self.target_rate is not None and self.target_rate <= 0:
            raise WorkloadError(f"target_rate must be positive, got {self.target_rate}")

    def trace(self) -> Trace:
        return read_trace(self.path, on_error=self.on_error)

    def generate(self, seed: int) -> list[Request]:
        trace = self.trace()
        scale = self.rate_scale if self.target_rate is None else self.target_rate / trace.mean_rate
        times = trace.arrival_s / scale  # replay time: the window is in these seconds
        start = self.start_s
        if self.random_window:
            if self.num_requests is not None and self.num_requests < len(times):
                first = int(_rng(seed, "arrivals").integers(0, len(times) - self.num_requests + 1))
                start = max(start, float(times[first]))
            elif self.duration_s is not None and self.duration_s < times[-1]:
                start = max(start, float(_rng(seed, "arrivals").uniform(0, times[-1] - self.duration_s)))
        keep = times >= start
        if self.duration_s is not None:
            keep &= times < start + self.duration_s
        index = np.flatnonzero(keep)
        if self.num_requests is not None:
            index = index[: self.num_requests]
        if len(index) == 0:
            raise TraceError(f"{trace.source}: the chosen window holds no request")
        times = times[index] - times[index[0]]
        hashes = [trace.hash_ids[i] for i in index] if trace.hash_ids is not None else None
        return _requests(
            times, trace.prompt_tokens[index], trace.output_tokens[index], self.slo, seed, self.sessions, hashes
        )


@dataclass(frozen=True)
class ConcatWorkload:
    """Workloads played one after another (a mix that shifts: e.g. a code trace, then a conversation trace).

    Each part is generated with the same seed and shifted to start ``gap_s`` after the previous part's
    last arrival; request ids are renumbered.
    """

    parts: tuple[SyntheticWorkload | TraceWorkload, ...]
    gap_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.parts:
            raise WorkloadError("a concatenated workload needs at least one part")

    def generate(self, seed: int) -> list[Request]:
        out: list[Request] = []
        offset = 0.0
        for part in self.parts:
            requests = part.generate(seed)
            for request in requests:
                request.id = len(out)
                request.arrival_s += offset
                out.append(request)
            offset = out[-1].arrival_s + self.gap_s
        return out


@dataclass(frozen=True)
class MixtureWorkload:
    """One of several workloads per window, drawn by the window's seed with ``weights``: training across
    traces (a conversation window in one episode, a code window in the next) on one environment.

    The draw has its own random stream, so a part's window for seed ``s`` is the same whether it is played
    alone or drawn from the mixture; a load factor scales every part.
    """

    parts: tuple[SyntheticWorkload | TraceWorkload | ConcatWorkload, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.parts:
            raise WorkloadError("a mixture workload needs at least one part")
        if self.weights is not None:
            if len(self.weights) != len(self.parts):
                raise WorkloadError(
                    f"a mixture's weights ({len(self.weights)}) must match its parts ({len(self.parts)})"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise WorkloadError(f"a mixture's weights must be non-negative with a positive sum, got {self.weights}")

    def part_index(self, seed: int) -> int:
        """Which part window ``seed`` plays."""
        weights = np.ones(len(self.parts)) if self.weights is None else np.asarray(self.weights, dtype=float)
        return int(_rng(seed, "mixture").choice(len(self.parts), p=weights / weights.sum()))

    def generate(self, seed: int) -> list[Request]:
        return self.parts[self.part_index(seed)].generate(seed)


def session_hashes(session_id: int, prompt_tokens: int) -> tuple[int, ...]:
    """Prefix hashes of a chat turn: every turn of a session shares its history's leading segments."""
    return tuple((session_id << 20) | k for k in range(-(-prompt_tokens // SEGMENT_TOKENS)))


_GROUP_TAG, _QUESTION_TAG = 1 << 62, 1 << 61  # keeps shared-prefix hashes apart from session hashes


def shared_prefix_hashes(
    group: int, question: int, prompt_tokens: int, shared_tokens: int, segment_tokens: int = SEGMENT_TOKENS
) -> tuple[int, ...]:
    """Prefix hashes of a prompt that starts with a group's system prompt of ``shared_tokens`` tokens.

    The full segments inside the system prompt are named by the group, so every request of the group
    shares them; the rest (a segment straddling the end of the system prompt included, as a vLLM block
    holding the end of the system prompt and the start of a question is unique) are named by
    ``question``: the request's own id when every question is new, a user's id when users repeat theirs
    (callers keep the two kinds of ids apart). This is the shared-prefix structure of benchmark clients
    (inference-perf's ``shared_prefix`` data: groups of users, each group with one system prompt).
    """
    segments = -(-prompt_tokens // segment_tokens)
    shared = min(shared_tokens // segment_tokens, segments)
    return tuple(_GROUP_TAG | (group << 24) | k for k in range(shared)) + tuple(
        _QUESTION_TAG | (question << 24) | k for k in range(shared, segments)
    )


def _requests(times, prompts, outputs, slo: SloMix, seed: int, sessions: int, hashes=None) -> list[Request]:
    classes = slo.draw(len(times), _rng(seed, "slo"))
    session_ids = _rng(seed, "sessions").integers(0, sessions, len(times)) if sessions > 0 else None
    requests = []
    for i in range(len(times)):
        session = int(session_ids[i]) if session_ids is not None else -1
        if hashes is not None:
            hash_ids = tuple(hashes[i])
        elif session >= 0:
            hash_ids = session_hashes(session, int(prompts[i]))
        else:
            hash_ids = ()
        requests.append(
            Request(
                id=i,
                arrival_s=float(times[i]),
                prompt_tokens=int(prompts[i]),
                output_tokens=int(outputs[i]),
                slo=classes[i],
                session_id=session,
                hash_ids=hash_ids,
            )
        )
    return requests


def offered_load(requests: Sequence[Request]) -> dict[str, float]:
    """Mean arrival rate and token rates of a generated workload (for reports and sanity checks)."""
    if len(requests) < 2:
        return {"rate_rps": 0.0, "prompt_tok_s": 0.0, "output_tok_s": 0.0}
    span = requests[-1].arrival_s - requests[0].arrival_s
    return {
        "rate_rps": (len(requests) - 1) / span,
        "prompt_tok_s": sum(r.prompt_tokens for r in requests) / span,
        "output_tok_s": sum(r.output_tokens for r in requests) / span,
    }


Workload = SyntheticWorkload | TraceWorkload | ConcatWorkload | MixtureWorkload


def scale_load(workload: Workload, factor: float) -> Workload:
    """The workload at ``factor`` times its rate: a trace's ``rate_scale`` (or ``target_rate``), a synthetic
    schedule's rates, every part of a concatenation or a mixture. The one way loads are scaled (evaluation grids,
    environments' ``load_range``), so "load x1.2" means the same arrivals 20% faster everywhere."""
    if factor <= 0 or not math.isfinite(factor):
        raise WorkloadError(f"a load factor must be positive and finite, got {factor}")
    if factor == 1.0:
        return workload
    if isinstance(workload, (ConcatWorkload, MixtureWorkload)):
        return replace(workload, parts=tuple(scale_load(part, factor) for part in workload.parts))
    if isinstance(workload, TraceWorkload):
        if workload.target_rate:
            return replace(workload, target_rate=workload.target_rate * factor)
        return replace(workload, rate_scale=workload.rate_scale * factor)
    pieces = tuple((duration, rate * factor) for duration, rate in workload.arrivals.pieces)
    return replace(workload, arrivals=replace(workload.arrivals, pieces=pieces))


def stream(workload: Workload, seed: int, total: int) -> Iterator[Request]:
    """``total`` requests drawn lazily: windows of ``workload`` (seeds ``seed``, ``seed + 1``, ...) played back
    to back, renumbered, each starting one mean inter-arrival gap after the previous window's last arrival.
    Only one window is in memory at a time: the input of long runs (soaks) whose outcomes are aggregated."""
    produced, offset, window = 0, 0.0, 0
    while produced < total:
        requests = workload.generate(seed + window)
        window += 1
        span = requests[-1].arrival_s - requests[0].arrival_s
        gap = span / (len(requests) - 1) if len(requests) > 1 else 1.0
        for request in requests[: total - produced]:
            request.id = produced
            request.arrival_s += offset
            produced += 1
            yield request
        offset = requests[-1].arrival_s + gap
