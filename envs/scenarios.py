"""Scenarios as data: ``conf/scenario/<name>.yaml`` names a cluster, a workload and its SLO classes, the
decision kinds it poses (route, batch, pools) with each kind's reference heuristic and baselines, the load
factors, the request windows and the fixed seed lists of its training, validation and test windows, with a
version. Every consumer reads the same file: the Gymnasium ids (``servegym/Route-hetero-conv-v0`` ...,
registered by ``import servegym`` from the files' names and kinds, built here by :func:`make`), and
``scenario=NAME`` in ``experiments/{simulate,evaluate,train,leaderboard}.py`` and ``reproduce.py``.

Loads are multipliers of the workload's rate as the scenario states it (traces are stated at their own
speed, ``rate_scale: 1``, so ``test: 17`` is x17 of the trace); :func:`servegym.envs.sim.workload.scale_load`
applies them, as everywhere else.

This module reads YAML only (it imports no simulator), so registering the ids stays cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from servegym.envs.sim.config import MULTI_PART, workload_parts

KINDS = {"route": "Route", "batch": "Batch", "pools": "Pools"}  # decision kind -> its environment's id stem
ENTRY_POINTS = {
    "route": "servegym.envs.route_env:RouteEnv",
    "batch": "servegym.envs.batch_env:BatchEnv",
    "pools": "servegym.envs.pools_env:PoolsEnv",
}
FIELDS = {
    "name",
    "version",
    "description",
    "cluster",
    "workload",
    "workload_overrides",
    "slo",
    "windows",
    "loads",
    "decisions",
    "seeds",
}


class ScenarioError(ValueError):
    """An unknown scenario name, or a scenario file that does not say what it must (named in the message)."""


def conf_dir() -> Path:
    """The config folder: ``conf/`` beside the package folders in a checkout, ``servegym/conf`` in a wheel."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "conf", here / "servegym" / "conf"):
        if candidate.is_dir():
            return candidate
    return here / "conf"


def scenario_dir() -> Path:
    return conf_dir() / "scenario"


def names() -> list[str]:
    """Every scenario file's name, sorted."""
    return sorted(p.stem for p in scenario_dir().glob("*.yaml"))


def _read(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario file is a mapping")
    return data


def env_ids_of(name: str) -> dict[str, str]:
    """The Gymnasium ids a scenario file registers (kind -> id), read without validating the rest."""
    data = _read(scenario_dir() / f"{name}.yaml")
    version = int(data.get("version", 0))
    return {kind: env_id(name, kind, version) for kind in data.get("decisions", {}) if kind in KINDS}


def env_id(name: str, kind: str, version: int) -> str:
    return f"servegym/{KINDS[kind]}-{name}-v{version}"


def _named(group: str, value: Any, where: str) -> dict[str, Any]:
    """A ``conf/<group>/<name>.yaml`` by name, or an inline mapping as it is."""
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    path = conf_dir() / group / f"{value}.yaml"
    if not isinstance(value, str) or not path.is_file():
        known = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        raise ScenarioError(f"{where}: unknown {group} {value!r}; known: {', '.join(known)}")
    data = _read(path)
    data.setdefault("name", value)
    return data


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value or not all(isinstance(s, int) for s in value):
        raise ScenarioError(f"{where} must be a non-empty list of integer seeds, got {value!r}")
    return tuple(value)


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ScenarioError(f"{where} must be a positive load factor, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Decision:
    """One decision kind a scenario poses: the heuristic scores are relative to, the baselines the
    leaderboard runs (``conf/policy`` names) and the environment's extra arguments."""

    kind: str
    reference: str
    baselines: tuple[str, ...]
    env: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    version: int
    description: str
    cluster: dict[str, Any]  # a cluster mapping (conf/cluster format)
    workload: dict[str, Any]  # a workload mapping at load 1 (its overrides and SLO classes applied), unwindowed
    decisions: dict[str, Decision]
    loads: dict[str, Any]  # train, test (floats), validation (list), search ([low, high] of the bisection)
    windows: dict[str, Any]  # requests per window (train, test); search_s: seconds of arrivals per bisection window
    seeds: dict[str, tuple[int, ...]]  # train, validation, test

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.decisions)

    def env_id(self, kind: str) -> str:
        return env_id(self.name, kind, self.version)

    @property
    def is_trace(self) -> bool:
        return self.workload.get("kind", "synthetic") == "trace"

    def window(self, requests: int | None = None, duration_s: float | None = None) -> dict[str, Any]:
        """The workload cut to windows of ``requests`` requests, or of ``duration_s`` seconds of arrivals
        (then the number of requests grows with the load, as a sustained load's backlog does); a trace's
        seed picks where each window starts. A concatenation or a mixture cuts every part."""
        if (requests is None) == (duration_s is None):
            raise ScenarioError("a window is a number of requests or a duration, one of the two")
        workload = copy.deepcopy(self.workload)
        for part in workload_parts(workload):
            part["num_requests"], part["duration_s"] = requests, duration_s
            if part.get("kind", "synthetic") == "trace":
                part["random_window"] = True
        return workload

    def search_window(self) -> dict[str, Any]:
        """The maximum-load bisection's window: ``windows.search_s`` seconds of arrivals."""
        return self.window(duration_s=self.windows["search_s"])

    def workload_at(self, load: float, requests: int) -> dict[str, Any]:
        """A windowed workload mapping at ``load`` (the factor applied to a trace's ``rate_scale`` or a
        synthetic workload's rates, as :func:`servegym.envs.sim.workload.scale_load` does)."""
        return scaled(self.window(requests), load)

    def env_kwargs(self, kind: str) -> dict[str, Any]:
        """The arguments of ``gym.make(self.env_id(kind))``: the cluster, training windows at the training
        load, and the kind's environment arguments."""
        if kind not in self.decisions:
            raise ScenarioError(f"scenario {self.name!r} poses {', '.join(self.kinds)}, not {kind}")
        return {
            "cluster": copy.deepcopy(self.cluster),
            "workload": self.workload_at(self.loads["train"], self.windows["train"]),
            **copy.deepcopy(self.decisions[kind].env),
        }


def scaled(workload: dict[str, Any], load: float) -> dict[str, Any]:
    """A workload mapping at ``load`` times its rate (mirrors ``scale_load`` on the mapping, so a training
    run's config records the rate it trained at)."""
    workload = copy.deepcopy(workload)
    if workload.get("kind") in MULTI_PART:
        workload["parts"] = [scaled(part, load) for part in workload["parts"]]
    elif workload.get("kind", "synthetic") == "trace":
        if workload.get("target_rate"):
            workload["target_rate"] = float(workload["target_rate"]) * load
        else:
            workload["rate_scale"] = float(workload.get("rate_scale", 1.0)) * load
    else:
        arrivals = workload.setdefault("arrivals", {})
        if "pieces" in arrivals:
            arrivals["pieces"] = [[d, r * load] for d, r in arrivals["pieces"]]
        else:
            arrivals["rate"] = float(arrivals.get("rate", 1.0)) * load
    return workload


def _file(name: Any) -> Path:
    """``conf/scenario/<name>.yaml``; an unknown name lists the known ones."""
    if not isinstance(name, str) or not (scenario_dir() / f"{name}.yaml").is_file():
        raise ScenarioError(f"unknown scenario {name!r}; known: {', '.join(names())}")
    return scenario_dir() / f"{name}.yaml"


def load(name: str) -> Scenario:
    """``conf/scenario/<name>.yaml``, checked; an unknown name lists the known ones."""
    return parse(_read(_file(name)), name)


def parse(data: Mapping[str, Any], name: str) -> Scenario:
    """A scenario from its file's mapping (or that mapping as hydra merged it, overrides included), checked."""
    where = f"scenario {name}"
    data = copy.deepcopy(dict(data))
    unknown = set(data) - FIELDS
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
    if data.get("name", name) != name:
        raise ScenarioError(f"{where}: the file says name {data['name']!r}; a scenario is named by its file")
    for needed in ("cluster", "workload", "decisions", "loads", "seeds", "windows"):
        if needed not in data:
            raise ScenarioError(f"{where}: missing {needed!r}")
    cluster = _named("cluster", data["cluster"], where)
    workload = _named("workload", data["workload"], where)
    workload.update(copy.deepcopy(data.get("workload_overrides") or {}))
    if data.get("slo"):
        for part in workload_parts(workload):
            part["slo"] = copy.deepcopy(data["slo"])
    decisions = {}
    if not isinstance(data["decisions"], Mapping) or not data["decisions"]:
        raise ScenarioError(f"{where}: decisions must map at least one kind ({', '.join(KINDS)}) to its baselines")
    for kind, entry in data["decisions"].items():
        if kind not in KINDS:
            raise ScenarioError(f"{where}: unknown decision kind {kind!r}; known: {', '.join(KINDS)}")
        entry = dict(entry or {})
        baselines = tuple(entry.get("baselines") or ())
        reference = entry.get("reference")
        if not baselines or reference not in baselines:
            raise ScenarioError(f"{where}: decisions.{kind} needs baselines and a reference among them")
        decisions[kind] = Decision(kind, reference, baselines, dict(entry.get("env") or {}))
    loads = dict(data["loads"])
    for key in ("train", "test"):
        loads[key] = _positive(loads.get(key), f"{where}: loads.{key}")
    loads["validation"] = [_positive(x, f"{where}: loads.validation") for x in loads.get("validation") or []]
    search = loads.get("search") or [loads["test"] / 2, loads["test"] * 2]
    if len(search) != 2 or not 0 < search[0] < search[1]:
        raise ScenarioError(f"{where}: loads.search must be [low, high] with 0 < low < high, got {search}")
    loads["search"] = [float(search[0]), float(search[1])]
    seeds = {key: _seeds(data["seeds"].get(key), f"{where}: seeds.{key}") for key in ("train", "validation", "test")}
    overlap = (set(seeds["train"]) | set(seeds["validation"])) & set(seeds["test"])
    if overlap or set(seeds["train"]) & set(seeds["validation"]):
        raise ScenarioError(f"{where}: training, validation and test seeds must be disjoint")
    windows = dict(data["windows"])
    if set(windows) != {"train", "test", "search_s"}:
        raise ScenarioError(f"{where}: windows needs train and test (requests per window) and search_s (seconds)")
    windows = {"train": int(windows["train"]), "test": int(windows["test"]), "search_s": float(windows["search_s"])}
    return Scenario(
        name=name,
        version=int(data.get("version", 0)),
        description=" ".join(str(data.get("description", "")).split()),
        cluster=cluster,
        workload=workload,
        decisions=decisions,
        loads=loads,
        windows=windows,
        seeds=seeds,
    )


def from_config(cfg: Mapping[str, Any]) -> Scenario | None:
    """The scenario an entry point's ``scenario=NAME`` chose, or None. ``conf/scenario`` is a hydra config
    group, so hydra merged the file under the ``scenario`` key (and named an unknown one); it is loaded and
    checked here — with any ``scenario.*`` overrides the command line gave (``scenario.loads.validation=[1.3]``),
    which loading the file by its name would silently drop."""
    chosen = cfg.get("scenario")
    if not chosen:
        return None
    _file(chosen.get("name"))  # an unknown name lists the known ones
    from omegaconf import DictConfig, OmegaConf

    if isinstance(chosen, DictConfig):  # as hydra merged it: plain containers, interpolations resolved
        chosen = OmegaConf.to_container(chosen, resolve=True)
    return parse(chosen, chosen["name"])


def make(scenario: str, kind: str, **kwargs: Any):
    """The environment of a scenario's id: its arguments (:meth:`Scenario.env_kwargs`), any of which
    ``kwargs`` replace (``gym.make(id, workload=..., reward=...)``)."""
    from gymnasium.envs.registration import load_env_creator

    env_class = load_env_creator(ENTRY_POINTS[kind])
    return env_class(**{**load(scenario).env_kwargs(kind), **kwargs})
