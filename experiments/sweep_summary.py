"""One table across the runs of a training sweep: each job's overrides, best validation and final result.

    python experiments/train.py -m seed=0,1,2 agent.learning_rate=1e-4,3e-4   # writes it at the end
    python experiments/sweep_summary.py multirun/train/2026-12-02_10-00-00     # or for any sweep directory

A hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/train.yaml``) calls :func:`summarise` when a
multirun ends; it reads what every job left in its run directory (``.hydra/overrides.yaml``,
``evaluations.csv``, ``comparison.csv``, ``head_to_head.csv``), so jobs of a Slurm or Ray launcher are
summarised the same way, and a job that failed shows as such instead of vanishing from the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SUMMARY = "summary.csv"


def job_row(job: Path) -> dict[str, Any]:
    """What one job of the sweep produced (``status`` says whether it finished)."""
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides or [])}
    evaluations, comparison, duel = (job / name for name in ("evaluations.csv", "comparison.csv", "head_to_head.csv"))
    if evaluations.exists():
        table = pd.read_csv(evaluations)
        if len(table) and "learned" in table:
            # the policy in best/: the last one selected (runs before the column: the best mean)
            chosen = table[table["selected"].astype(bool)] if "selected" in table else table.nlargest(1, "learned")
            best = chosen.iloc[-1]
            row.update(best_validation=float(best["learned"]), best_at=int(best["timesteps"]))
    if not comparison.exists():
        row["status"] = "unfinished"
        return row
    final = pd.read_csv(comparison).set_index("policy")
    row.update(status="finished", slo_attainment=float(final.loc["learned", "slo_attainment"]),
               slo_attainment_ci=float(final.loc["learned", "slo_attainment_ci"]))  # fmt: skip
    if duel.exists():
        for _, versus in pd.read_csv(duel).iterrows():
            row[f"vs {versus['versus']}"] = float(versus["slo_attainment_diff"])
    return row


def summarise(sweep_dir: str | Path) -> pd.DataFrame:
    """The table of every job directory under ``sweep_dir`` (sorted by job number), written to summary.csv."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory {sweep_dir}")
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (0/, 1/, ...)")
    table = pd.DataFrame([job_row(job) for job in jobs])
    table.to_csv(sweep_dir / SUMMARY, index=False)
    return table


def render(table: pd.DataFrame) -> str:
    """The table as text, attainments and differences in percent (blank where a job left none)."""
    shown = table.copy()
    for column in shown.columns:
        if column.startswith("vs "):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:+.1%}")
        elif column in ("best_validation", "slo_attainment", "slo_attainment_ci"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.1%}")
    if "best_at" in shown:
        shown["best_at"] = shown["best_at"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    return shown.to_string(index=False)


class SweepSummary(Callback):
    """Hydra callback: print and write the sweep's summary table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = summarise(sweep_dir)
        except FileNotFoundError as error:
            print(f"sweep summary: {error}")
            return
        print(f"sweep summary ({sweep_dir / SUMMARY}):")
        print(render(table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python experiments/sweep_summary.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory (multirun/train/<time>)")
    args = parser.parse_args(argv)
    try:
        table = summarise(args.sweep_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    print(render(table))


if __name__ == "__main__":
    main()
