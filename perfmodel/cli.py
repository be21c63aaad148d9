"""Command line of the performance model: ``python -m servegym.perfmodel {predict,calibrate,report,...}``.

Bad input exits with status 2 and one line on stderr that names the file, line and problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from servegym.perfmodel.catalog import DATA_DIR, get_gpu, get_model, register_catalog
from servegym.perfmodel.errors import PerfModelError
from servegym.perfmodel.profile import load_profile

VIDUR_PROFILE_PATH = DATA_DIR / "profiles" / "vidur.json"


def cmd_predict(args: argparse.Namespace) -> int:
    """Echo each step-log line with ``latency_ms`` (predicted) added."""
    from servegym.perfmodel.steplog import read_steps
    from servegym.perfmodel.structural import StructuralModel

    profile = load_profile(args.profile)
    models: dict[tuple, StructuralModel] = {}
    out = sys.stdout
    for record in read_steps(args.steps):
        key = (record.gpu, record.model, record.tp, record.dtype, record.cuda_graphs)
        if key not in models:
            models[key] = StructuralModel(*key[:4], profile=profile, cuda_graphs=record.cuda_graphs)
        line = dict(record.raw)
        if "latency_ms" in line:
            line["measured_latency_ms"] = line["latency_ms"]
        line["latency_ms"] = round(models[key].predict(record.batch), 6)
        out.write(json.dumps(line) + "\n")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from servegym.perfmodel.calibrate import calibrate, holdout_errors, split_by_tp
    from servegym.perfmodel.steplog import read_steps

    base = load_profile(args.base)
    records = list(read_steps(args.measured, need_latency=True))
    held: list = []
    if args.hold_out_tp:
        try:
            degrees = [int(tp) for tp in args.hold_out_tp.split(",")]
        except ValueError:
            raise PerfModelError(f"--hold-out-tp takes comma-separated integers, got {args.hold_out_tp!r}") from None
        try:
            records, held = split_by_tp(records, degrees)
        except ValueError as error:
            raise PerfModelError(f"{args.measured}: {error}") from None
    profile = calibrate(records, base=base, prior_weight=args.prior_weight, source=str(args.measured))
    profile.save(args.out)
    for gpu, fit in profile.provenance["fit"].items():
        print(
            f"{gpu}: {fit['steps']} steps of {', '.join(fit['models'])} at TP {fit['tp']}: "
            f"in-sample MAPE {fit['in_sample_mape']:.1%}"
        )
    if held:
        print(f"held-out TP {args.hold_out_tp} (never seen by the fit): MAPE / P90 APE, calibrated vs base profile")
        for (gpu, model, tp, n, mape, p90), (*_, base_mape, base_p90) in zip(
            holdout_errors(held, profile), holdout_errors(held, base), strict=True
        ):
            print(f"  {gpu} {model} TP {tp}: {n} steps, {mape:.1%} / {p90:.1%} (base {base_mape:.1%} / {base_p90:.1%})")
    print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table
    from servegym.perfmodel.report import (
        CPU_STEP_LOG,
        SPLITS,
        accuracy,
        gpu_extrapolation,
        operator_accuracy,
        plot_predictions,
        step_accuracy,
    )

    splits = tuple(args.splits.split(",")) if args.splits else SPLITS
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise PerfModelError(f"unknown split(s) {sorted(unknown)}; choose from {', '.join(SPLITS)}")
    started = time.perf_counter()
    summary, predictions = accuracy(splits=splits)
    console = Console(width=max(Console().width, 110))
    table = Table(title="Held-out accuracy on Vidur per-layer operator time (A100-80GB, A40, H100-SXM)")
    for column in ("split", "family", "steps", "MAPE", "P90 APE", "MAPE ≤128 tok (decode)", "MAPE ≥512 tok (prefill)"):
        table.add_column(column, justify="left" if column in ("split", "family") else "right")
    for row in summary.itertuples():
        table.add_row(
            row.split,
            row.family,
            str(row.n),
            f"{row.mape:.1%}",
            f"{row.p90:.1%}",
            f"{row.mape_decode_sized:.1%}",
            f"{row.mape_prefill_sized:.1%}",
        )
    console.print(table)
    if "gpu" in splits:
        extrapolation = gpu_extrapolation(predictions)
        console.print("MAPE on each GPU predicted from its datasheet and the other GPUs' fitted efficiencies:")
        console.print(extrapolation.map(lambda v: f"{v:.1%}").to_string())
    steps = step_accuracy()
    table = Table(title=f"Held-out whole-step accuracy, attention included: {CPU_STEP_LOG.name} (every 2nd step)")
    for column in ("family", "steps", "MAPE", "P90 APE", "MAPE prefill-heavy", "MAPE decode-heavy"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for row in steps.itertuples():
        table.add_row(
            row.family,
            str(row.n),
            f"{row.mape:.1%}",
            f"{row.p90:.1%}",
            f"{row.mape_prefill_heavy:.1%}",
            f"{row.mape_decode_heavy:.1%}",
        )
    console.print(table)
    operators = operator_accuracy()
    console.print("Per-operator MAPE of the structural model on held-out token counts:")
    console.print(operators.T.map(lambda v: f"{v:.1%}").to_string())
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        pd.concat([summary, steps], ignore_index=True).to_csv(args.csv, index=False)
    plot_split = "model" if "model" in splits else splits[0]
    plot_predictions(predictions, Path(args.plot), split=plot_split)
    console.print(f"plot: {args.plot} (held out by {plot_split}); took {time.perf_counter() - started:.0f} s")
    return 0


def cmd_fit_vidur(args: argparse.Namespace) -> int:
    from servegym.perfmodel.vidur_fit import fit_vidur_profile

    profile = fit_vidur_profile()
    profile.save(args.out)
    print(f"wrote {args.out} with GPUs {', '.join(profile.gpus)}")
    return 0


def cmd_microbench(args: argparse.Namespace) -> int:
    import torch
    import yaml
    from servegym.perfmodel import microbench

    model = get_model(args.model)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PerfModelError("--device cuda asked for but torch sees no CUDA device")
        gpu = args.gpu or microbench.detect_gpu_name()
    else:
        entry = microbench.measure_host()
        gpu = args.gpu or str(entry["name"])
        entry["name"] = gpu
        catalog_out = Path(args.out).with_suffix(".catalog.yaml")
        catalog_out.write_text(yaml.safe_dump({"gpus": [entry]}, sort_keys=False))
        register_catalog(catalog_out)
        print(
            f"host measured as {entry['bf16_dense_tflops']} TFLOP/s BF16, {entry['mem_bandwidth_gbps']} GB/s: "
            f"{catalog_out} (pass it with --catalog)"
        )
    get_gpu(gpu)
    compositions = microbench.grid(
        seed=args.seed, points=args.points, max_tokens=args.max_tokens, max_context=args.max_context
    )
    count = microbench.write_log(
        microbench.run(model, gpu, args.device, compositions, repeats=args.repeats), Path(args.out)
    )
    print(f"wrote {count} measured steps to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from servegym.perfmodel.bench import run_benchmarks

    for line in run_benchmarks(repeats=args.repeats):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m servegym.perfmodel", description="ServeGym's step-latency model")
    parser.add_argument(
        "--catalog",
        action="append",
        default=[],
        metavar="YAML",
        help="extra GPUs/models (YAML with 'gpus:' and 'models:' lists); repeatable",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="add predicted latency_ms to each line of a step log")
    predict.add_argument("steps", help="JSON lines {gpu, model, tp, seqs: [[new, context], ...]}")
    predict.add_argument("--profile", help="profile JSON (or a shipped name); default: the shipped Vidur fit")
    predict.set_defaults(func=cmd_predict)

    calibrate = commands.add_parser("calibrate", help="fit a profile to measured whole-step latencies")
    calibrate.add_argument("measured", help="step log whose lines carry latency_ms")
    calibrate.add_argument("--out", required=True, help="where to write the profile JSON")
    calibrate.add_argument("--base", help="profile to start from (default: the shipped Vidur fit)")
    calibrate.add_argument(
        "--prior-weight",
        type=float,
        default=0.01,
        help="pull of each coefficient towards the base profile (default 0.01)",
    )
    calibrate.add_argument(
        "--hold-out-tp", help="comma-separated TP degrees to leave out of the fit and report held-out errors on"
    )
    calibrate.set_defaults(func=cmd_calibrate)

    report = commands.add_parser("report", help="held-out accuracy of every model family, with a plot")
    report.add_argument("--splits", help="comma-separated subset of tokens,model,tp,gpu (default: all)")
    report.add_argument("--plot", default="perfmodel_report.png", help="predicted-vs-measured plot (PNG)")
    report.add_argument("--csv", help="also write the summary table as CSV")
    report.set_defaults(func=cmd_report)

    fit = commands.add_parser("fit-vidur", help="refit the shipped profile from the bundled Vidur measurements")
    fit.add_argument("--out", default=str(VIDUR_PROFILE_PATH))
    fit.set_defaults(func=cmd_fit_vidur)

    bench = commands.add_parser("microbench", help="time real torch kernels of a model's shapes; write a step log")
    bench.add_argument("--model", required=True)
    bench.add_argument("--device", default="cuda", help="cuda or cpu")
    bench.add_argument("--gpu", help="catalog name of the device (detected on CUDA; measured on CPU)")
    bench.add_argument("--points", type=int, default=90)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--max-tokens", type=int, default=4096)
    bench.add_argument("--max-context", type=int, default=4096)
    bench.add_argument("--out", default="microbench_steps.jsonl")
    bench.set_defaults(func=cmd_microbench)

    speed = commands.add_parser("bench", help="print prediction latency and vectorised throughput")
    speed.add_argument("--repeats", type=int, default=5)
    speed.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in args.catalog:
            register_catalog(path)
        return args.func(args)
    except PerfModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
