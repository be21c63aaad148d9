"""What the router serves: a ``conf/cluster`` (or inline groups) plus one backend URL per engine, and a policy.

    cluster: conf/cluster/h100x8.yaml      # a path, a conf/cluster name, or an inline {groups: [...]}
    backends: [http://127.0.0.1:8001, ...] # one per engine, in group order
    time_scale: 1.0                        # the twins' --time-scale: the policy sees simulated seconds
    scrape_interval_s: 0.1                 # default: the cluster's snapshot_interval_s, else 0.1
    stale_s: 2.0
    policy: vllm_lor                       # a conf/policy name or YAML path, a training run directory or an
                                           # ONNX export (its directory, policy.json or policy.onnx); --policy
                                           # overrides it
    slo: [{name: chat, ttft_s: 2.0, tpot_s: 0.1}]  # SLO classes (a workload's `slo` list); a request names
                                           # its class in the X-SLO-Class header, else it has the first

What a request tells the router beyond its body (as the simulator's ``RequestInfo`` carries it): its SLO
class (``X-SLO-Class``), its session (``X-Session-Id``, else the body's OpenAI ``user`` field) and the
prefix hashes of its prompt (computed by the router per the cluster's ``prefix_segment_tokens``).

Each backend's static facts become the :class:`servegym.envs.sim.view.EngineInfo` the simulator builds for the
same engine (the simulator's own ``Cluster`` computes them, KV capacity included), so a simulated cluster
is a served cluster.

A saved router (a training run or an export) goes through the project's one loading path
(:func:`agents.harness.saved_policy_spec`, then :func:`agents.harness.load_policy`), after its manifest is
checked against the feature contract this router serves: a routing environment's policy, the contract's
version and features (names, order, scales, bounds) as ``servegym.envs.features`` computes them, and enough engine
slots for the cluster. A mismatch refuses to start with the reason in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import InstantiationException
from servegym.agents import exported, run_dir
from servegym.agents.configs import CONF
from servegym.agents.harness import load_policy, saved_policy_spec
from servegym.agents.learned import ContractMismatch, check_manifest
from servegym.envs import ENV_IDS
from servegym.envs.features import FeatureSpec
from servegym.envs.sim.config import cluster_from
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import RoutingPolicy, check_policy
from servegym.envs.sim.request import SloClass
from servegym.envs.sim.view import EngineInfo
from servegym.envs.sim.workload import SloMix, WorkloadError
from servegym.perfmodel.errors import PerfModelError

KEYS = {"cluster", "backends", "time_scale", "scrape_interval_s", "stale_s", "policy", "probe_interval_s", "slo"}


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
    slo_classes: tuple[SloClass, ...] = ()  # the first is a request's class unless it names another
    segment_tokens: int = 512  # prompt tokens per prefix hash (the engines' prefix_segment_tokens)


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
        saved = " (or a training run directory, an ONNX export)" if group == "policy" else ""
        raise RouterConfigError(f"unknown {group} {value!r}; known: {known}{saved}")
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
        engines = [group.engine for group in cluster_config.groups for _ in range(group.count)]
        # the simulator's own facts: the same EngineInfo (and KV capacity) as a simulated run's
        infos = tuple(engine.engine_info(index) for index, engine in enumerate(engines))
    except (ClusterConfigError, PerfModelError) as error:
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
    try:
        slo = SloMix.from_config(mapping.get("slo")).classes if mapping.get("slo") else ()
    except (WorkloadError, TypeError) as error:
        raise RouterConfigError(f"router config: slo: {error}") from None
    return RouterConfig(
        urls=tuple(b.rstrip("/") for b in backends),
        infos=infos,
        models=models,
        time_scale=float(mapping.get("time_scale", 1.0)),
        scrape_interval_s=float(mapping.get("scrape_interval_s", cluster_config.snapshot_interval_s or 0.1)),
        stale_s=float(mapping.get("stale_s", 2.0)),
        probe_interval_s=float(mapping.get("probe_interval_s", 0.25)),
        policy=mapping.get("policy"),
        slo_classes=slo,
        segment_tokens=cluster_config.groups[0].engine.prefix_segment_tokens,
    )


def load_router_config(path: str | Path) -> RouterConfig:
    return router_config(_load_yaml(Path(path)))


ROUTING_ENTRY_POINT = "servegym.envs.route_env:RouteEnv"


def saved_policy_path(policy: str | Path) -> Path | None:
    """The directory of a saved router named by ``policy`` (a training run directory, an export directory,
    its ``policy.json`` or its ``policy.onnx``), or None when ``policy`` names no saved router."""
    path = Path(policy)
    if path.name == exported.GRAPH:
        path = path.parent
    if path.name == exported.MANIFEST:
        path = path.parent
    return path if path.is_dir() and (exported.is_export(path) or run_dir.is_run(path)) else None


def check_saved_policy(path: Path, num_engines: int) -> dict[str, Any]:
    """The manifest of the saved router in ``path``, refused (:class:`RouterConfigError`, one line) unless
    it was trained on a routing environment, on the feature contract this code computes, with at least
    ``num_engines`` engine slots. Checked before anything is loaded, so a mismatch never reaches the
    model's own loader."""
    try:
        manifest = exported.load_manifest(path)[0] if exported.is_export(path) else run_dir.read_manifest(path)
    except (exported.ExportError, OSError, ValueError) as error:
        raise RouterConfigError(f"policy {path}: {error}") from None
    env_id = manifest.get("env_id")
    if ENV_IDS.get(env_id) != ROUTING_ENTRY_POINT:
        routing = [k for k, v in ENV_IDS.items() if v == ROUTING_ENTRY_POINT]
        raise RouterConfigError(f"policy {path}: trained on {env_id!r}, not a routing environment ({routing})")
    features = manifest.get("features") or {}
    try:
        slots = int(features.get("max_instances", 0))
        check_manifest(features, FeatureSpec(max(slots, 1)), f"policy {path}")
    except (ContractMismatch, TypeError, ValueError) as error:
        raise RouterConfigError(str(error)) from None
    spec = FeatureSpec(slots)
    if "feature_names" in manifest and manifest["feature_names"] != spec.feature_names():
        raise RouterConfigError(
            f"policy {path}: its feature_names differ from the contract's (version {spec.manifest()['version']}); "
            "export it again"
        )
    if slots < num_engines:
        raise RouterConfigError(
            f"policy {path}: trained with {slots} engine slots; this cluster has {num_engines} engines"
        )
    return manifest


def policy_spec(policy: str | Path | Mapping[str, Any], num_engines: int = 1) -> dict[str, Any]:
    """The policy mapping (``router``, ``batch``, ``pools``, hydra ``_target_`` style) that ``policy`` names:
    a ``conf/policy`` bundle (a name, a YAML path or a mapping) or a saved router (a training run or an ONNX
    export, checked by :func:`check_saved_policy` for a cluster of ``num_engines``; vLLM batching)."""
    saved = saved_policy_path(policy) if isinstance(policy, str | Path) else None
    if saved is not None:
        check_saved_policy(saved, num_engines)
        spec: dict[str, Any] = saved_policy_spec(saved)
    elif isinstance(policy, str | Path):
        spec = _load_yaml(_named(str(policy), "policy"))
    else:
        spec = dict(policy)
    if "router" not in spec:
        raise RouterConfigError("policy: no router entry (a conf/policy bundle has router, batch and pools)")
    return spec


def load_routing_policy(policy: str | Path | Mapping[str, Any], num_engines: int = 1) -> RoutingPolicy:
    """A fresh routing policy named by ``policy`` (see :func:`policy_spec`), through the one loading path."""
    spec = policy_spec(policy, num_engines)
    try:
        router = load_policy({"router": spec["router"]}).router
        check_policy("router", router, RoutingPolicy)
    except (ClusterConfigError, InstantiationException) as error:
        raise RouterConfigError(f"policy: {str(error).splitlines()[0]}") from None
    return router
