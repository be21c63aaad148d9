"""Build clusters and workloads from plain mappings (hydra configs), naming every bad key.

Clusters and workloads are data, so they are read here with validation; policies are code, so they
arrive as hydra ``_target_`` objects and the simulator only checks their protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from servegym.envs.sim.cluster import DEFAULT_LINKS, ClusterConfig, InstanceGroup, KvLink
from servegym.envs.sim.engine import EngineConfig
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.workload import (
    ConcatWorkload,
    LengthSampler,
    MixtureWorkload,
    RateSchedule,
    SloMix,
    SyntheticWorkload,
    TraceWorkload,
    Workload,
    WorkloadError,
)


def _plain(value: Any) -> Any:
    """OmegaConf containers to Python ones (no hard dependency on omegaconf here)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


def _check_keys(mapping: Mapping, allowed: set[str], where: str, error: type[Exception]) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise error(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def cluster_from(mapping: Mapping) -> ClusterConfig:
    """``{groups: [{name, count, engine: {gpu, model, tp, ...}}], snapshot_interval_s, oracle}``."""
    mapping = _plain(mapping)
    allowed = {
        "groups",
        "snapshot_interval_s",
        "oracle",
        "name",
        "links",
        "monitor_interval_s",
        "flip",
        "restart_delay_s",
    }
    _check_keys(mapping, allowed, "cluster", ClusterConfigError)
    engine_keys = {f.name for f in fields(EngineConfig)}
    groups = []
    for index, group in enumerate(mapping.get("groups") or []):
        where = f"cluster.groups[{index}]"
        _check_keys(group, {"name", "count", "engine", "node"}, where, ClusterConfigError)
        engine = group.get("engine") or {}
        _check_keys(engine, engine_keys, f"{where}.engine", ClusterConfigError)
        count = group.get("count", 1)
        if not isinstance(count, int) or count < 0:
            raise ClusterConfigError(f"{where}.count must be a non-negative integer, got {count!r}")
        try:
            engine_config = EngineConfig(**engine)
        except ClusterConfigError as error:
            raise ClusterConfigError(f"{where}.engine: {error}") from None
        groups.append(
            InstanceGroup(count, engine_config, name=str(group.get("name", index)), node=str(group.get("node") or ""))
        )
    links = dict(DEFAULT_LINKS)
    for name, link in (mapping.get("links") or {}).items():
        _check_keys(link, {"bandwidth_gbps", "latency_ms"}, f"cluster.links.{name}", ClusterConfigError)
        links[name] = KvLink(**link)
    return ClusterConfig(
        tuple(groups),
        snapshot_interval_s=float(mapping.get("snapshot_interval_s", 0.0)),
        oracle=bool(mapping.get("oracle", False)),
        links=links,
        monitor_interval_s=float(mapping.get("monitor_interval_s", 1.0)),
        flip=str(mapping.get("flip", "stateless")),
        restart_delay_s=float(mapping.get("restart_delay_s", 30.0)),
    )


MULTI_PART = ("concat", "mixture")


def workload_parts(mapping: Mapping) -> list:
    """The single workloads of a workload mapping: a concatenation's or a mixture's parts, else itself (the
    one place that knows which kinds hold parts, for code that windows, scales or edits every part)."""
    return list(mapping["parts"]) if mapping.get("kind") in MULTI_PART else [mapping]


def workload_from(mapping: Mapping) -> Workload:
    """``{kind: trace, path, rate_scale, ...}``, ``{kind: synthetic, arrivals: {...}, lengths: {...}, ...}``,
    or ``{kind: concat | mixture, parts: [...]}`` (a concatenation's ``gap_s``, a mixture's ``weights``)."""
    mapping = dict(_plain(mapping))
    kind = mapping.pop("kind", "synthetic")
    if kind in MULTI_PART:
        extra = "gap_s" if kind == "concat" else "weights"
        _check_keys(mapping, {"parts", extra, "name"}, "workload", WorkloadError)
        if not isinstance(mapping.get("parts"), (list, tuple)):
            raise WorkloadError(f"a {kind} workload needs parts: a list of workloads")
        parts = tuple(workload_from(part) for part in mapping["parts"])
        if kind == "concat":
            return ConcatWorkload(parts, float(mapping.get("gap_s", 0)))
        weights = mapping.get("weights")
        return MixtureWorkload(parts, None if weights is None else tuple(float(w) for w in weights))
    mapping.pop("name", None)
    slo = SloMix.from_config(mapping.pop("slo", None))
    if kind == "trace":
        _check_keys(mapping, {f.name for f in fields(TraceWorkload)} - {"slo"}, "workload", WorkloadError)
        if not mapping.get("path") or mapping["path"] == "???":
            raise WorkloadError("workload.path is required for a trace workload (a built-in name or a file)")
        return TraceWorkload(**mapping, slo=slo)
    if kind != "synthetic":
        raise WorkloadError(f"workload.kind must be 'trace', 'synthetic', 'concat' or 'mixture', got {kind!r}")
    _check_keys(mapping, {"arrivals", "lengths", "num_requests", "duration_s", "sessions"}, "workload", WorkloadError)
    arrivals = dict(mapping.pop("arrivals", None) or {})
    _check_keys(
        arrivals, {"rate", "pieces", "cv", "diurnal_amplitude", "diurnal_period_s"}, "workload.arrivals", WorkloadError
    )
    if "rate" in arrivals:
        if "pieces" in arrivals:
            raise WorkloadError("workload.arrivals: give rate or pieces, not both")
        arrivals["pieces"] = [[1.0, arrivals.pop("rate")]]
    if "pieces" in arrivals:
        arrivals["pieces"] = tuple(tuple(float(x) for x in piece) for piece in arrivals["pieces"])
    lengths = dict(mapping.pop("lengths", None) or {})
    _check_keys(lengths, {f.name for f in fields(LengthSampler)}, "workload.lengths", WorkloadError)
    return SyntheticWorkload(arrivals=RateSchedule(**arrivals), lengths=LengthSampler(**lengths), slo=slo, **mapping)
