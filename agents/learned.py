"""Trained policies of every decision kind as simulator policies, through the same loading path as the
heuristics (``_target_`` + ``run``): :class:`LearnedRouter` (Route-v0 runs), :class:`LearnedBatcher`
(Batch-v0) and :class:`LearnedPools` (Pools-v0).

A training run directory (``servegym.agents.run_dir``) holds the stable-baselines3 model, the observation
normaliser's statistics (plain JSON) and the manifest of the observation contract and environment the
policy was trained on. Loading checks both: another contract (:class:`ContractMismatch`) or another
decision kind (:class:`KindMismatch`: a batching policy given as a router) is refused in one line naming
it. The model is read by stable-baselines3, which unpickles parts of it: load runs only from paths you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from servegym.agents import run_dir
from servegym.envs.batch_env import NO_REQUEST, batch_observation, continuous_budget
from servegym.envs.features import FeatureContext, FeatureSpec
from servegym.envs.pools_env import flip_mask, flip_of
from servegym.envs.sim.policies import BatchPolicy, EngineView, PoolPolicy, RoutingPolicy, least_outstanding
from servegym.envs.sim.request import Request
from servegym.envs.sim.roles import Role
from servegym.envs.sim.view import ClusterView, RequestInfo

ALGORITHMS = {
    "PPO": "stable_baselines3:PPO",
    "A2C": "stable_baselines3:A2C",
    "DQN": "stable_baselines3:DQN",
    "MaskablePPO": "sb3_contrib:MaskablePPO",
}


# which slot of a policy bundle each environment's policies fill
KINDS = {"servegym/Route-v0": "router", "servegym/Batch-v0": "batch", "servegym/Pools-v0": "pools"}


class ContractMismatch(ValueError):
    """A saved policy was trained on another observation contract than the current one."""


class KindMismatch(ValueError):
    """A saved policy of one decision kind was given where another is expected (a batcher as a router)."""


def kind_of(manifest: dict[str, Any], where: str) -> str:
    """The bundle slot (``router``, ``batch``, ``pools``) a saved policy's manifest says it fills."""
    env_id = manifest.get("env_id")
    if env_id not in KINDS:
        raise KindMismatch(f"{where}: trained on {env_id!r}, not one of the environments {sorted(KINDS)}")
    return KINDS[env_id]


def check_kind(manifest: dict[str, Any], expected: str, where: str) -> None:
    """Refuse a saved policy whose environment decides another kind than ``expected``, in one line."""
    kind = kind_of(manifest, where)
    if kind != expected:
        raise KindMismatch(
            f"{where}: a {manifest['env_id']} policy (action: {manifest.get('action', '?')}) cannot be used as "
            f"a {expected} policy; give it as the bundle's {kind} (agents.harness.saved_policy_spec does)"
        )


def check_manifest(saved: dict[str, Any], spec: FeatureSpec, where: str) -> None:
    """Refuse a policy whose features (names, order, scales, bounds, instance count) differ from ``spec``."""
    current = spec.manifest()
    for key in ("version", "max_instances", "engine_features", "request_features"):
        if saved.get(key) != current[key]:
            raise ContractMismatch(
                f"{where}: the policy was trained on another observation contract ({key} differs: saved "
                f"{str(saved.get(key))[:120]!r}, current {str(current[key])[:120]!r}); retrain or export it again"
            )


def algorithm_class(name: str):
    module, attribute = ALGORITHMS[name].split(":")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


class FeatureRouter(RoutingPolicy):
    """A router that decides from the observation contract: computes the features from the router's view
    (the same :class:`FeatureSpec` the environments use) and asks :meth:`act` for an engine.

    An action outside the candidates (possible for algorithms that ignore masks) falls back to the valid
    engine with the fewest outstanding requests and is counted in :attr:`fallbacks`.
    """

    def __init__(self, features_manifest: dict[str, Any], where: str, manifest: dict[str, Any] | None = None) -> None:
        if manifest is not None:
            check_kind(manifest, "router", where)
        self.spec = FeatureSpec(int(features_manifest["max_instances"]))
        check_manifest(features_manifest, self.spec, where)
        self.context = FeatureContext()
        self.fallbacks = 0

    def act(self, observation: np.ndarray, mask: np.ndarray) -> int:
        """The engine for one raw (unnormalised) observation and its action mask."""
        raise NotImplementedError

    def _choose(self, request: RequestInfo, view: ClusterView, decode_phase: bool) -> int:
        observation, _ = self.spec.vector(view, request, self.context, decode_phase)
        candidates = view.decode_candidates if decode_phase else view.prefill_candidates
        mask = np.zeros(self.spec.max_instances, dtype=bool)
        mask[candidates] = True
        choice = self.act(observation, mask)
        if choice not in candidates:
            self.fallbacks += 1
            choice = least_outstanding(view, candidates)
        if not decode_phase:
            self.context.observe_route(request, choice, view)
        return choice

    def route(self, request: RequestInfo, view: ClusterView) -> int:
        return self._choose(request, view, decode_phase=False)

    def route_decode(self, request: RequestInfo, view: ClusterView) -> int:
        return self._choose(request, view, decode_phase=True)

    def on_completion(self, request: RequestInfo, instance: int, output_tokens: int, e2e_s: float) -> None:
        self.context.observe_completion(output_tokens)


class SavedModel:
    """A training run's stable-baselines3 model and observation normaliser: raw observation → action."""

    def __init__(self, run: str | Path, deterministic: bool = True) -> None:
        run = Path(run)
        self.manifest = run_dir.read_manifest(run)
        self.algorithm = self.manifest["algorithm"]
        self.model = algorithm_class(self.algorithm).load(run_dir.model_path(run), device="cpu")
        norm = run_dir.read_normalization(run)
        self.mean, self.var = np.asarray(norm["mean"], np.float32), np.asarray(norm["var"], np.float32)
        self.clip, self.epsilon = float(norm["clip_obs"]), float(norm["epsilon"])
        self.deterministic = deterministic

    def normalise(self, observation: np.ndarray) -> np.ndarray:
        return np.clip((observation - self.mean) / np.sqrt(self.var + self.epsilon), -self.clip, self.clip)

    def act(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The model's action for one raw observation (the mask is used by MaskablePPO only)."""
        kwargs = {"action_masks": mask} if self.algorithm == "MaskablePPO" else {}
        action, _ = self.model.predict(self.normalise(observation), deterministic=self.deterministic, **kwargs)
        return np.asarray(action)


class LearnedRouter(FeatureRouter):
    """Routes with a saved stable-baselines3 policy (a Route-v0 training run directory)."""

    def __init__(self, run: str | Path, deterministic: bool = True) -> None:
        manifest = run_dir.read_manifest(run)
        super().__init__(manifest["features"], str(run), manifest)
        self.saved = SavedModel(run, deterministic)
        self.manifest, self.algorithm, self.model = manifest, self.saved.algorithm, self.saved.model

    def normalise(self, observation: np.ndarray) -> np.ndarray:
        return self.saved.normalise(observation)

    def act(self, observation: np.ndarray, mask: np.ndarray) -> int:
        return int(self.saved.act(observation, mask).item())


def _cluster_view(engine: EngineView) -> ClusterView:
    """The cluster's router view at this engine's step: what Batch-v0 observes."""
    view = engine.cluster_view()
    if view is None:
        raise RuntimeError("a learned batcher decides from the cluster's features; this engine has no cluster")
    return view


class FeatureBatcher(BatchPolicy):
    """A batch former whose every step's token budget comes from the observation contract, as Batch-v0
    asks it: the cluster's features and the deciding engine (:func:`servegym.envs.batch_env.batch_observation`) →
    :meth:`act` → a budget of the manifest's ``budgets`` (or log-linear between them for continuous
    actions). Everything else (chunks, prefill order, admission, preemption) is vLLM's, as in training."""

    name = "learned_batch"
    supports_decode_jumps = False  # every step is a decision, as in Batch-v0

    def __init__(self, manifest: dict[str, Any], where: str) -> None:
        check_kind(manifest, "batch", where)
        self.spec = FeatureSpec(int(manifest["features"]["max_instances"]))
        check_manifest(manifest["features"], self.spec, where)
        self.budgets = tuple(int(b) for b in manifest["budgets"])
        self.continuous = bool(manifest.get("continuous", False))
        self.context = FeatureContext()

    def act(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def request_budget(self, engine: EngineView) -> int:
        observation, _ = batch_observation(self.spec, _cluster_view(engine), engine.index, self.context)
        action = np.asarray(self.act(observation, np.ones(len(self.budgets), dtype=bool))).reshape(-1)
        if self.continuous:
            return continuous_budget(float(np.clip(action[0], -1.0, 1.0)), self.budgets)
        return self.budgets[int(action[0])]

    def on_finish(self, request: Request) -> None:
        self.context.observe_completion(request.output_tokens)


class FeaturePools(PoolPolicy):
    """A pool policy deciding each monitoring interval from the observation contract, as Pools-v0 asks:
    keep, or flip one instance (a masked-out choice keeps the pools and is counted in :attr:`fallbacks`)."""

    def __init__(self, manifest: dict[str, Any], where: str) -> None:
        check_kind(manifest, "pools", where)
        self.spec = FeatureSpec(int(manifest["features"]["max_instances"]))
        check_manifest(manifest["features"], self.spec, where)
        self.context = FeatureContext()
        self.fallbacks = 0

    def act(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rebalance(self, view: ClusterView) -> list[tuple[int, Role]]:
        observation, _ = self.spec.vector(view, NO_REQUEST, self.context)
        mask = flip_mask(view.roles, self.spec.max_instances)
        action = int(np.asarray(self.act(observation, mask)).reshape(-1)[0])
        if not mask[action]:
            self.fallbacks += 1
            return []
        return flip_of(action, self.spec.max_instances)

    def on_finish(self, request: Request) -> None:
        self.context.observe_completion(request.output_tokens)


class _SavedRunActs:
    """What a training run adds to a feature batcher or pool policy: its manifest and model, acting."""

    def __init__(self, run: str | Path, deterministic: bool = True) -> None:
        super().__init__(run_dir.read_manifest(run), str(run))
        self.saved = SavedModel(run, deterministic)

    def act(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.saved.act(observation, mask)


class LearnedBatcher(_SavedRunActs, FeatureBatcher):
    """Forms batches with a saved stable-baselines3 policy (a Batch-v0 training run directory)."""


class LearnedPools(_SavedRunActs, FeaturePools):
    """Flips pool roles with a saved stable-baselines3 policy (a Pools-v0 training run directory)."""
