"""Held-out accuracy of every model family on real measurements.

Dataset: Vidur's per-layer times (the sum of a layer's measured operators — GEMMs, norms, RoPE,
activation, residual add; the attention kernel is not in Vidur's files) for each GPU, model, TP degree
and token count. Each split fits on one part and scores the other:

- ``tokens``: every fourth token count of each configuration held out (interpolation);
- ``model``: each model held out in turn, fitted on the others of the same GPU;
- ``tp``: each TP degree held out in turn;
- ``gpu``: each GPU held out in turn, predicted from its datasheet and the other GPUs' efficiencies.

Families without architecture inputs (saturation, Arrow) are fitted per configuration where the split
allows it and on the pooled training configurations where it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from servegym.perfmodel.batch import StepBatchArray
from servegym.perfmodel.families import ArrowModel, RooflineModel, SaturationModel
from servegym.perfmodel.profile import Profile
from servegym.perfmodel.vidur_fit import LAYER_OPS, MEASUREMENTS, fit_gpu_ops, load_ops, long_form, predict_ops

SPLITS = ("tokens", "model", "tp", "gpu")
FAMILIES = ("structural", "roofline", "saturation", "arrow")
SMALL_TOKENS = 128  # at or below: a decode-sized step (memory-bound weights)
LARGE_TOKENS = 512  # at or above: a prefill-sized step (compute-bound)
CONFIG = ["gpu", "model", "tp"]


@dataclass(frozen=True)
class Fold:
    split: str
    name: str
    train: pd.DataFrame  # wide operator rows (vidur_ops layout)
    test: pd.DataFrame


def layer_table(ops: pd.DataFrame) -> pd.DataFrame:
    """One row per measured step: configuration, token count and per-layer measured time (ms)."""
    rows = long_form(ops, LAYER_OPS)
    return rows.groupby([*CONFIG, "num_tokens"], as_index=False)["measured_ms"].sum()


def folds(ops: pd.DataFrame, split: str) -> Iterator[Fold]:
    """The train/test partitions of ``ops`` for one split."""
    if split == "tokens":
        rank = ops.groupby(CONFIG)["num_tokens"].rank(method="first").astype(int)
        held = rank % 4 == 2
        yield Fold(split, "every 4th token count", ops[~held], ops[held])
    elif split in ("model", "tp"):
        for gpu, mine in ops.groupby("gpu"):
            values = sorted(mine[split].unique())
            if len(values) < 2:
                continue
            for value in values:
                held = mine[split] == value
                yield Fold(split, f"{gpu} {split}={value}", mine[~held], mine[held])
    elif split == "gpu":
        for gpu in sorted(ops["gpu"].unique()):
            held = ops["gpu"] == gpu
            yield Fold(split, f"{gpu} from the others", ops[~held], ops[held])
    else:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")


def _structural(fold: Fold) -> np.ndarray:
    profile = Profile(name="fold", gpus={g: fit_gpu_ops(fold.train, g) for g in sorted(fold.train["gpu"].unique())})
    return _predict_layers(fold.test, lambda gpu: profile.coefficients(gpu))


def _predict_layers(ops: pd.DataFrame, coefficients_of: Callable) -> np.ndarray:
    rows = long_form(ops, LAYER_OPS)
    for gpu, group in rows.groupby("gpu", sort=False):
        rows.loc[group.index, "predicted_ms"] = predict_ops(group.reset_index(drop=True), coefficients_of(gpu), gpu)
    summed = rows.groupby([*CONFIG, "num_tokens"], as_index=False)["predicted_ms"].sum()
    return summed["predicted_ms"].to_numpy()


def _roofline(fold: Fold) -> np.ndarray:
    table = layer_table(fold.test)
    predicted = np.empty(len(table))
    for (gpu, model, tp), group in table.groupby(CONFIG, sort=False):
        ops = RooflineModel(gpu, model, tp=int(tp)).vidur_ops_ms(group["num_tokens"].to_numpy())
        present = [op for op in LAYER_OPS if fold.test.loc[fold.test["model"] == model, op].notna().any()]
        predicted[table.index.get_indexer(group.index)] = sum(ops[op] for op in present)
    return predicted


def _batches(tokens: np.ndarray) -> StepBatchArray:
    """A Vidur row as a step: one chunk of ``tokens`` new tokens (the families see only the token count)."""
    n = np.asarray(tokens, dtype=np.float64)
    return StepBatchArray(n, np.ones_like(n), np.zeros_like(n), n * (n + 1) / 2, n, np.zeros_like(n))


def _per_config_or_pooled(family: type) -> Callable[[Fold], np.ndarray]:
    def run(fold: Fold) -> np.ndarray:
        train, test = layer_table(fold.train), layer_table(fold.test)
        predicted = np.empty(len(test))
        train_groups = dict(list(train.groupby(CONFIG)))
        pooled = None
        for key, group in test.groupby(CONFIG, sort=False):
            source = train_groups.get(key)
            if source is None:  # unseen configuration: the family can only reuse what it saw
                if pooled is None:
                    pooled = family.fit(_batches(train["num_tokens"]), train["measured_ms"].to_numpy())
                fitted = pooled
            else:
                fitted = family.fit(_batches(source["num_tokens"]), source["measured_ms"].to_numpy())
            predicted[test.index.get_indexer(group.index)] = fitted.predict_many(_batches(group["num_tokens"]))
        return predicted

    return run


PREDICTORS: dict[str, Callable[[Fold], np.ndarray]] = {
    "structural": _structural,
    "roofline": _roofline,
    "saturation": _per_config_or_pooled(SaturationModel),
    "arrow": _per_config_or_pooled(ArrowModel),
}


def _scores(measured: np.ndarray, predicted: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    ape = np.abs(predicted / measured - 1.0)
    small, large = tokens <= SMALL_TOKENS, tokens >= LARGE_TOKENS
    return {
        "n": len(ape),
        "mape": float(ape.mean()),
        "p90": float(np.quantile(ape, 0.9)),
        "mape_decode_sized": float(ape[small].mean()) if small.any() else float("nan"),
        "mape_prefill_sized": float(ape[large].mean()) if large.any() else float("nan"),
    }


def accuracy(
    splits: tuple[str, ...] = SPLITS, families: tuple[str, ...] = FAMILIES, ops: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every family on every split; returns (summary per split and family, per-step predictions)."""
    ops = load_ops() if ops is None else ops
    records = []
    for split in splits:
        for fold in folds(ops, split):
            table = layer_table(fold.test)
            for family in families:
                part = table.copy()
                part["predicted_ms"] = PREDICTORS[family](fold)
                part["split"], part["fold"], part["family"] = split, fold.name, family
                records.append(part)
    predictions = pd.concat(records, ignore_index=True)
    rows = []
    for (split, family), group in predictions.groupby(["split", "family"], sort=False):
        rows.append(
            {
                "split": split,
                "family": family,
                **_scores(
                    group["measured_ms"].to_numpy(), group["predicted_ms"].to_numpy(), group["num_tokens"].to_numpy()
                ),
            }
        )
    return pd.DataFrame(rows), predictions


def plot_predictions(predictions: pd.DataFrame, path: Path, split: str = "model") -> None:
    """Predicted against measured per-layer time, one panel per family, for one split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = predictions[predictions["split"] == split]
    families = list(dict.fromkeys(chosen["family"]))
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.2), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        part = chosen[chosen["family"] == family]
        for gpu, group in part.groupby("gpu"):
            ax.scatter(group["measured_ms"], group["predicted_ms"], s=3, alpha=0.4, label=gpu)
        low, high = part["measured_ms"].min(), part["measured_ms"].max()
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="measured per-layer time (ms)", title=family)
    axes[0][0].set_ylabel("predicted (ms)")
    axes[0][0].legend(markerscale=4, fontsize=8)
    fig.suptitle(f"Held-out by {split}: Vidur per-layer operator time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_extrapolation(predictions: pd.DataFrame) -> pd.DataFrame:
    """MAPE of each family on each held-out GPU (the ``gpu`` split), for the cross-GPU statement."""
    chosen = predictions[predictions["split"] == "gpu"]
    ape = (chosen["predicted_ms"] / chosen["measured_ms"] - 1).abs()
    return ape.groupby([chosen["gpu"], chosen["family"]]).mean().unstack()


def operator_accuracy(ops: pd.DataFrame | None = None) -> pd.DataFrame:
    """Structural model's MAPE per operator and GPU on held-out token counts (the ``tokens`` split)."""
    ops = load_ops() if ops is None else ops
    fold = next(folds(ops, "tokens"))
    frames = []
    for gpu in sorted(fold.test["gpu"].unique()):
        rows = long_form(fold.test[fold.test["gpu"] == gpu], (*LAYER_OPS, "emb"))
        rows["ape"] = np.abs(predict_ops(rows, fit_gpu_ops(fold.train, gpu), gpu) / rows["measured_ms"] - 1.0)
        frames.append(rows)
    table = pd.concat(frames)
    return table.pivot_table(index="gpu", columns="op", values="ape", aggfunc="mean")


CPU_STEP_LOG = MEASUREMENTS / "cpu_qwen2.5-0.5b_steps.jsonl"


def step_accuracy(path: Path = CPU_STEP_LOG) -> pd.DataFrame:
    """Whole-step accuracy (attention included) on a measured step log, every other step held out.

    The log's device entry (``<log>.catalog.yaml``, written by the microbenchmark) is registered first.
    Subsets: prefill-heavy steps (more prefill tokens than decodes) and decode-heavy ones.
    """
    from servegym.perfmodel.calibrate import calibrate
    from servegym.perfmodel.catalog import register_catalog
    from servegym.perfmodel.steplog import read_steps
    from servegym.perfmodel.structural import StructuralModel

    catalog = path.with_suffix(".catalog.yaml")
    if catalog.exists():
        register_catalog(catalog)
    records = list(read_steps(path, need_latency=True))
    train, test = records[0::2], records[1::2]
    train_batches = StepBatchArray.from_batches([r.batch for r in train])
    test_batches = StepBatchArray.from_batches([r.batch for r in test])
    train_latency = np.array([r.latency_ms for r in train])
    measured = np.array([r.latency_ms for r in test])
    profile = calibrate(train, source=str(path))
    predicted = {
        "structural": np.array(
            [
                StructuralModel(r.gpu, r.model, r.tp, r.dtype, profile=profile, cuda_graphs=r.cuda_graphs).predict(
                    r.batch
                )
                for r in test
            ]
        ),
        "roofline": np.array([RooflineModel(r.gpu, r.model, r.tp, r.dtype).predict(r.batch) for r in test]),
        "saturation": SaturationModel.fit(train_batches, train_latency).predict_many(test_batches),
        "arrow": ArrowModel.fit(train_batches, train_latency).predict_many(test_batches),
    }
    prefill_heavy = test_batches.prefill_tokens > test_batches.num_decodes
    rows = []
    for family, values in predicted.items():
        ape = np.abs(values / measured - 1.0)
        rows.append(
            {
                "split": "steps",
                "family": family,
                "n": len(ape),
                "mape": ape.mean(),
                "p90": np.quantile(ape, 0.9),
                "mape_prefill_heavy": ape[prefill_heavy].mean(),
                "mape_decode_heavy": ape[~prefill_heavy].mean(),
            }
        )
    return pd.DataFrame(rows)
