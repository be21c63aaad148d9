"""A trained policy of any discrete decision kind as a self-contained ONNX graph plus a JSON manifest, and
the simulator policies that run it: :class:`ExportedRouter`, :class:`ExportedBatcher`, :class:`ExportedPools`.

The graph maps the *raw* observation (``servegym.envs.features.FeatureSpec``'s contract as the run's environment
lays it out: features in their documented scales, before the training normaliser) and the action mask to
the chosen action and the policy's masked log-probabilities, with a dynamic batch dimension::

    observation float32 [batch, features], action_mask bool [batch, actions]
      -> action int64 [batch], logits float32 [batch, actions]

(actions: engine slots for Route-v0, budgets for Batch-v0, keep/flips for Pools-v0; the manifest's ``env_id``
and ``action`` say which, and loading refuses an export of another kind than the one asked for).

The normaliser's statistics are constants inside the graph, so a consumer (the simulator, the evaluation
harness, a router service in another language) needs onnxruntime and the manifest, nothing from training —
and no pickle: unlike a run directory's ``model.zip``/``vecnormalize.pkl``, an exported policy is safe to
load from a path you do not control (ONNX is a protobuf of tensors and operators).

``logits`` are log-probabilities (log-softmax) for actor-critic policies, masked entries at −1e8 as in
sb3-contrib; for DQN they are the Q-values, masked the same way. ``action`` is the arg-max of ``logits``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from servegym.agents import run_dir
from servegym.agents.learned import FeatureBatcher, FeaturePools, FeatureRouter, SavedModel, algorithm_class, kind_of
from servegym.envs.features import feature_names

MASKED = -1e8  # sb3-contrib's value for masked logits
GRAPH, MANIFEST = "policy.onnx", "policy.json"
FORMAT = "servegym-onnx-policy/1"


class ExportError(ValueError):
    """The run or the exported files cannot be used (missing file, wrong format, unsupported policy)."""


def _policy_graph(model: Any, mean: np.ndarray, var: np.ndarray, clip: float, epsilon: float):
    import torch
    from torch import nn

    continuous = not hasattr(model.action_space, "n")
    low = torch.as_tensor(getattr(model.action_space, "low", np.zeros(1)), dtype=torch.float32)
    high = torch.as_tensor(getattr(model.action_space, "high", np.zeros(1)), dtype=torch.float32)

    class PolicyGraph(nn.Module):
        """Normalise → policy network → mask → arg-max (discrete), or → the Gaussian's mean clipped to the
        action bounds (continuous: SB3's deterministic action), all in one traced module."""

        def __init__(self) -> None:
            super().__init__()
            self.policy = model.policy
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(np.sqrt(var + epsilon), dtype=torch.float32))
            self.clip = float(clip)
            self.q_values = not hasattr(model.policy, "action_net")
            self.continuous = continuous
            self.register_buffer("low", low)
            self.register_buffer("high", high)

        def scores(self, x: torch.Tensor) -> torch.Tensor:
            if self.q_values:
                return self.policy.q_net(x)
            features = self.policy.extract_features(x, self.policy.pi_features_extractor)
            return self.policy.action_net(self.policy.mlp_extractor.forward_actor(features))

        def forward(self, observation: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.clamp((observation - self.mean) / self.scale, -self.clip, self.clip)
            if self.continuous:  # every budget is allowed (Batch-v0 masks nothing): the mask only keeps its shape
                mean = self.scores(x) + 0.0 * action_mask[:, :1].float()
                return torch.maximum(torch.minimum(mean, self.high), self.low), mean
            scores = torch.where(action_mask, self.scores(x), torch.full_like(self.mean[:1], MASKED))
            if not self.q_values:
                scores = torch.log_softmax(scores, dim=1)
            return torch.argmax(scores, dim=1), scores

    graph = PolicyGraph().eval()
    return graph


def export_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``policy.onnx`` and ``policy.json`` for the training run in ``run`` (``servegym.agents.run_dir``; into
    ``out``, default ``run/export``); returns the output directory. Reads the run's model with
    stable-baselines3 (a pickle: export only runs you trust)."""
    import torch

    run = Path(run)
    missing = run_dir.missing_policy_file(run)
    if missing:
        raise ExportError(f"{run}: no {missing} (is this a training run directory written by train.py?)")
    manifest = run_dir.read_manifest(run)
    norm = run_dir.read_normalization(run)
    kind_of(manifest, str(run))  # an environment this code knows
    model = algorithm_class(manifest["algorithm"]).load(run_dir.model_path(run), device="cpu")
    continuous = not hasattr(model.action_space, "n")
    if continuous and "budgets" not in manifest:
        raise ExportError(
            f"{run}: continuous actions export for Batch-v0 budgets only (action space {model.action_space})"
        )
    size = int(model.observation_space.shape[0])
    slots = len(manifest["budgets"]) if continuous else int(model.action_space.n)  # the mask's width
    graph = _policy_graph(
        model, np.asarray(norm["mean"]), np.asarray(norm["var"]), float(norm["clip_obs"]), float(norm["epsilon"])
    )
    out = Path(out) if out is not None else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, size), torch.ones(2, slots, dtype=torch.bool))
    batch = torch.export.Dim("batch", min=1)
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines would flood a hydra log
        logging.getLogger(name).setLevel(logging.WARNING)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and renaming notices
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=["observation", "action_mask"],
            output_names=["action", "logits"],
            dynamic_shapes={"observation": {0: batch}, "action_mask": {0: batch}},
            verbose=False,
        )
    program.save(str(out / GRAPH))
    digest = hashlib.sha256((out / GRAPH).read_bytes()).hexdigest()
    (out / MANIFEST).write_text(
        json.dumps(
            {
                "format": FORMAT,
                "graph": GRAPH,
                "sha256": digest,
                "inputs": {
                    "observation": {"dtype": "float32", "shape": ["batch", size], "normalised_in_graph": True},
                    "action_mask": {"dtype": "bool", "shape": ["batch", slots], "meaning": "True: may choose"},
                },
                "outputs": {
                    "action": {
                        "dtype": "float32" if continuous else "int64",
                        "shape": ["batch", 1] if continuous else ["batch"],
                        "meaning": manifest["action"],
                    },
                    "logits": {
                        "dtype": "float32",
                        "shape": ["batch", 1 if continuous else slots],
                        "meaning": "Gaussian mean before clipping"
                        if continuous
                        else "Q-values"
                        if graph.q_values
                        else "log-probabilities",
                        "masked_value": None if continuous else MASKED,
                    },
                },
                "env_id": manifest["env_id"],
                "env_version": manifest["env_version"],
                "algorithm": manifest["algorithm"],
                "action": manifest["action"],
                **({"budgets": manifest["budgets"], "continuous": continuous} if "budgets" in manifest else {}),
                "features": manifest["features"],
                "feature_names": feature_names(manifest["features"]),
                "normalization": norm,
                "source_run": str(run.resolve()),
                "git_revision": manifest.get("git_revision", "unknown"),
            },
            indent=1,
        )
    )
    return out


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an exported policy: a directory holding ``policy.json``, or that file."""
    path = Path(path)
    return (path / MANIFEST).exists() or path.name == MANIFEST


def read_manifest(path: str | Path) -> dict[str, Any]:
    """An export's manifest as JSON, unverified (which kind of policy it is); :func:`load_manifest` verifies."""
    path = Path(path)
    manifest_path = path / MANIFEST if path.is_dir() else path
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{manifest_path}: not valid JSON ({exc})") from None


def load_manifest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The manifest of an export (its directory or ``policy.json``) and the graph's path, verified."""
    path = Path(path)
    manifest_path = path / MANIFEST if path.is_dir() else path
    if not manifest_path.exists():
        raise ExportError(f"{path}: no {MANIFEST} (export a run with experiments/export.py)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    graph = manifest_path.parent / manifest["graph"]
    if not graph.exists():
        raise ExportError(f"{manifest_path}: the graph {graph.name} is missing")
    if hashlib.sha256(graph.read_bytes()).hexdigest() != manifest["sha256"]:
        raise ExportError(f"{graph}: its checksum differs from the manifest's (a graph from another export?)")
    return manifest, graph


class OnnxPolicy:
    """The exported graph in onnxruntime: batched raw observations and masks → actions and logits."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime

        self.manifest, graph = load_manifest(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # one decision is tiny; threads only add latency
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, observations: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        action, logits = self.session.run(
            None,
            {
                "observation": np.asarray(observations, np.float32).reshape(-1, observations.shape[-1]),
                "action_mask": np.asarray(masks, bool).reshape(-1, masks.shape[-1]),
            },
        )
        return action, logits


class ExportedRouter(FeatureRouter):
    """Routes with an exported policy in onnxruntime (``_target_: servegym.agents.exported.ExportedRouter``,
    ``path:`` the export directory). Refuses a manifest whose feature contract differs from this code's,
    or an export of another decision kind."""

    def __init__(self, path: str | Path) -> None:
        self.policy = OnnxPolicy(path)
        super().__init__(self.policy.manifest["features"], str(path), self.policy.manifest)

    def act(self, observation: np.ndarray, mask: np.ndarray) -> int:
        action, _ = self.policy(observation[None, :], mask[None, :])
        return int(action[0])


class _ExportActs:
    """What an export adds to a feature batcher or pool policy: its manifest and graph, acting."""

    def __init__(self, path: str | Path) -> None:
        self.policy = OnnxPolicy(path)
        super().__init__(self.policy.manifest, str(path))

    def act(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.policy(observation[None, :], mask[None, :])[0].reshape(-1)


class ExportedBatcher(_ExportActs, FeatureBatcher):
    """Forms batches with an exported Batch-v0 policy in onnxruntime (``path:`` the export directory)."""


class ExportedPools(_ExportActs, FeaturePools):
    """Flips pool roles with an exported Pools-v0 policy in onnxruntime (``path:`` the export directory)."""


def parity(run: str | Path, export: str | Path, observations: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Compare the exported graph (onnxruntime) with the stable-baselines3 policy of ``run`` on recorded raw
    observations: share of identical deterministic actions and the largest log-probability difference over
    allowed actions. Policies trained without masks are compared with every action allowed (the graph
    masks; SB3 would not)."""
    import torch

    original = SavedModel(run)
    onnx_policy = OnnxPolicy(export)
    maskable = original.algorithm == "MaskablePPO"
    masks = np.asarray(masks, bool) if maskable else np.ones_like(masks, dtype=bool)
    normalised = original.normalise(np.asarray(observations, np.float32)).astype(np.float32)
    policy = original.model.policy
    kwargs = {"action_masks": masks} if maskable else {}
    actions, _ = original.model.predict(normalised, deterministic=True, **kwargs)
    exported_actions, exported_logits = onnx_policy(observations, masks)
    if not hasattr(original.model.action_space, "n"):  # continuous: the deterministic action and the mean
        with torch.no_grad():
            mean = policy.get_distribution(torch.as_tensor(normalised)).distribution.mean.numpy()
        difference = np.abs(np.asarray(actions, np.float64).reshape(exported_actions.shape) - exported_actions)
        return {
            "decisions": float(len(observations)),
            "action_agreement": float(np.mean(difference <= 1e-5)),
            "max_logit_difference": float(max(difference.max(), np.abs(mean - exported_logits).max())),
        }
    with torch.no_grad():
        tensor = torch.as_tensor(normalised)
        if hasattr(policy, "q_net"):
            logits = policy.q_net(tensor).numpy()
        else:
            logits = policy.get_distribution(tensor, **kwargs).distribution.logits.numpy()
    return {
        "decisions": float(len(observations)),
        "action_agreement": float(np.mean(np.asarray(actions) == exported_actions)),
        "max_logit_difference": float(np.max(np.abs(np.where(masks, logits - exported_logits, 0.0)))),
    }
