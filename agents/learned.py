"""A trained routing policy as a router: the same loading path as the heuristics (``_target_`` + ``run``).

A training run directory (``agents.run_dir``) holds the stable-baselines3 model, the observation
normaliser's statistics (plain JSON) and the manifest of the observation contract the policy was trained
on. Loading checks the manifest against the current contract and refuses a mismatch, naming it. The model
is read by stable-baselines3, which unpickles parts of it: load runs only from paths you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agents import run_dir
from envs.features import FeatureContext, FeatureSpec
from envs.sim.policies import RoutingPolicy, least_outstanding
from envs.sim.view import ClusterView, RequestInfo

ALGORITHMS = {
    "PPO": "stable_baselines3:PPO",
    "A2C": "stable_baselines3:A2C",
    "DQN": "stable_baselines3:DQN",
    "MaskablePPO": "sb3_contrib:MaskablePPO",
}


class ContractMismatch(ValueError):
    """A saved policy was trained on another observation contract than the current one."""


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

    def __init__(self, features_manifest: dict[str, Any], where: str) -> None:
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


class LearnedRouter(FeatureRouter):
    """Routes with a saved stable-baselines3 policy (a training run directory)."""

    def __init__(self, run: str | Path, deterministic: bool = True) -> None:
        run = Path(run)
        self.manifest = run_dir.read_manifest(run)
        super().__init__(self.manifest["features"], str(run))
        self.algorithm = self.manifest["algorithm"]
        self.model = algorithm_class(self.algorithm).load(run_dir.model_path(run), device="cpu")
        norm = run_dir.read_normalization(run)
        self.mean, self.var = np.asarray(norm["mean"], np.float32), np.asarray(norm["var"], np.float32)
        self.clip, self.epsilon = float(norm["clip_obs"]), float(norm["epsilon"])
        self.deterministic = deterministic

    def normalise(self, observation: np.ndarray) -> np.ndarray:
        return np.clip((observation - self.mean) / np.sqrt(self.var + self.epsilon), -self.clip, self.clip)

    def act(self, observation: np.ndarray, mask: np.ndarray) -> int:
        kwargs = {"action_masks": mask} if self.algorithm == "MaskablePPO" else {}
        action, _ = self.model.predict(self.normalise(observation), deterministic=self.deterministic, **kwargs)
        return int(np.asarray(action).item())
