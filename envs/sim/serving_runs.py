"""Measured serving runs of a real engine, and their replay in the simulator: the end-to-end fidelity check.

Why: the simulator's step times come from a structural model fitted on operator timings, and nothing in
that fit says whether *serving* comes out right — queueing, chunked-prefill batching, prefix caching and
KV capacity together. Only runs of a real engine can. A :class:`ServingRun` is one benchmark of one
replica (one vLLM engine): the hardware, the engine arguments that shape scheduling, and its stages
played one after another (each an arrival process, prompt and output lengths, and what was measured).
:func:`replay` plays the same stages through one simulated engine under a chosen performance profile and
compares the stage's simulated TTFT, TPOT and E2E (mean and P90, over the requests that arrived in it)
with the measured ones — the table a calibration loop minimises (it registers candidate coefficients
with :func:`servegym.perfmodel.profile.register_profile` and replays under their name).

Three formats, read by :func:`read_runs` (which also finds them in a folder):

- BLIS stage summaries (``summary_per_stage.csv`` beside ``runs/<experiment>/{exp-config,profile}.yaml``):
  inference-perf's shared-prefix workload at a constant rate per stage (evenly spaced arrivals). The
  client's own TPOT counts stream events, so TPOT is taken as ``(e2e_mean − ttft_mean) / (output_len −
  1)`` with the nominal output length, and its P90 is not known.
- Per-request records (LLMServingSim's ``per_request_normalized.csv`` beside ``vllm/meta.json``): exact
  arrival times and lengths, latencies per request.
- The plain format a user converts a benchmark of their own into: one JSON file (``"format":
  "servegym.serving_run/1"``: engine arguments, stages with their arrival process, lengths and measured
  metrics), optionally with a CSV of per-request records in the columns of the format above. The schema
  is in ``docs/calibration.md``.

Shared prefixes (a system prompt per group of users, then a question) map onto the simulator's prefix
hashes with one segment per KV block (:func:`servegym.envs.sim.workload.shared_prefix_hashes`), so prefix caching
reuses exactly the system prompt's full blocks, as vLLM's block hashes do. Malformed input raises
:class:`servegym.envs.sim.errors.ServingRunError` naming the file and the field.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from servegym.envs.sim.cluster import Cluster, ClusterConfig, InstanceGroup
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.errors import ServingRunError
from servegym.envs.sim.policies import LeastOutstandingRequests
from servegym.envs.sim.request import Request, State
from servegym.envs.sim.workload import RateSchedule, shared_prefix_hashes
from servegym.perfmodel.catalog import CatalogError, get_gpu, get_model, gpu_names

FORMAT = "servegym.serving_run/1"
ARRIVALS = ("even", "poisson", "exact")  # evenly spaced (a client's constant load), Poisson, or as recorded
METRICS = ("ttft", "tpot", "e2e")
STATS = ("mean", "p90")
BLIS_GPU = "H100-SXM"  # every BLIS default_args run is one H100-SXM replica (the data's README)
SATURATION_TTFT_S = 1.0  # a stage whose first tokens come later than this and keep growing is saturated
TTFT_BLOWUP = 10.0  # simulated mean TTFT this many times the measured one is flagged even without a trend


# -- the measured run --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineArgs:
    """The vLLM engine arguments that shape scheduling (``num_gpu_blocks``: the KV blocks vLLM reported,
    when known, replacing the simulator's memory-budget estimate so kernel errors are not mixed with
    capacity errors)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None
    dtype: str = "bf16"
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enforce_eager: bool = False  # vLLM's default: decode steps replay CUDA graphs
    async_scheduling: bool = True  # vLLM's default since late 2025 (the scheduler runs one step ahead)


@dataclass(frozen=True)
class SharedPrefix:
    """Prompts of ``groups`` × ``users_per_group`` users taking turns: each group shares a system prompt of
    ``system_prompt_tokens``; the rest of a prompt (the question) is new every time, or, with
    ``questions_repeat``, the same for every turn of a user (a client cycling a fixed set of prompts, as
    inference-perf's shared-prefix generator does), so a user's later turns hit the cache whole."""

    groups: int
    users_per_group: int
    system_prompt_tokens: int
    question_tokens: int | None = None  # nominal, informational: the prompt length is the stage's
    questions_repeat: bool = False


@dataclass(frozen=True)
class Measured:
    """What the benchmark measured over a stage's requests (ms); ``None`` where it was not measured."""

    requests: int
    ttft_mean_ms: float | None = None
    ttft_p90_ms: float | None = None
    tpot_mean_ms: float | None = None
    tpot_p90_ms: float | None = None
    e2e_mean_ms: float | None = None
    e2e_p90_ms: float | None = None

    def value(self, metric: str, stat: str) -> float | None:
        return getattr(self, f"{metric}_{stat}_ms")


@dataclass(frozen=True)
class RequestRecords:
    """Per-request inputs of a stage as recorded: arrival (s from the run's start) and lengths, and the
    measured TTFT (s) when known (for telling whether the real engine's queue grew)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    ttft_s: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True)
class Stage:
    """One stage of a benchmark: ``duration_s`` of arrivals (``even`` or ``poisson`` at ``rate``, or
    ``exact`` from ``records``), fixed prompt and output lengths unless recorded, an optional shared
    prefix, and the measurement."""

    index: int
    duration_s: float
    measured: Measured
    rate: float | None = None
    arrivals: str = "even"
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    prefix: SharedPrefix | None = None
    records: RequestRecords | None = None

    @property
    def measured_saturated(self) -> bool:
        """Whether the real engine's queue grew through the stage: from the records when there are some,
        else a mean TTFT above :data:`SATURATION_TTFT_S` (summaries give no trend)."""
        if self.records is not None and self.records.ttft_s is not None:
            return queue_grows(self.records.arrival_s, self.records.ttft_s)
        ttft = self.measured.ttft_mean_ms
        return ttft is not None and ttft > SATURATION_TTFT_S * 1e3


@dataclass(frozen=True)
class ServingRun:
    """A measured benchmark of one replica: hardware, engine arguments and stages played back to back."""

    name: str
    gpu: str
    model: str
    tp: int
    engine: EngineArgs
    stages: tuple[Stage, ...]
    source: str = ""
    notes: tuple[str, ...] = ()

    def unsupported(self) -> str | None:
        """Why the simulator cannot replay this run (None when it can): not one engine, or hardware or a
        model the catalog does not know."""
        if self.engine.data_parallel_size > 1 or self.engine.enable_expert_parallel:
            return (
                f"data-parallel x{self.engine.data_parallel_size}"
                f"{' with expert parallelism' if self.engine.enable_expert_parallel else ''}: "
                "the simulator replays one replica (one TP engine), not a DP/EP group"
            )
        try:
            get_gpu(self.gpu)
        except CatalogError:
            return f"GPU {self.gpu!r} is not in the catalog (perfmodel/data/gpus.csv)"
        try:
            get_model(self.model)
        except CatalogError:
            return f"model {self.model!r} is not in the catalog (perfmodel/data/models.json)"
        return None

    def engine_config(self, profile: str = "default") -> EngineConfig:
        """The simulated engine: this run's hardware and arguments, prefix hashes one per KV block."""
        e = self.engine
        return EngineConfig(
            gpu=self.gpu,
            model=get_model(self.model).name,
            tp=self.tp,
            dtype=e.dtype,
            max_num_batched_tokens=e.max_num_batched_tokens,
            max_num_seqs=e.max_num_seqs,
            block_size=e.block_size,
            gpu_memory_utilization=e.gpu_memory_utilization,
            max_model_len=e.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching,
            prefix_segment_tokens=e.block_size,
            profile=profile,
            num_gpu_blocks=e.num_gpu_blocks,
            async_scheduling=e.async_scheduling,
            cuda_graphs=not e.enforce_eager,
        )

    def requests(self, seed: int = 0, max_stage_s: float | None = None) -> tuple[list[Request], np.ndarray]:
        """The run as the simulator's requests (in arrival order) and each one's stage index.

        Stages follow one another as the benchmark played them. ``max_stage_s`` keeps only the first that
        many seconds of each stage (the stages then follow one another sooner): a documented subsample for
        runs too long to replay whole. ``seed`` draws Poisson arrivals and the order users take turns in.
        """
        times: list[np.ndarray] = []
        prompts: list[np.ndarray] = []
        outputs: list[np.ndarray] = []
        stage_of: list[np.ndarray] = []
        offset = 0.0  # where the stage starts in the replay
        for stage in self.stages:
            window = stage.duration_s if max_stage_s is None else min(stage.duration_s, max_stage_s)
            if stage.records is not None:  # recorded arrivals: as they were, or the stage's first window
                r = stage.records
                if max_stage_s is None:
                    t, p, o = r.arrival_s, r.prompt_tokens, r.output_tokens
                else:
                    begin = float(r.arrival_s.min())
                    keep = r.arrival_s - begin < window
                    t, p, o = r.arrival_s[keep] - begin + offset, r.prompt_tokens[keep], r.output_tokens[keep]
            else:
                cv = 0.0 if stage.arrivals == "even" else 1.0
                schedule = RateSchedule(((stage.duration_s, float(stage.rate)),), cv=cv)
                t = schedule.arrivals(0, np.random.default_rng([seed, stage.index]), horizon_s=window) + offset
                p = np.full(len(t), stage.prompt_tokens, dtype=np.int64)
                o = np.full(len(t), stage.output_tokens, dtype=np.int64)
            times.append(np.asarray(t, dtype=np.float64))
            prompts.append(np.asarray(p, dtype=np.int64))
            outputs.append(np.asarray(o, dtype=np.int64))
            stage_of.append(np.full(len(t), stage.index, dtype=np.int64))
            offset += window
        order = np.argsort(np.concatenate(times), kind="stable")
        arrival = np.concatenate(times)[order]
        prompt, output = np.concatenate(prompts)[order], np.concatenate(outputs)[order]
        stages = np.concatenate(stage_of)[order]
        by_index = {stage.index: stage for stage in self.stages}
        shuffle = np.random.default_rng([seed, 1 << 20])  # users take turns in one shuffled order, as the client's
        turns: dict[tuple[int, int], np.ndarray] = {}
        out = []
        for i in range(len(arrival)):
            prefix = by_index[int(stages[i])].prefix
            hashes: tuple[int, ...] = ()
            if prefix is not None:
                key = (prefix.groups, prefix.users_per_group)
                if key not in turns:
                    turns[key] = shuffle.permutation(prefix.groups * prefix.users_per_group)
                users = len(turns[key])
                user = int(turns[key][i % users])
                question = user if prefix.questions_repeat else users + i  # user ids and request ids kept apart
                hashes = shared_prefix_hashes(
                    user // prefix.users_per_group,
                    question,
                    int(prompt[i]),
                    prefix.system_prompt_tokens,
                    self.engine.block_size,
                )
            out.append(Request(i, float(arrival[i]), int(prompt[i]), int(output[i]), hash_ids=hashes))
        return out, stages


# -- replay ------------------------------------------------------------------------------------------------
def queue_grows(arrival_s: np.ndarray, ttft_s: np.ndarray) -> bool:
    """A stage whose queue grows without bound: the median TTFT of its last tenth of arrivals is above
    :data:`SATURATION_TTFT_S` and four times that of its first tenth."""
    arrival_s, ttft_s = np.asarray(arrival_s, dtype=float), np.asarray(ttft_s, dtype=float)
    ok = np.isfinite(ttft_s)
    arrival_s, ttft_s = arrival_s[ok], ttft_s[ok]
    if len(ttft_s) < 20:
        return bool(len(ttft_s) and np.median(ttft_s) > 10 * SATURATION_TTFT_S)
    order = np.argsort(arrival_s, kind="stable")
    tenth = max(len(order) // 10, 1)
    first, last = np.median(ttft_s[order[:tenth]]), np.median(ttft_s[order[-tenth:]])
    return bool(last > max(SATURATION_TTFT_S, 4 * first))


@dataclass
class Replay:
    """The measured-vs-simulated table of one run under one profile, one row per stage (see :func:`replay`)."""

    run: ServingRun
    profile: str
    table: pd.DataFrame
    kv_blocks: int
    wall_s: float
    notes: list[str] = field(default_factory=list)


def _stats(values_ms: np.ndarray) -> dict[str, float]:
    values_ms = values_ms[np.isfinite(values_ms)]
    if not len(values_ms):
        return {"mean": math.nan, "p90": math.nan}
    return {"mean": float(values_ms.mean()), "p90": float(np.percentile(values_ms, 90))}


def replay(run: ServingRun, profile: str = "default", seed: int = 0, max_stage_s: float | None = None) -> Replay:
    """Play ``run``'s stages through one simulated engine under ``profile`` and compare with the measurement.

    Deterministic for a given ``seed`` (no step-time noise). Each row of :attr:`Replay.table` holds, per
    metric (TTFT, TPOT, E2E) and statistic (mean, P90), the measured and simulated values in ms and the
    signed relative error (sim − measured) / measured, over the requests that arrived in the stage; then
    whether the simulated and the measured queue grew through the stage, and a ``flag`` where the
    simulator saturates (its queue grows, or its mean TTFT is over ten times the measured one) while the
    real engine did not.
    """
    reason = run.unsupported()
    if reason is not None:
        raise ServingRunError(f"{run.name}: cannot replay: {reason}")
    started = time.perf_counter()
    config = run.engine_config(profile)
    cluster = Cluster(ClusterConfig((InstanceGroup(1, config, name=run.name),)), LeastOutstandingRequests(), seed=seed)
    requests, stage_of = run.requests(seed, max_stage_s)
    cluster.run(requests)
    arrival = np.array([r.arrival_s for r in requests])
    latencies = np.array([r.latencies() for r in requests]).reshape(-1, 3) * 1e3
    finished = np.array([r.state is State.FINISHED for r in requests], dtype=bool)
    in_flight = np.array([r.state not in (State.FINISHED, State.REJECTED) for r in requests], dtype=bool)
    latencies[~finished] = math.nan
    rows = []
    for stage in run.stages:
        mine = stage_of == stage.index
        row: dict[str, Any] = {
            "run": run.name,
            "stage": stage.index,
            "rate_rps": stage.rate if stage.rate is not None else _records_rate(stage),
            "arrivals": stage.arrivals,
            "measured_requests": stage.measured.requests,
            "sim_requests": int(mine.sum()),
            "sim_finished": int((mine & finished).sum()),
        }
        for column, metric in enumerate(METRICS):
            simulated = _stats(latencies[mine, column])
            for stat in STATS:
                measured = stage.measured.value(metric, stat)
                sim = simulated[stat]
                row[f"{metric}_{stat}_measured_ms"] = math.nan if measured is None else measured
                row[f"{metric}_{stat}_sim_ms"] = sim
                row[f"{metric}_{stat}_err"] = (
                    (sim - measured) / measured if measured and math.isfinite(sim) else math.nan
                )
        sim_saturated = queue_grows(arrival[mine], latencies[mine, 0] / 1e3) or bool((mine & in_flight).any())
        measured_ttft = stage.measured.ttft_mean_ms
        blowup = (
            measured_ttft is not None
            and math.isfinite(row["ttft_mean_sim_ms"])
            and row["ttft_mean_sim_ms"] > TTFT_BLOWUP * measured_ttft
        )
        row["sim_saturated"] = sim_saturated
        row["measured_saturated"] = stage.measured_saturated
        flag = ""
        if not stage.measured_saturated and sim_saturated:
            flag = "SATURATES (sim queue grows)"
        elif not stage.measured_saturated and blowup:
            flag = f"TTFT x{row['ttft_mean_sim_ms'] / measured_ttft:.0f} measured"
        row["flag"] = flag
        rows.append(row)
    engine = cluster.engines[0]
    notes = list(run.notes)
    if run.engine.num_gpu_blocks:
        notes.append(f"KV cache: {engine.total_blocks:,} blocks as measured")
    else:
        notes.append(f"KV cache: {engine.total_blocks:,} blocks estimated by the performance model")
    if max_stage_s is not None and any(s.duration_s > max_stage_s for s in run.stages):
        notes.append(f"subsample: the first {max_stage_s:g} s of each stage replayed (measurements cover it whole)")
    rejected = int(sum(r.state is State.REJECTED for r in requests))
    if rejected:
        notes.append(f"{rejected} requests rejected by the simulated engine (longer than its context or KV cache)")
    return Replay(run, profile, pd.DataFrame(rows), engine.total_blocks, time.perf_counter() - started, notes)


def _records_rate(stage: Stage) -> float:
    r = stage.records
    if r is None or len(r) < 2:
        return math.nan
    span = float(r.arrival_s.max() - r.arrival_s.min())
    return (len(r) - 1) / span if span > 0 else math.nan


def format_replay(result: Replay) -> str:
    """The table of :func:`replay` as text: per stage and metric, measured → simulated (signed error)."""
    run = result.run
    head = (
        f"{run.name}: {get_gpu(run.gpu).name} x{run.tp}, {get_model(run.model).name}, "
        f"max_num_seqs {run.engine.max_num_seqs}, max_num_batched_tokens {run.engine.max_num_batched_tokens}; "
        f"profile {result.profile}; replayed in {result.wall_s:.1f} s"
    )
    labels = [f"{m.upper()} {s}" for m in METRICS for s in ("mean", "P90")]
    header = ["stage", "req/s", "requests", *labels, "flag"]
    body = []
    for row in result.table.to_dict("records"):
        cells = [str(row["stage"]), f"{row['rate_rps']:.2f}", f"{row['measured_requests']:,}"]
        for metric in METRICS:
            for stat in STATS:
                cells.append(
                    _cell(
                        row[f"{metric}_{stat}_measured_ms"], row[f"{metric}_{stat}_sim_ms"], row[f"{metric}_{stat}_err"]
                    )
                )
        cells.append(row["flag"])
        body.append(cells)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [head, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in body]
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)


def _cell(measured: float, sim: float, err: float) -> str:
    """``measured→simulated (±err)`` in ms; ``-`` for what is not known."""

    def ms(value: float) -> str:
        if not math.isfinite(value):
            return "-"
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"

    error = f" ({err:+.0%})" if math.isfinite(err) else ""
    return f"{ms(measured)}→{ms(sim)}{error}"


# -- readers -----------------------------------------------------------------------------------------------
def read_runs(path: str | Path) -> list[ServingRun]:
    """Every measured run at ``path``: a plain JSON file, a BLIS ``summary_per_stage.csv`` (or its folder, or
    one of its ``runs/<experiment>`` folders), a per-request run folder (``per_request_normalized.csv`` +
    ``vllm/meta.json``), or any folder holding such runs below it (plain JSON files found there must carry
    ``"format": "servegym.serving_run/1"``)."""
    path = Path(path)
    if not path.exists():
        raise ServingRunError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name == "summary_per_stage.csv":
            return read_blis(path)
        if path.name.endswith(".csv") and (path.parent / "vllm" / "meta.json").is_file():
            return [read_request_run(path.parent)]
        if path.suffix == ".json":
            return [read_plain(path)]
        raise ServingRunError(
            f"{path}: not a measured run (a plain .json run, a BLIS summary_per_stage.csv, or a "
            "per_request_normalized.csv beside vllm/meta.json)"
        )
    if (path / "summary_per_stage.csv").is_file():
        return read_blis(path / "summary_per_stage.csv")
    if (path / "exp-config.yaml").is_file() and (path.parent.parent / "summary_per_stage.csv").is_file():
        return read_blis(path.parent.parent / "summary_per_stage.csv", experiments=[path.name])
    if (path / "per_request_normalized.csv").is_file() and (path / "vllm" / "meta.json").is_file():
        return [read_request_run(path)]
    runs: list[ServingRun] = []
    for child in sorted(path.iterdir()):
        if child.is_dir():
            try:
                runs += read_runs(child)
            except ServingRunError as error:
                if "no measured run found" not in str(error):
                    raise
        elif child.suffix == ".json" and _is_plain(child):
            runs.append(read_plain(child))
    if not runs:
        raise ServingRunError(f"{path}: no measured run found (see read_runs for the formats)")
    return runs


def _is_plain(path: Path) -> bool:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("format") == FORMAT


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = False, optional: bool = False):
    """``value`` as a float (or int), or a :class:`ServingRunError` naming ``where``."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if optional:
            return None
        raise ServingRunError(f"{where}: missing")
    if isinstance(value, bool):
        raise ServingRunError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ServingRunError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ServingRunError(f"{where}: expected a finite number, got {value!r}")
    if integer:
        if number != int(number):
            raise ServingRunError(f"{where}: expected a whole number, got {value!r}")
        number = int(number)
    if positive and number <= 0:
        raise ServingRunError(f"{where}: must be positive, got {value!r}")
    if number < 0:
        raise ServingRunError(f"{where}: must not be negative, got {value!r}")
    return number


def _catalog_gpu(name: str) -> str:
    """The catalog name of a GPU as a benchmark names it (``NVIDIA GeForce RTX 4090``, ``RTXPRO6000``), or
    ``name`` unchanged when the catalog has no such GPU (the run then reports it as unsupported)."""
    try:
        return get_gpu(name).name
    except CatalogError:
        pass

    def key(text: str) -> str:
        text = text.lower().replace("nvidia", "").replace("geforce", "")
        return "".join(ch for ch in text if ch.isalnum())

    matches = [known for known in gpu_names() if key(known) == key(name)]
    return matches[0] if len(matches) == 1 else name


def _catalog_model(name: str) -> str:
    try:
        return get_model(name).name
    except CatalogError:
        return name


# BLIS (inference-sim/training default_args): stage summaries and each experiment's yaml files
BLIS_COLUMNS = (
    "experiment",
    "model",
    "tp",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "system_prompt_len",
    "question_len",
    "output_len",
    "num_system_prompts",
    "users_per_prompt",
    "stage",
    "requested_rate",
    "stage_duration_s",
    "n_success",
    "prompt_len_mean",
    "ttft_mean_ms",
    "ttft_p90_ms",
    "e2e_mean_ms",
    "e2e_p90_ms",
)


def read_blis(summary: str | Path, experiments: Iterable[str] | None = None, gpu: str = BLIS_GPU) -> list[ServingRun]:
    """BLIS runs from ``summary_per_stage.csv`` (one row per experiment and stage, plus ``summary`` rows that
    are skipped) and each experiment's ``runs/<experiment>/exp-config.yaml`` and ``profile.yaml``.

    The prompt length is the measured ``prompt_len_mean`` (after templating), the output length the
    nominal ``output_len`` (the client pins it with ``ignore_eos``; its measured mean has a
    re-tokenisation artefact). Arrivals follow ``profile.yaml``'s ``load.type``: ``constant`` is evenly
    spaced, ``poisson`` Poisson. Users repeat their questions (``questions_repeat``): inference-perf's
    shared-prefix generator cycles a fixed list of groups × users prompts, the measured prompt lengths do
    not grow from turn to turn, and the measurements need it — CodeLlama-34B on two H100s keeps TPOT at
    17 ms at 20 req/s, which leaves no GPU time to compute 20 × 575 new prompt tokens a second.
    """
    summary = Path(summary)
    wanted = set(experiments) if experiments is not None else None
    try:
        with open(summary, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in BLIS_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ServingRunError(f"{summary}: missing column(s) {missing}")
            rows = [(line, row) for line, row in enumerate(reader, start=2)]
    except OSError as error:
        raise ServingRunError(f"{summary}: cannot read ({error})") from None
    by_experiment: dict[str, list[tuple[int, dict]]] = {}
    for line, row in rows:
        if row["stage"].strip() == "summary":
            continue
        if wanted is None or row["experiment"] in wanted:
            by_experiment.setdefault(row["experiment"], []).append((line, row))
    if wanted is not None and not by_experiment:
        raise ServingRunError(f"{summary}: no stage rows for experiment(s) {sorted(wanted)}")
    runs = []
    for experiment, stage_rows in by_experiment.items():
        runs.append(_blis_run(summary, experiment, stage_rows, gpu))
    return runs


def _blis_run(summary: Path, experiment: str, stage_rows: list[tuple[int, dict]], gpu: str) -> ServingRun:
    run_dir = summary.parent / "runs" / experiment
    exp_config = _read_yaml(run_dir / "exp-config.yaml")
    profile = _read_yaml(run_dir / "profile.yaml")
    load = profile.get("load") if isinstance(profile.get("load"), dict) else None
    if load is None:
        raise ServingRunError(f"{run_dir / 'profile.yaml'}: missing field 'load'")
    load_type = load.get("type")
    if load_type not in ("constant", "poisson"):
        raise ServingRunError(
            f"{run_dir / 'profile.yaml'}: field 'load.type' must be constant or poisson, got {load_type!r}"
        )
    first_line, first = stage_rows[0]

    def field_of(line: int, row: dict, name: str, **kind):
        return _number(row[name], f"{summary}:{line}: field {name!r} ({experiment})", **kind)

    engine = EngineArgs(
        max_num_seqs=field_of(first_line, first, "max_num_seqs", integer=True, positive=True),
        max_num_batched_tokens=field_of(first_line, first, "max_num_batched_tokens", integer=True, positive=True),
        max_model_len=field_of(first_line, first, "max_model_len", integer=True, positive=True),
        gpu_memory_utilization=float(
            _number(
                exp_config.get("gpu_memory_utilization", 0.9),
                f"{run_dir / 'exp-config.yaml'}: field 'gpu_memory_utilization'",
                positive=True,
            )
        ),
    )
    prefix = SharedPrefix(
        groups=field_of(first_line, first, "num_system_prompts", integer=True, positive=True),
        users_per_group=field_of(first_line, first, "users_per_prompt", integer=True, positive=True),
        system_prompt_tokens=field_of(first_line, first, "system_prompt_len", integer=True),
        question_tokens=field_of(first_line, first, "question_len", integer=True),
        questions_repeat=True,
    )
    output_len = field_of(first_line, first, "output_len", integer=True, positive=True)
    if output_len < 2:
        raise ServingRunError(f"{summary}:{first_line}: field 'output_len' must be at least 2 to define TPOT")
    stages = []
    ordered = sorted(stage_rows, key=lambda item: field_of(item[0], item[1], "stage", integer=True))
    for line, row in ordered:
        ttft_mean = field_of(line, row, "ttft_mean_ms")
        e2e_mean = field_of(line, row, "e2e_mean_ms")
        measured = Measured(
            requests=field_of(line, row, "n_success", integer=True),
            ttft_mean_ms=ttft_mean,
            ttft_p90_ms=field_of(line, row, "ttft_p90_ms"),
            tpot_mean_ms=(e2e_mean - ttft_mean) / (output_len - 1),
            tpot_p90_ms=None,
            e2e_mean_ms=e2e_mean,
            e2e_p90_ms=field_of(line, row, "e2e_p90_ms"),
        )
        stages.append(
            Stage(
                index=field_of(line, row, "stage", integer=True),
                duration_s=field_of(line, row, "stage_duration_s", positive=True),
                measured=measured,
                rate=field_of(line, row, "requested_rate", positive=True),
                arrivals="even" if load_type == "constant" else "poisson",
                prompt_tokens=max(1, round(field_of(line, row, "prompt_len_mean", positive=True))),
                output_tokens=output_len,
                prefix=prefix,
            )
        )
    tp = field_of(first_line, first, "tp", integer=True, positive=True)
    model = str(exp_config.get("model") or first["model"])
    return ServingRun(
        name=experiment,
        gpu=_catalog_gpu(gpu),
        model=_catalog_model(model),
        tp=int(exp_config.get("tensor_parallelism", tp)),
        engine=engine,
        stages=tuple(stages),
        source=str(run_dir),
        notes=(
            "BLIS: TPOT measured = (E2E mean - TTFT mean) / (output_len - 1); its P90 is not known",
            "BLIS: block size 16 assumed; the source's CPU KV offload is not modelled",
            "BLIS: each user repeats its prompt (system prompt + question), so later turns hit the prefix cache",
        ),
    )


def _read_yaml(path: Path) -> dict:
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ServingRunError(f"{path}: missing (a BLIS run needs its exp-config.yaml and profile.yaml)") from None
    except (OSError, yaml.YAMLError) as error:
        raise ServingRunError(f"{path}: cannot read YAML ({error})") from None
    if not isinstance(document, dict):
        raise ServingRunError(f"{path}: expected a mapping at the top")
    return document


# per-request records (LLMServingSim's bench: per_request_normalized.csv + vllm/meta.json)
REQUEST_COLUMNS = ("arrival_s", "input_tokens", "output_tokens")
LATENCY_COLUMNS = ("ttft_ms", "tpot_ms", "e2e_ms")


def read_request_csv(path: str | Path) -> dict[int, tuple[RequestRecords, Measured]]:
    """Per-request records: ``arrival_s`` (s from the run's start), ``input_tokens``, ``output_tokens``, and
    optionally ``ttft_ms``, ``tpot_ms`` (``(last − first token) / (output − 1)``), ``e2e_ms`` and ``stage``
    (0, 1, ...; all 0 when absent). Returns, per stage, its records and what they measure."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ServingRunError(f"{path}: cannot read CSV ({error})") from None
    missing = [c for c in REQUEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ServingRunError(f"{path}: missing column(s) {missing}; needs {list(REQUEST_COLUMNS)}")
    if not len(frame):
        raise ServingRunError(f"{path}: no request rows")
    numeric = [c for c in (*REQUEST_COLUMNS, *LATENCY_COLUMNS, "stage") if c in frame.columns]
    for column in numeric:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna() | ~np.isfinite(values.fillna(0)) | (values < 0)
        if column in REQUEST_COLUMNS or column == "stage":
            bad |= frame[column].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ServingRunError(
                f"{path}:{row + 2}: field {column!r} must be a non-negative number, got {frame[column].iloc[row]!r}"
            )
        frame[column] = values
    for column in ("input_tokens", "output_tokens"):
        bad = (frame[column] < 1) | (frame[column] != frame[column].round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ServingRunError(f"{path}:{row + 2}: field {column!r} must be a whole number >= 1")
    if "stage" not in frame.columns:
        frame["stage"] = 0
    stages: dict[int, tuple[RequestRecords, Measured]] = {}
    for stage, part in frame.groupby("stage", sort=True):
        ttft = part["ttft_ms"].to_numpy(dtype=float) if "ttft_ms" in part else None
        stats: dict[str, float | None] = {}
        for metric in METRICS:
            column = f"{metric}_ms"
            values = part[column].to_numpy(dtype=float) if column in part else None
            if metric == "tpot" and values is not None:
                values = values[part["output_tokens"].to_numpy() > 1]
            computed = _stats(values) if values is not None else {"mean": None, "p90": None}
            for stat in STATS:
                value = computed[stat]
                stats[f"{metric}_{stat}_ms"] = None if value is None or not math.isfinite(value) else value
        records = RequestRecords(
            arrival_s=part["arrival_s"].to_numpy(dtype=float),
            prompt_tokens=part["input_tokens"].to_numpy(dtype=np.int64),
            output_tokens=part["output_tokens"].to_numpy(dtype=np.int64),
            ttft_s=None if ttft is None else ttft / 1e3,
        )
        stages[int(stage)] = (records, Measured(requests=len(part), **stats))
    return stages


def _records_stage(index: int, records: RequestRecords, measured: Measured, duration_s: float | None = None) -> Stage:
    """A stage of recorded requests; without a given duration it lasts from its first arrival to one mean
    gap after its last."""
    span = float(records.arrival_s.max() - records.arrival_s.min())
    gap = span / (len(records) - 1) if len(records) > 1 else 1.0
    return Stage(
        index=index,
        duration_s=duration_s if duration_s else span + gap,
        measured=measured,
        arrivals="exact",
        records=records,
    )


def read_request_run(run_dir: str | Path) -> ServingRun:
    """A per-request run folder: ``per_request_normalized.csv`` and ``vllm/meta.json`` (vLLM's engine
    arguments and KV cache as the bench recorded them); the GPU from ``meta.json``'s hardware, else the
    run's ``config.json``, else the parent folder's name."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "vllm" / "meta.json"
    meta = _read_json(meta_path)
    kwargs = meta.get("engine_kwargs")
    if not isinstance(kwargs, dict):
        raise ServingRunError(f"{meta_path}: missing field 'engine_kwargs'")
    kv = meta.get("kv_cache") if isinstance(meta.get("kv_cache"), dict) else {}

    def get(mapping: Mapping, name: str, where: str, default: Any = None, **kind):
        value = mapping.get(name, default)
        return _number(value, f"{meta_path}: field '{where}{name}'", optional=value is None, **kind)

    dtype = str(kwargs.get("dtype", "bfloat16")).replace("bfloat16", "bf16").replace("float16", "fp16")
    if dtype == "auto":
        dtype = "bf16"
    engine = EngineArgs(
        max_num_seqs=get(kwargs, "max_num_seqs", "engine_kwargs.", 256, integer=True, positive=True),
        max_num_batched_tokens=get(
            kwargs, "max_num_batched_tokens", "engine_kwargs.", 8192, integer=True, positive=True
        ),
        max_model_len=get(kwargs, "max_model_len", "engine_kwargs.", integer=True, positive=True),
        gpu_memory_utilization=get(kv, "gpu_memory_utilization", "kv_cache.", 0.9, positive=True),
        block_size=get(kv, "block_size", "kv_cache.", 16, integer=True, positive=True),
        enable_prefix_caching=bool(kv.get("enable_prefix_caching", True)),
        num_gpu_blocks=get(kv, "num_gpu_blocks", "kv_cache.", integer=True, positive=True),
        dtype=dtype,
        data_parallel_size=get(kwargs, "data_parallel_size", "engine_kwargs.", 1, integer=True, positive=True),
        enable_expert_parallel=bool(kwargs.get("enable_expert_parallel", False)),
        enforce_eager=bool(kwargs.get("enforce_eager", False)),
        async_scheduling=bool(kwargs.get("async_scheduling", True)),
    )
    gpu = (meta.get("hardware") or {}).get("device_name") if isinstance(meta.get("hardware"), dict) else None
    if not gpu and (run_dir / "config.json").is_file():
        try:
            gpu = json.loads((run_dir / "config.json").read_text())["nodes"][0]["instances"][0]["hardware"]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            gpu = None
    gpu = str(gpu or run_dir.parent.name)
    model = meta.get("model") or kwargs.get("model")
    if not model:
        raise ServingRunError(f"{meta_path}: missing field 'model'")
    stages = read_request_csv(run_dir / "per_request_normalized.csv")
    return ServingRun(
        name=f"{run_dir.parent.name}/{run_dir.name}",
        gpu=_catalog_gpu(gpu),
        model=_catalog_model(str(model)),
        tp=get(kwargs, "tensor_parallel_size", "engine_kwargs.", 1, integer=True, positive=True),
        engine=engine,
        stages=tuple(_records_stage(i, records, measured) for i, (records, measured) in stages.items()),
        source=str(run_dir),
        notes=("per-request records: exact arrivals and lengths; no shared-prefix structure known",),
    )


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ServingRunError(f"{path}: missing") from None
    except (OSError, ValueError) as error:
        raise ServingRunError(f"{path}: cannot read JSON ({error})") from None
    if not isinstance(document, dict):
        raise ServingRunError(f"{path}: expected a JSON object at the top")
    return document


# the plain format (docs/calibration.md)
RUN_KEYS = {"format", "name", "gpu", "model", "tp", "engine", "prefix", "stages", "requests_csv", "notes"}
ENGINE_KEYS = {
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "gpu_memory_utilization",
    "block_size",
    "enable_prefix_caching",
    "num_gpu_blocks",
    "dtype",
    "data_parallel_size",
    "enable_expert_parallel",
    "enforce_eager",
    "async_scheduling",
}
STAGE_KEYS = {"rate", "duration_s", "arrivals", "prompt_tokens", "output_tokens", "prefix", "measured"}
PREFIX_KEYS = {"groups", "users_per_group", "system_prompt_tokens", "question_tokens", "questions_repeat"}
MEASURED_KEYS = {"requests"} | {f"{m}_{s}_ms" for m in METRICS for s in STATS}


def _keys(mapping: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise ServingRunError(f"{where}: expected an object, got {mapping!r}")
    unknown = set(mapping) - allowed
    if unknown:
        raise ServingRunError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return mapping


def _prefix(mapping: Any, where: str) -> SharedPrefix | None:
    if mapping is None:
        return None
    _keys(mapping, PREFIX_KEYS, where)
    repeat = mapping.get("questions_repeat", False)
    if not isinstance(repeat, bool):
        raise ServingRunError(f"{where}.questions_repeat: expected true or false, got {repeat!r}")
    return SharedPrefix(
        groups=_number(mapping.get("groups"), f"{where}.groups", integer=True, positive=True),
        users_per_group=_number(
            mapping.get("users_per_group"), f"{where}.users_per_group", integer=True, positive=True
        ),
        system_prompt_tokens=_number(
            mapping.get("system_prompt_tokens"), f"{where}.system_prompt_tokens", integer=True
        ),
        question_tokens=_number(
            mapping.get("question_tokens"), f"{where}.question_tokens", integer=True, optional=True
        ),
        questions_repeat=repeat,
    )


def _measured(mapping: Any, where: str, requests: int | None = None) -> Measured:
    _keys(mapping, MEASURED_KEYS, where)
    values = {key: _number(mapping.get(key), f"{where}.{key}", optional=True) for key in MEASURED_KEYS - {"requests"}}
    count = _number(mapping.get("requests", requests), f"{where}.requests", integer=True)
    return Measured(requests=count, **values)


def read_plain(path: str | Path) -> ServingRun:
    """A run in the plain JSON format (``"format": "servegym.serving_run/1"``; schema in docs/calibration.md)."""
    path = Path(path)
    document = _read_json(path)
    where = str(path)
    if document.get("format") != FORMAT:
        raise ServingRunError(f"{where}: field 'format' must be {FORMAT!r}, got {document.get('format')!r}")
    _keys(document, RUN_KEYS, where)
    for name in ("gpu", "model"):
        if not isinstance(document.get(name), str) or not document[name]:
            raise ServingRunError(f"{where}: field {name!r} must be a non-empty string")
    engine_map = _keys(document.get("engine", {}), ENGINE_KEYS, f"{where}: engine")
    engine_values: dict[str, Any] = {}
    for key, value in engine_map.items():
        label = f"{where}: engine.{key}"
        if key in ("enable_prefix_caching", "enable_expert_parallel", "enforce_eager", "async_scheduling"):
            if not isinstance(value, bool):
                raise ServingRunError(f"{label}: expected true or false, got {value!r}")
            engine_values[key] = value
        elif key == "dtype":
            engine_values[key] = str(value)
        elif key == "gpu_memory_utilization":
            engine_values[key] = _number(value, label, positive=True)
        else:
            engine_values[key] = _number(
                value, label, integer=True, positive=True, optional=key in ("max_model_len", "num_gpu_blocks")
            )
    engine = EngineArgs(**engine_values)
    run_prefix = _prefix(document.get("prefix"), f"{where}: prefix")
    stage_maps = document.get("stages")
    if stage_maps is not None and (not isinstance(stage_maps, list) or not stage_maps):
        raise ServingRunError(f"{where}: field 'stages' must be a non-empty list")
    recorded: dict[int, tuple[RequestRecords, Measured]] = {}
    if document.get("requests_csv"):
        csv_path = (path.parent / str(document["requests_csv"])).resolve()
        if not csv_path.is_file():
            raise ServingRunError(f"{where}: field 'requests_csv': no such file {csv_path}")
        recorded = read_request_csv(csv_path)
    elif stage_maps is None:
        raise ServingRunError(f"{where}: give 'stages', or 'requests_csv' with per-request records")
    stages = []
    if stage_maps is None:
        stages = [_records_stage(i, records, measured) for i, (records, measured) in recorded.items()]
    else:
        if recorded and set(recorded) - set(range(len(stage_maps))):
            raise ServingRunError(
                f"{where}: requests_csv has stage(s) {sorted(set(recorded) - set(range(len(stage_maps))))} "
                f"beyond the {len(stage_maps)} given in 'stages'"
            )
        for index, mapping in enumerate(stage_maps):
            label = f"{where}: stages[{index}]"
            _keys(mapping, STAGE_KEYS, label)
            prefix = _prefix(mapping["prefix"], f"{label}.prefix") if "prefix" in mapping else run_prefix
            if index in recorded:
                records, measured = recorded[index]
                if "measured" in mapping:  # the stage's own figures fill in what the records do not hold
                    given = _measured(mapping["measured"], f"{label}.measured", len(records))
                    missing = [f"{m}_{s}_ms" for m in METRICS for s in STATS if measured.value(m, s) is None]
                    measured = replace(measured, **{name: getattr(given, name) for name in missing})
                duration = _number(mapping.get("duration_s"), f"{label}.duration_s", positive=True, optional=True)
                stage = _records_stage(index, records, measured, duration)
                stages.append(replace(stage, prefix=prefix))
                continue
            arrivals = mapping.get("arrivals", "even")
            if arrivals not in ("even", "poisson"):
                raise ServingRunError(
                    f"{label}.arrivals: must be even or poisson (exact needs requests_csv), got {arrivals!r}"
                )
            if "measured" not in mapping:
                raise ServingRunError(f"{label}.measured: missing")
            output = _number(mapping.get("output_tokens"), f"{label}.output_tokens", integer=True, positive=True)
            stages.append(
                Stage(
                    index=index,
                    duration_s=_number(mapping.get("duration_s"), f"{label}.duration_s", positive=True),
                    measured=_measured(mapping["measured"], f"{label}.measured"),
                    rate=_number(mapping.get("rate"), f"{label}.rate", positive=True),
                    arrivals=arrivals,
                    prompt_tokens=_number(
                        mapping.get("prompt_tokens"), f"{label}.prompt_tokens", integer=True, positive=True
                    ),
                    output_tokens=output,
                    prefix=prefix,
                )
            )
    notes = document.get("notes") or []
    if not isinstance(notes, list):
        raise ServingRunError(f"{where}: field 'notes' must be a list of strings")
    return ServingRun(
        name=str(document.get("name") or path.stem),
        gpu=_catalog_gpu(document["gpu"]),
        model=_catalog_model(document["model"]),
        tp=_number(document.get("tp", 1), f"{where}: tp", integer=True, positive=True),
        engine=engine,
        stages=tuple(stages),
        source=str(path),
        notes=tuple(str(n) for n in notes),
    )
