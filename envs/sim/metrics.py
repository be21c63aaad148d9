"""Per-request records and the run summary (SLO attainment, goodput, throughput, latency percentiles)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from servegym.envs.sim.policies import Observer
from servegym.envs.sim.request import Request, State

if TYPE_CHECKING:
    from servegym.envs.sim.engine import Engine

RECORD_COLUMNS = (
    "id",
    "arrival_s",
    "instance",
    "prefill_instance",
    "prompt_tokens",
    "output_tokens",
    "slo_class",
    "state",
    "queue_s",
    "transfer_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "max_gap_s",
    "preemptions",
    "prefix_hit_tokens",
    "slo_met",
    "reject_reason",
)


def record(request: Request) -> dict[str, Any]:
    """One request's outcome; latencies are NaN until they happen."""
    ttft, tpot, e2e = request.latencies()
    finished = request.state is State.FINISHED
    return {
        "id": request.id,
        "arrival_s": request.arrival_s,
        "instance": request.instance,
        "prefill_instance": request.prefill_instance,
        "prompt_tokens": request.prompt_tokens,
        "output_tokens": request.output_tokens,
        "slo_class": request.slo.name,
        "state": request.state.value,
        "queue_s": request.first_scheduled_s - request.arrival_s,
        "transfer_s": request.transfer_s,
        "ttft_s": ttft,
        "tpot_s": tpot if finished else math.nan,
        "e2e_s": e2e,
        "max_gap_s": request.max_gap_s,
        "preemptions": request.preemptions,
        "prefix_hit_tokens": request.prefix_hit_tokens,
        "slo_met": request.slo_met,
        "reject_reason": request.reject_reason,
    }


@dataclass
class SimResult:
    """What a run leaves: the requests (with their outcomes), the engines, simulated and wall time."""

    requests: list[Request]
    engines: list[Engine]
    sim_s: float
    wall_s: float

    def records(self) -> pd.DataFrame:
        return pd.DataFrame([record(r) for r in self.requests], columns=list(RECORD_COLUMNS))

    def summary(self) -> dict[str, Any]:
        return summarize(self.records(), self.engines, self.sim_s, self.wall_s)


def _percentile(values: pd.Series, q: float) -> float:
    values = values.dropna()
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(records: pd.DataFrame, engines: list[Engine], sim_s: float, wall_s: float) -> dict[str, Any]:
    """The run summary: every count, rate and percentile the reports and environments use."""
    done = records[records["state"] == "finished"]
    span = sim_s - float(records["arrival_s"].min()) if len(records) else 0.0
    span = span if span > 0 else math.nan
    # goodput is a rate of the offered process: SLO-meeting requests per second of arrivals
    arrival_span = float(records["arrival_s"].max() - records["arrival_s"].min()) if len(records) > 1 else 0.0
    arrival_span = arrival_span if arrival_span > 0 else span
    met = int(records["slo_met"].sum())
    preemptions = int(records["preemptions"].sum())
    per_instance = []
    for engine in engines:
        mine = done[done["instance"] == engine.index]
        per_instance.append(
            {
                "instance": engine.index,
                "gpu": engine.perf.gpu.name,
                "model": engine.perf.model.name,
                "tp": engine.config.tp,
                "role": engine.role,
                "completed": len(mine),
                "utilisation": engine.busy_s / sim_s if sim_s > 0 else 0.0,
                "preemptions": engine.preemptions,
                "kv_blocks": engine.total_blocks,
                "ttft_p50_s": _percentile(mine["ttft_s"], 50),
                "tpot_p50_s": _percentile(mine["tpot_s"], 50),
            }
        )
    return {
        "num_requests": len(records),
        "completed": len(done),
        "rejected": int((records["state"] == "rejected").sum()),
        "in_flight": int(len(records) - len(done) - (records["state"] == "rejected").sum()),
        "slo_attainment": met / len(records) if len(records) else math.nan,
        "goodput_rps": met / arrival_span,
        "throughput_tok_s": float(done["output_tokens"].sum()) / span,
        "ttft_p50_s": _percentile(done["ttft_s"], 50),
        "ttft_p99_s": _percentile(done["ttft_s"], 99),
        "tpot_p50_s": _percentile(done["tpot_s"], 50),
        "tpot_p99_s": _percentile(done["tpot_s"], 99),
        "e2e_p50_s": _percentile(done["e2e_s"], 50),
        "e2e_p99_s": _percentile(done["e2e_s"], 99),
        "queue_p50_s": _percentile(done["queue_s"], 50),
        "preemptions": preemptions,
        "prefix_hit_rate": float(records["prefix_hit_tokens"].sum() / records["prompt_tokens"].sum())
        if len(records)
        else 0.0,
        "preemption_rate": preemptions / len(done) if len(done) else 0.0,
        "utilisation": float(np.mean([p["utilisation"] for p in per_instance])) if per_instance else 0.0,
        "sim_s": sim_s,
        "wall_s": wall_s,
        "requests_per_wall_s": len(records) / wall_s if wall_s > 0 else math.nan,
        "engine_steps": int(sum(e.step_count for e in engines)),
        "per_instance": per_instance,
    }


class StreamingSummary(Observer):
    """Outcomes aggregated as requests finish, in constant memory: counts, SLO attainment, and latency
    percentiles from log-spaced histograms (``bins_per_decade`` bins from 0.1 ms to 10⁴ s: a percentile is
    exact to within one bin, 1.2% relative at the default 200). For runs too long to keep every request
    (``Cluster(..., keep_requests=False)``); :meth:`SimResult.summary` is the exact one."""

    LOW_S, DECADES = 1e-4, 8

    def __init__(self, bins_per_decade: int = 200) -> None:
        self.bins_per_decade = bins_per_decade
        self.finished = self.met = self.output_tokens = self.preemptions = 0
        size = self.DECADES * bins_per_decade + 2  # underflow and overflow bins at the ends
        self._histograms = {name: np.zeros(size, np.int64) for name in ("ttft_s", "tpot_s", "e2e_s")}

    def _bin(self, seconds: float) -> int:
        if not seconds > self.LOW_S:  # zero, tiny, or NaN
            return 0
        position = math.log10(seconds / self.LOW_S) * self.bins_per_decade
        return min(int(position) + 1, self.DECADES * self.bins_per_decade + 1)

    def on_finish(self, request: Request) -> None:
        self.finished += 1
        self.met += request.slo_met
        self.output_tokens += request.output_tokens
        self.preemptions += request.preemptions
        for name, value in zip(("ttft_s", "tpot_s", "e2e_s"), request.latencies(), strict=True):
            self._histograms[name][self._bin(value)] += 1

    def percentile(self, name: str, q: float) -> float:
        """The ``q``-th percentile (0-100) of a latency, as the upper edge of the bin that holds it."""
        counts = self._histograms[name]
        if not counts.sum():
            return math.nan
        index = int(np.searchsorted(np.cumsum(counts), q / 100 * counts.sum()))
        return self.LOW_S * 10 ** (index / self.bins_per_decade)

    def summary(self, offered: int) -> dict[str, float]:
        """Counts over ``offered`` requests and the latency percentiles of those that finished."""
        out: dict[str, float] = {
            "num_requests": offered,
            "completed": self.finished,
            "slo_attainment": self.met / offered if offered else math.nan,
            "output_tokens": self.output_tokens,
            "preemptions": self.preemptions,
        }
        for name in self._histograms:
            for q in (50, 99):
                out[f"{name[:-2]}_p{q}_s"] = self.percentile(name, q)
        return out
