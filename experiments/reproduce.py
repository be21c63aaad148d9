"""Reproductions of the source papers' comparisons in the simulator; each is one command.

    python experiments/reproduce.py synergysched   # engine {LENS, vLLM} x router {PRISM, round-robin}
    python experiments/reproduce.py arrow          # colocated vs static PD vs Arrow elastic pools
    python experiments/reproduce.py sal_larry      # SAL vs JSQ vs round-robin; LARRY vs vLLM
    python experiments/reproduce.py all --quick    # smaller windows and fewer seeds (for tests)

The clusters and workloads are the scenarios' (``conf/scenario``: long-context, bursty-conv, short,
pd-shift, hetero-conv); the seeds and window sizes are the reproductions' own. Each writes ``results.md``
(tables), ``runs.csv``, ``summary.json`` and plots into
``docs/results/<name>/`` (or ``--out``). The numbers are what the simulator shows; docs/agents.md
compares them with the papers' claims.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd
from servegym.agents.configs import ROOT, ConfigError
from servegym.agents.harness import Task, max_sustainable_load, run_tasks, summarise
from servegym.agents.reporting import markdown_table
from servegym.agents.user_errors import exit_on_user_error
from servegym.envs import scenarios


def _scenario_window(name: str, requests: int) -> dict:
    """A scenario's workload (conf/scenario) at its test load, cut to ``requests``-request windows: the
    reproductions replay the scenarios' settings (their own seeds and window sizes)."""
    scenario = scenarios.load(name)
    return scenario.workload_at(scenario.loads["test"], requests)


HETERO = scenarios.load("hetero-conv").cluster  # 4x H100 + 4x A100, Llama-3-8B, 3% step noise
VLLM = {"_target_": "servegym.envs.sim.policies.VllmPolicy"}
RR = {"_target_": "servegym.envs.sim.policies.RoundRobin"}


def _lens(slo_tpot_s: float) -> dict:
    return {"_target_": "servegym.agents.batching.Lens", "slo_tpot_s": slo_tpot_s}


def _prism(slo_tpot_s: float) -> dict:
    return {"_target_": "servegym.agents.routing.predictive.Prism", "slo_tpot_s": slo_tpot_s}


COLUMNS = [
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("goodput (req/s)", "goodput_rps", "{:.1f}"),
    ("TTFT P50 (s)", "ttft_p50_s", "{:.2f}"),
    ("TTFT P99 (s)", "ttft_p99_s", "{:.1f}"),
    ("TPOT P50 (ms)", "tpot_p50_s", "ms"),
    ("TPOT P99 (ms)", "tpot_p99_s", "ms"),
]


def _grid(policies: dict, workloads: dict, cluster: dict, seeds: list[int], jobs: int) -> list[dict]:
    """Every policy on every workload and seed, at load x1."""
    tasks = [Task(p, w, s, 1.0) for w in workloads for p in policies for s in seeds]
    return run_tasks(tasks, policies, workloads, cluster, jobs=jobs)


def _bars(table: pd.DataFrame, path: Path, title: str) -> None:
    """SLO attainment per policy (bars, 95% CI whiskers), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(table["workload"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.6 * len(workloads), 3.8), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        part = table[table["workload"] == workload]
        ax.bar(
            range(len(part)),
            part["slo_attainment"],
            yerr=part["slo_attainment_ci"].fillna(0),
            capsize=3,
            color=[f"C{i}" for i in range(len(part))],
        )
        ax.set_xticks(range(len(part)), part["policy"], rotation=25, ha="right", fontsize=8)
        ax.set(ylim=(0, 1.05), title=workload[:48], ylabel="SLO attainment")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(points: dict[str, dict[float, float]], path: Path) -> None:
    """Attainment against load from the bisection's evaluations, one line per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_load in points.items():
        loads = sorted(by_load)
        ax.plot(loads, [by_load[x] for x in loads], marker="o", label=name)
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="load (x the workload's rates)", ylabel="SLO attainment", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save(out: Path, name: str, rows: list[dict], sections: list[str], extra: dict[str, Any] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{k: v for k, v in r.items() if k != "records"} for r in rows]).to_csv(out / "runs.csv", index=False)
    (out / "results.md").write_text(f"# {name}\n\n" + "\n\n".join(sections) + "\n")
    if extra:
        (out / "summary.json").write_text(json.dumps(extra, indent=1, default=float))
    print("\n\n".join(sections))
    print(f"\noutputs: {out}")


def synergysched(out: Path, quick: bool, jobs: int) -> None:
    """SynergySched's ablation: engine {LENS, vLLM} x router {PRISM, round-robin} on three workloads."""
    n = 1500 if quick else 6000
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    slo = {"ttft_s": 5.0, "tpot_s": 0.1}
    workloads = {
        "long-context (arXiv lengths, Poisson 40 req/s)": _scenario_window("long-context", n),
        "bursty production (Azure conv x16, random windows)": _scenario_window("bursty-conv", n),
        "short requests (lognormal 256/256, Poisson 120 req/s)": _scenario_window("short", n),
    }
    policies = {
        "LENS+PRISM": {"router": _prism(0.1), "batch": _lens(0.1)},
        "vLLM+PRISM": {"router": _prism(0.1), "batch": VLLM},
        "LENS+RR": {"router": RR, "batch": _lens(0.1)},
        "vLLM+RR": {"router": RR, "batch": VLLM},
    }
    rows = _grid(policies, workloads, HETERO, seeds, jobs)
    table = summarise(rows, reference="vLLM+RR")
    sections = [
        f"4x H100-SXM + 4x A100-80GB serving Llama-3-8B; SLO TTFT ≤ {slo['ttft_s']} s and TPOT ≤ "
        f"{slo['tpot_s'] * 1e3:.0f} ms; {len(seeds)} seeds (mean ± 95% CI); {n} requests per run."
    ]
    for workload in workloads:
        sections.append(f"## {workload}\n\n" + markdown_table(table[table["workload"] == workload], COLUMNS, "vLLM+RR"))
    _bars(table, out / "attainment.png", "SynergySched ablation")
    sections.append("![SLO attainment](attainment.png)")
    _save(
        out,
        "SynergySched ablation: LENS/vLLM x PRISM/round-robin",
        rows,
        sections,
        {"table": json.loads(table.to_json(orient="records"))},
    )


def arrow(out: Path, quick: bool, jobs: int) -> None:
    """Arrow: colocated vs static PD vs elastic pools under a prompt/output mix that shifts (code, then chat)."""
    n = 800 if quick else 3000
    seeds = [0] if quick else [0, 1, 2]
    workload = {"shift": _scenario_window("pd-shift", n)}  # code x20, then conversation x10 (per part: n requests)
    pd_cluster = scenarios.load("pd-shift").cluster  # 4 prefill + 4 decode H100s
    engine = {k: v for k, v in pd_cluster["groups"][0]["engine"].items() if k != "role"}
    colocated = {"snapshot_interval_s": 0.1, "groups": [{"count": 8, "engine": engine}]}
    arrow_router = {"_target_": "servegym.agents.pools.Arrow", "slo_ttft_s": 2.0, "slo_tpot_s": 0.1}
    setups = {
        "colocated (8x both, LOR)": (
            colocated,
            {"router": {"_target_": "servegym.envs.sim.policies.LeastOutstandingRequests"}, "batch": VLLM},
        ),
        "static PD 4P+4D (JSQ)": (
            pd_cluster,
            {
                "router": {"_target_": "servegym.agents.routing.classic.JoinShortestQueue"},
                "batch": VLLM,
                "pools": {"_target_": "servegym.envs.sim.policies.StaticPools"},
            },
        ),
        "Arrow elastic 4P+4D": (pd_cluster, {"router": arrow_router, "batch": VLLM, "pools": "router"}),
    }
    rows, rates, points = [], {}, {}
    for name, (cluster, policy) in setups.items():
        policies = {name: policy}
        rows += run_tasks(
            [Task(name, "shift", s, 1.0) for s in seeds], policies, workload, cluster, jobs=jobs, progress=False
        )
        offered: dict[float, float] = {}
        points[name] = {}

        def attainment(load: float, policies=policies, cluster=cluster, name=name, offered=offered) -> float:
            found = run_tasks(
                [Task(name, "shift", s, load) for s in seeds], policies, workload, cluster, jobs=jobs, progress=False
            )
            offered[load] = sum(r["offered_rps"] for r in found) / len(found)
            points[name][load] = sum(r["slo_attainment"] for r in found) / len(found)
            return points[name][load]

        load = max_sustainable_load(attainment, target=0.9, low=0.1, high=1.0, iterations=3 if quick else 5)
        rates[name] = {"load": load, "rate_rps": offered.get(load, 0.0)}
        print(f"{name}: max load x{load:.2f} ({rates[name]['rate_rps']:.1f} req/s) at 90% attainment")
    table = summarise(rows)
    lines = [
        "| setup | max sustainable load at 90% attainment | mean offered rate there (req/s) |",
        "|---|---|---|",
    ] + [f"| {k} | x{v['load']:.2f} | {v['rate_rps']:.1f} |" for k, v in rates.items()]
    sections = [
        f"8x H100-SXM serving Llama-3-8B. Workload: {n} requests of the Azure code trace (x20, "
        f"prefill-heavy) then {n} of the conversation trace (x10, decode-heavier); SLO TTFT ≤ 2 s, TPOT ≤ "
        f"100 ms; {len(seeds)} seed(s). Loads multiply both parts' rates.",
        "## Maximum sustainable load (bisection)\n\n" + "\n".join(lines),
        "## At load x1\n\n" + markdown_table(table, COLUMNS),
        "![attainment against load](attainment_vs_load.png)",
    ]
    _curves(points, out / "attainment_vs_load.png")
    _save(
        out,
        "Arrow: colocated vs static vs elastic prefill/decode pools",
        rows,
        sections,
        {"max_rate": rates, "table": json.loads(table.to_json(orient="records"))},
    )


def sal_larry(out: Path, quick: bool, jobs: int) -> None:
    """Kossmann et al.: token-aware routing (SAL) vs JSQ vs round-robin; LARRY vs vLLM under KV pressure."""
    n = 1500 if quick else 6000
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    routing_workload = {"azure conv x17": _scenario_window("hetero-conv", n)}  # random windows at x17
    routers = {
        "SAL (token-aware)": {"_target_": "servegym.agents.routing.classic.TokenAware"},
        "JSQ": {"_target_": "servegym.agents.routing.classic.JoinShortestQueue"},
        "least outstanding": {"_target_": "servegym.envs.sim.policies.LeastOutstandingRequests"},
        "round-robin": RR,
    }
    policies = {name: {"router": r, "batch": VLLM} for name, r in routers.items()}
    rows = _grid(policies, routing_workload, HETERO, seeds, jobs)
    routing_table = summarise(rows, reference="round-robin")
    kv_workload = {
        "arXiv lengths on Llama-2-7B / A100-40GB": {
            "kind": "synthetic",
            "num_requests": n // 3,
            "arrivals": {"rate": 5.0, "cv": 2.0},
            "lengths": {"kind": "empirical", "source": "arxiv"},
            "slo": [{"name": "long", "ttft_s": 10.0, "tpot_s": 0.1}],
        }
    }
    kv_cluster = {
        "snapshot_interval_s": 0.1,
        "groups": [{"count": 4, "engine": {"gpu": "A100-40GB", "model": "Llama-2-7B", "noise_sigma": 0.03}}],
    }
    batchers = {"LARRY": {"_target_": "servegym.agents.batching.Larry"}, "vLLM default": VLLM}
    kv_policies = {
        name: {"router": {"_target_": "servegym.envs.sim.policies.LeastOutstandingRequests"}, "batch": b}
        for name, b in batchers.items()
    }
    kv_rows = _grid(kv_policies, kv_workload, kv_cluster, seeds, jobs)
    kv_table = summarise(kv_rows, reference="vLLM default")
    kv_columns = [
        *COLUMNS[:4],
        ("throughput (tok/s)", "throughput_tok_s", "{:,.0f}"),
        ("preemptions / request", "preemption_rate", "{:.3f}"),
    ]
    sections = [
        "## Routing: 4x H100-SXM + 4x A100-80GB, Llama-3-8B, Azure conversation trace x17 (random windows)\n\n"
        + markdown_table(routing_table, COLUMNS, "round-robin"),
        "## Batching under KV pressure: 4x A100-40GB, Llama-2-7B (MHA: 512 KiB of KV per token), arXiv lengths, "
        "bursty arrivals (Gamma cv 2, 5 req/s)\n\n" + markdown_table(kv_table, kv_columns, "vLLM default"),
        "![SLO attainment](attainment.png)",
    ]
    _bars(pd.concat([routing_table, kv_table]), out / "attainment.png", "SAL routing and LARRY batching")
    _save(
        out,
        "Kossmann et al.: SAL and LARRY",
        rows + kv_rows,
        sections,
        {
            "routing": json.loads(routing_table.to_json(orient="records")),
            "batching": json.loads(kv_table.to_json(orient="records")),
        },
    )


REPRODUCTIONS = {"synergysched": synergysched, "arrow": arrow, "sal_larry": sal_larry}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*REPRODUCTIONS, "all"]
    parser.add_argument("which", metavar="{" + ",".join(names) + "}")
    parser.add_argument("--quick", action="store_true", help="smaller windows and fewer seeds")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.which not in names:
            raise ConfigError(f"unknown reproduction {args.which!r}; known: {', '.join(names)}")
        for name in REPRODUCTIONS if args.which == "all" else [args.which]:
            REPRODUCTIONS[name](args.out / name, args.quick, args.jobs)


if __name__ == "__main__":
    main()
