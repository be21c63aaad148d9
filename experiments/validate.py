"""Hold the simulator against measured serving: replay real vLLM benchmarks and compare latencies per stage.

    python experiments/validate.py                                   # every run under ../shared/data/serving
    python experiments/validate.py RUN [RUN ...] --profile my.json   # runs by path, under another profile
    python experiments/validate.py RUN --max-stage-s 120             # replay the first 120 s of each stage

A run is a plain JSON run (``"format": "servegym.serving_run/1"``, docs/calibration.md), a BLIS
``summary_per_stage.csv`` or folder, a per-request run folder, or a folder holding runs. Prints one table
per run (per stage: measured → simulated TTFT, TPOT and E2E mean and P90, signed relative error, and a
flag where the simulator saturates while the real engine did not) and writes ``fidelity.csv`` and
``fidelity.png`` (measured vs simulated, log-log) into ``--out``. Runs the simulator cannot replay (not in
the catalog, not one replica) are listed with the reason and skipped.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import pandas as pd
from servegym.agents.configs import ROOT
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs.sim.errors import ServingRunError
from servegym.envs.sim.plots import fidelity_scatter
from servegym.envs.sim.serving_runs import format_replay, read_runs, replay

DEFAULT_RUNS = ROOT.parent / "shared" / "data" / "serving"  # the team's shared data beside the checkout


def run(paths: list[Path], profile: str, out: Path, seed: int = 0, max_stage_s: float | None = None) -> pd.DataFrame:
    """Replay every run at ``paths`` under ``profile``; print the tables, write the CSV and plot into ``out``."""
    runs = [r for path in paths for r in read_runs(path)]
    tables, skipped = [], []
    for measured in runs:
        reason = measured.unsupported()
        if reason is not None:
            skipped.append({"run": measured.name, "skipped": reason})
            print(f"{measured.name}: skipped: {reason}\n")
            continue
        result = replay(measured, profile=profile, seed=seed, max_stage_s=max_stage_s)
        print(format_replay(result) + "\n")
        table = result.table.copy()
        table.insert(1, "gpu", measured.gpu)
        table.insert(2, "model", measured.model)
        table.insert(3, "tp", measured.tp)
        table["profile"] = profile
        table["kv_blocks"] = result.kv_blocks
        tables.append(table)
    if not tables:
        raise ServingRunError(f"none of the {len(runs)} run(s) at {', '.join(map(str, paths))} can be replayed")
    frame = pd.concat([*tables, pd.DataFrame(skipped)], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "fidelity.csv", index=False)
    replayed = pd.concat(tables, ignore_index=True)
    fidelity_scatter(replayed, out / "fidelity.png", title=f"measured vs simulated, profile {profile}")
    flagged = replayed[replayed["flag"] != ""]
    print(
        f"{len(replayed)} stage(s) of {len(tables)} run(s) replayed, {len(skipped)} run(s) skipped, "
        f"{len(flagged)} stage(s) flagged; outputs: {out}"
    )
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help=f"measured runs (default: {DEFAULT_RUNS})")
    parser.add_argument("--profile", default="default", help="performance profile: a shipped name or a JSON path")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/validate/<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of Poisson arrivals and the users' turn order")
    parser.add_argument("--max-stage-s", type=float, default=None, help="replay only the first S seconds of a stage")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        paths = args.runs
        if not paths:
            if not DEFAULT_RUNS.is_dir():
                raise ServingRunError(f"no run given and {DEFAULT_RUNS} does not exist; give runs by path")
            paths = [DEFAULT_RUNS]
        if args.max_stage_s is not None and args.max_stage_s <= 0:
            raise ServingRunError(f"--max-stage-s must be positive, got {args.max_stage_s}")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out = args.out or ROOT / "outputs" / "validate" / stamp
        run(paths, args.profile, out, seed=args.seed, max_stage_s=args.max_stage_s)


if __name__ == "__main__":
    main()
