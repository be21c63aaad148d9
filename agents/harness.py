"""Compare policy combinations on identical workloads: common random numbers, seeds, confidence intervals.

A *task* is (policy, workload, seed, load multiplier). Every policy sees the same arrivals for a given
workload seed, so differences between policies are not noise in the input. Tasks run in parallel
processes; each builds its cluster, workload and fresh policy objects from plain mappings, so results do
not depend on the order or the process they ran in.

Policies have one loading path, :func:`load_policy`: a mapping with ``router``, ``batch`` and optional
``pools`` entries, each a hydra ``_target_`` mapping (or the string ``router`` to reuse the router object
as pool policy, as Arrow needs).
"""

from __future__ import annotations

import math
import multiprocessing
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from servegym.agents import exported, run_dir
from servegym.agents.configs import is_trace
from servegym.envs.sim.cluster import Cluster
from servegym.envs.sim.config import cluster_from, workload_from, workload_parts
from servegym.envs.sim.workload import scale_load

METRICS = (
    "slo_attainment",
    "goodput_rps",
    "throughput_tok_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "e2e_p50_s",
    "preemption_rate",
    "prefix_hit_rate",
)


@dataclass(frozen=True)
class PolicyBundle:
    """The three decisions a cluster asks: routing, batching, pools (None: static)."""

    router: Any
    batch: Any
    pools: Any = None


def load_policy(spec: Mapping) -> PolicyBundle:
    """Fresh policy objects from a policy mapping (``router``/``batch``/``pools``, hydra ``_target_`` style)."""
    from hydra.utils import instantiate

    spec = dict(spec)
    router = instantiate(spec["router"])
    batch = instantiate(spec["batch"]) if spec.get("batch") else None
    pools = spec.get("pools")
    if pools == "router":
        pools = router
    elif pools:
        pools = instantiate(pools)
    return PolicyBundle(router, batch, pools)


SAVED_CLASSES = {  # (export, training run) classes per bundle slot
    "router": ("servegym.agents.exported.ExportedRouter", "servegym.agents.learned.LearnedRouter"),
    "batch": ("servegym.agents.exported.ExportedBatcher", "servegym.agents.learned.LearnedBatcher"),
    "pools": ("servegym.agents.exported.ExportedPools", "servegym.agents.learned.LearnedPools"),
}
LOR = {"_target_": "servegym.envs.sim.policies.LeastOutstandingRequests"}
VLLM = {"_target_": "servegym.envs.sim.policies.VllmPolicy"}


def saved_policy_spec(
    path: str | Path,
    batch: Mapping | None = None,
    router: Mapping | None = None,
    pools: Mapping | None = None,
    expect: str | None = None,
) -> dict[str, Any]:
    """A policy spec for a saved policy: an export (``policy.json`` + ONNX, no pickle) or a training run
    (``manifest.json`` + ``model.zip``, unpickled by stable-baselines3: trusted paths only). Its manifest's
    environment says which slot it fills (Route-v0 → router, Batch-v0 → batch, Pools-v0 → pools); the
    other slots are ``router`` (least outstanding requests), ``batch`` (vLLM) and ``pools`` (static),
    the inline heuristics the environments train with. ``expect`` (a slot) refuses a policy of another
    kind in one line (:class:`servegym.agents.learned.KindMismatch`)."""
    from servegym.agents.learned import check_kind, kind_of

    path = Path(path)
    if exported.is_export(path):
        manifest, which = exported.read_manifest(path), 0  # verified when the policy loads
    elif run_dir.is_run(path):
        manifest, which = run_dir.read_manifest(path), 1
    else:
        raise FileNotFoundError(
            f"{path}: neither an exported policy ({exported.MANIFEST}) nor a training run ({run_dir.MANIFEST})"
        )
    kind = kind_of(manifest, str(path))
    if expect is not None:
        check_kind(manifest, expect, str(path))
    spec: dict[str, Any] = {
        "router": dict(router) if router else dict(LOR),
        "batch": dict(batch) if batch else dict(VLLM),
        "pools": dict(pools) if pools else None,
    }
    spec[kind] = {"_target_": SAVED_CLASSES[kind][which], ("path" if which == 0 else "run"): str(path)}
    return spec


SLOT_KIND = {"router": "route", "batch": "batch", "pools": "pools"}  # bundle slot -> decision kind


def plugin_policy_spec(ref: str) -> dict[str, Any]:
    """A policy spec for a user's own policy from outside ``conf/policy``: a class by import path
    (``package.module:Class``, ``package.module.Class`` or ``path/to/file.py:Class``; a router, batch former
    or pool policy, the other slots filled as :func:`saved_policy_spec` fills them) or a policy YAML file
    (``router``/``batch``/``pools`` as in ``conf/policy``; its ``_target_``s may be such import paths). The
    spec's ``kind`` says which decision it makes (``route``, ``batch``, ``pools``)."""
    from servegym.envs.plugins import PluginError, import_target, normalised
    from servegym.envs.sim.policies import BatchPolicy, PoolPolicy, RoutingPolicy

    if isinstance(ref, str) and ref.endswith((".yaml", ".yml")):
        from omegaconf import OmegaConf

        if not Path(ref).is_file():
            raise FileNotFoundError(f"policy file {ref}: no such file")
        spec = OmegaConf.to_container(OmegaConf.load(ref), resolve=True)
        if not isinstance(spec, dict) or not isinstance(spec.get("router"), dict):
            raise PluginError(f"policy file {ref}: needs a router (and batch, pools) as in conf/policy")
        for slot in ("router", "batch", "pools"):
            if isinstance(spec.get(slot), dict):
                spec[slot] = normalised(spec[slot])
        spec.setdefault("kind", "route")
        return spec
    cls, target = import_target(ref)
    slots = [
        s
        for s, base in (("router", RoutingPolicy), ("batch", BatchPolicy), ("pools", PoolPolicy))
        if isinstance(cls, type) and issubclass(cls, base)
    ]
    if not slots:
        raise PluginError(
            f"policy import path {ref!r} names {cls!r}, not a subclass of servegym.envs.sim.policies.RoutingPolicy, "
            "BatchPolicy or PoolPolicy"
        )
    spec: dict[str, Any] = {"router": dict(LOR), "batch": dict(VLLM), "pools": None}
    spec[slots[0]] = {"_target_": target}
    if slots == ["router", "pools"]:
        spec["pools"] = "router"  # one object routing and sizing the pools, as Arrow
    spec["kind"] = "pools" if "pools" in slots else SLOT_KIND[slots[0]]
    return spec


def spec_kind(spec: Mapping[str, Any]) -> str:
    """The decision kind a policy spec is about: its ``kind`` if it says, the slot of a saved policy, else
    routing (a conf/policy entry with a pool policy: pools)."""
    if spec.get("kind"):
        return str(spec["kind"])
    for slot, classes in SAVED_CLASSES.items():
        if isinstance(spec.get(slot), Mapping) and spec[slot].get("_target_") in classes:
            return SLOT_KIND[slot]
    return "pools" if spec.get("pools") else "route"


def policy_specs(
    names: list[str],
    saved: Mapping[str, str] | None = None,
    custom: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    dirs: list[str] | tuple = (),
) -> dict[str, dict[str, Any]]:
    """Every policy an entry point compares, by name: ``conf/policy`` entries (and those of ``dirs``, a
    user's config folders), saved runs and exports (:func:`saved_policy_spec`) and a user's own classes or
    policy files (:func:`plugin_policy_spec`); a name given twice is refused."""
    from servegym.agents.configs import ConfigError, named_configs

    specs = named_configs("policy", list(names), overrides, extra_dirs=dirs)
    for group, refs, build in (("saved", saved, saved_policy_spec), ("custom", custom, plugin_policy_spec)):
        for name, ref in (refs or {}).items():
            if name in specs:
                raise ConfigError(f"{group} policy {name!r} has the name of another policy; rename it")
            specs[name] = build(ref)
    return specs


def warn_if_one_window(workloads: Mapping[str, Mapping[str, Any]], seeds: list[int]) -> None:
    """Seeds that cannot change the arrivals make every interval a ±0.00 on the same input: say so, per
    trace workload that replays one fixed window (``random_window: false``)."""
    if len(seeds) < 2:
        return
    for name, workload in workloads.items():
        if any(is_trace(part) and not part.get("random_window", False) for part in workload_parts(workload)):
            warnings.warn(
                f"workload {name}: a trace replayed from one fixed window (random_window: false): the {len(seeds)} "
                "seeds do not change the arrivals, only the simulator's step noise, so the intervals do not "
                f"measure variation of the input; set workload_overrides={{{name}: {{random_window: true, "
                "num_requests: N}}}",
                stacklevel=2,
            )


@dataclass(frozen=True)
class Task:
    policy: str
    workload: str
    seed: int
    load: float  # multiplier of the workload's rate


def run_task(
    task: Task, policy: Mapping, workload: Mapping, cluster: Mapping, keep_records: bool = False
) -> dict[str, Any]:
    """Simulate one task; returns its summary row (and the per-request records when asked)."""
    bundle = load_policy(policy)
    requests = scale_load(workload_from(workload), task.load).generate(task.seed)
    cluster_config = cluster_from(cluster)
    sim = Cluster(cluster_config, bundle.router, batch_policy=bundle.batch, seed=task.seed, pool_policy=bundle.pools)
    result = sim.run(requests)
    summary = result.summary()
    row = {
        "policy": task.policy,
        "workload": task.workload,
        "seed": task.seed,
        "load": task.load,
        "offered_rps": (len(requests) - 1) / max(requests[-1].arrival_s, 1e-9) if len(requests) > 1 else 0.0,
        "num_requests": summary["num_requests"],
        "completed": summary["completed"],
        "rejected": summary["rejected"],
        "flips": len(sim.flips),
        "profiles": ",".join(cluster_config.profiles),
        "wall_s": summary["wall_s"],
        **{m: summary[m] for m in METRICS},
    }
    if keep_records:
        row["records"] = result.records()[["ttft_s", "tpot_s", "e2e_s", "state"]]
    return row


def _inside_a_sweep_worker() -> bool:
    """In a joblib/loky (or other non-standard) worker process: its start method is not one that a spawned
    child can re-create ("cannot find context for 'loky'"), and a daemon cannot have children at all."""
    method = multiprocessing.get_start_method(allow_none=True)
    return method not in (None, "spawn", "fork", "forkserver") or multiprocessing.current_process().daemon


def _run_packed(args: tuple) -> dict[str, Any]:
    return run_task(*args)


@contextmanager
def worker_pool(jobs: int) -> Iterator[Executor | None]:
    """``jobs`` worker processes for :func:`run_tasks` (None, run in this process, when ``jobs`` is 1 or
    inside a sweep worker: the sweep already runs jobs in parallel, and its workers cannot start spawn pools)."""
    if jobs <= 1 or _inside_a_sweep_worker():
        yield None
        return
    # spawn, not fork: a forked child of a process whose torch/OpenMP threads are running can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def run_tasks(
    tasks: list[Task],
    policies: Mapping,
    workloads: Mapping,
    cluster: Mapping,
    jobs: int = 1,
    keep_records: bool = False,
    progress: bool = True,
    pool: Executor | None = None,
) -> list[dict[str, Any]]:
    """All tasks, in parallel processes when ``jobs > 1`` (or in ``pool``, a :func:`worker_pool` kept across
    calls, so many small calls do not each start processes); rows come back in task order."""
    packed = [(t, policies[t.policy], workloads[t.workload], cluster, keep_records) for t in tasks]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="evaluating", unit="run")
    rows: list[dict[str, Any]] = []
    if pool is not None:
        for row in pool.map(_run_packed, packed):
            rows.append(row)
            if bar:
                bar.update(1)
    elif jobs > 1 and not _inside_a_sweep_worker():
        with worker_pool(jobs) as own:
            for row in own.map(_run_packed, packed):
                rows.append(row)
                if bar:
                    bar.update(1)
    else:
        for args in packed:
            rows.append(_run_packed(args))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return rows


def confidence_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t interval over seeds (half-width NaN with one seed)."""
    values = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, half


def summarise(rows: list[dict[str, Any]], reference: str | None = None) -> pd.DataFrame:
    """Per (workload, load, policy): each metric's mean and 95% CI half-width over seeds, and against the
    reference policy its ratio of means and the paired per-seed difference (mean ± CI: the same arrivals
    per seed make the paired interval much tighter than the two separate ones)."""
    frame = pd.DataFrame([{k: v for k, v in row.items() if k != "records"} for row in rows])
    ref_rows = frame[frame["policy"] == reference].set_index(["workload", "load", "seed"]) if reference else None
    out = []
    for (workload, load, policy), group in frame.groupby(["workload", "load", "policy"], sort=False):
        entry = {"workload": workload, "load": load, "policy": policy, "seeds": len(group)}
        for metric in METRICS:
            mean, half = confidence_interval(group[metric])
            entry[metric], entry[f"{metric}_ci"] = mean, half
            if ref_rows is not None and len(ref_rows):
                keys = [(workload, load, seed) for seed in group["seed"]]
                paired = group[metric].to_numpy() - ref_rows.reindex(keys)[metric].to_numpy()
                entry[f"{metric}_diff"], entry[f"{metric}_diff_ci"] = confidence_interval(paired)
        out.append(entry)
    table = pd.DataFrame(out)
    if reference is not None and reference in set(table["policy"]):
        for metric in METRICS:
            ref = table[table["policy"] == reference].set_index(["workload", "load"])[metric]
            keys = list(zip(table["workload"], table["load"], strict=True))
            table[f"{metric}_vs_ref"] = [
                table[metric].iloc[n] / ref.get(k, math.nan) if ref.get(k) else math.nan for n, k in enumerate(keys)
            ]
    return table


def head_to_head(rows: list[dict[str, Any]], policy: str, metric: str = "slo_attainment") -> pd.DataFrame:
    """``policy`` against every other policy, seed by seed on the same arrivals: the paired difference
    (mean, 95% CI half-width) and how many seeds it wins, ties and loses, per workload and load."""
    frame = pd.DataFrame([{k: v for k, v in row.items() if k != "records"} for row in rows])
    mine = frame[frame["policy"] == policy].set_index(["workload", "load", "seed"])[metric]
    out = []
    for (workload, load, other), group in frame[frame["policy"] != policy].groupby(
        ["workload", "load", "policy"], sort=False
    ):
        keys = [(workload, load, seed) for seed in group["seed"]]
        diff = mine.reindex(keys).to_numpy() - group[metric].to_numpy()
        diff = diff[~np.isnan(diff)]
        mean, half = confidence_interval(diff)
        out.append(
            {
                "workload": workload,
                "load": load,
                "policy": policy,
                "versus": other,
                "seeds": len(diff),
                f"{metric}_diff": mean,
                f"{metric}_diff_ci": half,
                "wins": int(np.sum(diff > 1e-12)),
                "ties": int(np.sum(np.abs(diff) <= 1e-12)),
                "losses": int(np.sum(diff < -1e-12)),
            }
        )
    return pd.DataFrame(out)


def bisection(
    target: float = 0.9, low: float = 0.05, high: float = 4.0, iterations: int = 7
) -> Generator[float, float, float]:
    """The search of :func:`max_sustainable_load` as a generator: it yields the loads to evaluate, is sent
    each one's mean attainment, and returns the result, so a caller can advance many searches together."""
    cap = 16 * high  # the widening's end (64 from the default start)
    if (yield low) < target:
        return 0.0
    while (yield high) >= target:
        low, high = high, high * 2
        if high > cap:
            return low
    for _ in range(iterations):
        mid = (low + high) / 2
        if (yield mid) >= target:
            low = mid
        else:
            high = mid
    return low


def max_sustainable_load(
    evaluate: Callable[[float], float], target: float = 0.9, low: float = 0.05, high: float = 4.0, iterations: int = 7
) -> float:
    """Bisection for the largest load multiplier whose mean SLO attainment (``evaluate``) meets ``target``.

    Attainment falls with load; the search widens ``high`` until it fails (doubling it, up to 16x its
    start: 64 from the default) and returns the last load known to meet the target (0 if even ``low`` misses it).
    """

    def each(points: list[tuple[str, float]]) -> list[float]:
        return [evaluate(load) for _, load in points]

    return max_sustainable_loads(each, ["one"], target, low, high, iterations)["one"]


def max_sustainable_loads(
    evaluate: Callable[[list[tuple[str, float]]], list[float]],
    names: Iterable[str],
    target: float = 0.9,
    low: float = 0.05,
    high: float = 4.0,
    iterations: int = 7,
) -> dict[str, float]:
    """:func:`max_sustainable_load` for several policies in lockstep: every round ``evaluate`` gets each
    unfinished search's next (name, load) at once (one batch of simulations, parallel over policies and
    seeds) and returns their mean attainments in order."""
    searches = {name: bisection(target, low, high, iterations) for name in names}
    pending = {name: next(search) for name, search in searches.items()}
    found: dict[str, float] = {}
    while pending:
        points = list(pending.items())
        results = evaluate(points)
        pending = {}
        for (name, _), attainment in zip(points, results, strict=True):
            try:
                pending[name] = searches[name].send(attainment)
            except StopIteration as done:
                found[name] = done.value
    return found
