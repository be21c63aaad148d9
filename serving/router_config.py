"""What the router serves: a ``conf/cluster`` (or inline groups) plus one backend URL per engine, and a policy.

    cluster: conf/cluster/h100x8.yaml      # a path, a conf/cluster name, or an inline {groups: [...]}
    backends: [http://127.0.0.1:8001, ...] # one per engine, in group order
    time_scale: 1.0                        # the twins' --time-scale: the policy sees simulated seconds
    scrape_interval_s: 0.1                 # default: the cluster's snapshot_interval_s, else 0.1
    stale_s: 2.0
    policy: vllm_lor                       # a conf/policy name or YAML path (the --policy flag overrides it)

Each backend's static facts become the :class:`envs.sim.view.EngineInfo` the simulator builds for the
same engine (the simulator's own ``Cluster`` computes them, KV capacity included), so a simulated cluster
is a served cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agents.configs import CONF
from agents.harness import load_policy
from envs.sim.cluster import Cluster
from envs.sim.config import cluster_from
from envs.sim.errors import ClusterConfigError
from envs.sim.policies import LeastOutstandingRequests, RoutingPolicy, check_policy
from envs.sim.view import EngineInfo

KEYS = {"cluster", "backends", "time_scale", "scrape_interval_s", "stale_s", "policy", "probe_interval_s"}


class RouterConfigError(ValueError):
    """A router configuration that cannot be served; the message names the key."""


@dataclass(frozen=True)
class RouterConfig:
    """Backends (URL, served model name, static facts) and how the router observes them."""

    urls: tuple[str, ...]
    infos: tuple[EngineInfo, ...]
    models: tuple[str, ...]  # the model name each backend serves (the engine config's ``model``)
    time_scale: float = 1.0
    scrape_interval_s: float = 0.1
    stale_s: float = 2.0
    probe_interval_s: float = 0.25  # how often a backend marked down is re-probed through /health
    policy: str | None = None


def _named(value: str, group: str) -> Path:
    """A YAML path, or ``conf/<group>/<name>.yaml``."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise RouterConfigError(f"{group} file {value} does not exist")
        return path
    named = CONF / group / f"{value}.yaml"
    if not named.exists():
        known = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
        raise RouterConfigError(f"unknown {group} {value!r}; known: {known}")
    return named


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RouterConfigError(f"{path}: expected a mapping")
    return data


def router_config(mapping: Mapping[str, Any]) -> RouterConfig:
    """Validate a router configuration mapping and compute each backend's :class:`EngineInfo`."""
    unknown = set(mapping) - KEYS
    if unknown:
        raise RouterConfigError(f"router config: unknown key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}")
    cluster = mapping.get("cluster")
    if cluster is None:
        raise RouterConfigError("router config: cluster is required (a conf/cluster name, a path or inline groups)")
    cluster = _load_yaml(_named(cluster, "cluster")) if isinstance(cluster, str) else dict(cluster)
    try:
        cluster_config = cluster_from(cluster)
        # the simulator's own construction: the same EngineInfo (and KV capacity) as a simulated run
        infos = tuple(Cluster(cluster_config, LeastOutstandingRequests()).infos)
    except ClusterConfigError as error:
        raise RouterConfigError(f"router config: cluster: {error}") from None
    backends = mapping.get("backends") or []
    if not isinstance(backends, list) or not all(isinstance(b, str) and b.startswith("http") for b in backends):
        raise RouterConfigError("router config: backends must be a list of http:// URLs, one per engine")
    if len(backends) != len(infos):
        raise RouterConfigError(
            f"router config: {len(backends)} backend URL(s) for {len(infos)} engine(s) in the cluster; "
            "give one URL per engine, in group order"
        )
    models = tuple(group.engine.model for group in cluster_config.groups for _ in range(group.count))
    return RouterConfig(
        urls=tuple(b.rstrip("/") for b in backends),
        infos=infos,
        models=models,
        time_scale=float(mapping.get("time_scale", 1.0)),
        scrape_interval_s=float(mapping.get("scrape_interval_s", cluster_config.snapshot_interval_s or 0.1)),
        stale_s=float(mapping.get("stale_s", 2.0)),
        probe_interval_s=float(mapping.get("probe_interval_s", 0.25)),
        policy=mapping.get("policy"),
    )


def load_router_config(path: str | Path) -> RouterConfig:
    return router_config(_load_yaml(Path(path)))


def load_routing_policy(policy: str | Mapping[str, Any]) -> RoutingPolicy:
    """The router part of a ``conf/policy`` bundle (a name, a YAML path or a mapping), through the one loading path."""
    spec = _load_yaml(_named(policy, "policy")) if isinstance(policy, str) else dict(policy)
    if "router" not in spec:
        raise RouterConfigError("policy: no router entry (a conf/policy bundle has router, batch and pools)")
    router = load_policy({"router": spec["router"]}).router
    try:
        check_policy("router", router, RoutingPolicy)
    except ClusterConfigError as error:
        raise RouterConfigError(str(error)) from None
    return router
