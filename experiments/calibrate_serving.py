"""Calibrate the performance model on measured serving benchmarks, and report held-out errors.

    python experiments/calibrate_serving.py --out serving.json               # the BLIS H100 runs in ../shared
    python experiments/calibrate_serving.py RUN [RUN ...] --out my.json      # your own runs (docs/calibration.md)
    python experiments/calibrate_serving.py --leave-one-model-out            # fit without each model, predict it

Fits the terms the runs identify (envs/sim/serving_calibration.py) by replaying every run under candidate
coefficients, writes the fitted profile (usable anywhere a profile is named: ``engine.profile=serving.json``)
and prints measured-vs-simulated errors per stage; with ``--leave-one-model-out`` each model's runs are
predicted by a fit on the other models' runs, the figures that say how the calibration transfers.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import pandas as pd
from servegym.agents.configs import ROOT
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs.sim.errors import ServingRunError
from servegym.envs.sim.serving_calibration import fit_serving, replay_all
from servegym.envs.sim.serving_runs import read_runs
from servegym.perfmodel.profile import register_profile

DEFAULT_RUNS = ROOT.parent / "shared" / "data" / "serving" / "blis_h100"
SHOWN = ("ttft_mean", "tpot_mean", "e2e_mean", "e2e_p90")


def error_table(tables: dict[str, pd.DataFrame], label: str) -> pd.DataFrame:
    """One row per run and stage: the signed relative errors of :data:`SHOWN` and the saturation flag."""
    rows = []
    for run, table in tables.items():
        for row in table.itertuples():
            entry = {"fit": label, "run": run, "stage": row.stage, "rate_rps": row.rate_rps, "flag": row.flag}
            entry.update({name: getattr(row, f"{name}_err") for name in SHOWN})
            rows.append(entry)
    return pd.DataFrame(rows)


def print_errors(frame: pd.DataFrame, title: str) -> None:
    print(title)
    shown = frame.copy()
    for name in SHOWN:
        shown[name] = shown[name].map(lambda v: f"{v:+.1%}" if pd.notna(v) else "-")
    print(shown.to_string(index=False))
    worst = frame[list(SHOWN)].abs().max()
    print("largest |error|: " + ", ".join(f"{name} {worst[name]:.1%}" for name in SHOWN) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="measured runs (default: ../shared/data/serving/blis_h100)")
    parser.add_argument("--out", type=Path, default=Path("outputs/calibrate_serving/serving.json"))
    parser.add_argument("--base", default="vidur", help="profile to start from (a name or a JSON path)")
    parser.add_argument("--max-stage-s", type=float, default=120.0, help="replay the first seconds of each stage")
    parser.add_argument("--max-evaluations", type=int, default=60)
    parser.add_argument("--leave-one-model-out", action="store_true")
    parser.add_argument("--source", help="where the runs come from, recorded in the profile's provenance")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        paths = args.runs or [DEFAULT_RUNS]
        runs = [run for path in paths for run in read_runs(path) if run.unsupported() is None]
        if not runs:
            raise ServingRunError(f"no replayable run at {', '.join(map(str, paths))}")
        frames = []
        fit = fit_serving(runs, args.base, args.max_stage_s, args.max_evaluations, name=args.out.stem)
        print(
            "fitted on all runs: " + ", ".join(f"{t.label} {v:.4g}" for t, v in zip(fit.terms, fit.values, strict=True))
        )
        register_profile(fit.profile)
        frames.append(error_table(replay_all(runs, fit.profile.name, None), "in-sample"))
        print_errors(frames[-1], "in-sample (fitted on every run, whole stages replayed)")
        if args.leave_one_model_out:
            for model in sorted({run.model for run in runs}):
                train = [run for run in runs if run.model != model]
                held = [run for run in runs if run.model == model]
                if not train:
                    continue
                partial = fit_serving(train, args.base, args.max_stage_s, args.max_evaluations, name=f"without-{model}")
                values = ", ".join(f"{t.label} {v:.4g}" for t, v in zip(partial.terms, partial.values, strict=True))
                print(f"fitted without {model}: {values}")
                register_profile(partial.profile)
                frames.append(error_table(replay_all(held, partial.profile.name, None), f"held-out {model}"))
                print_errors(frames[-1], f"{model} predicted by the fit on the other models")
        record = fit.profile.provenance["serving_fit"]
        record["command"] = shlex.join(["python", "experiments/calibrate_serving.py", *(argv or sys.argv[1:])])
        record["date"] = datetime.date.today().isoformat()
        if args.source:
            record["source"] = args.source
        for frame in frames:
            label = "in_sample" if frame["fit"].iloc[0] == "in-sample" else frame["fit"].iloc[0]
            worst = frame[list(SHOWN)].abs().max()
            record.setdefault("max_abs_error", {})[label] = {name: round(float(worst[name]), 4) for name in SHOWN}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fit.profile.save(args.out)
        pd.concat(frames, ignore_index=True).to_csv(args.out.with_suffix(".errors.csv"), index=False)
        print(f"wrote {args.out} and {args.out.with_suffix('.errors.csv')}")


if __name__ == "__main__":
    main()
