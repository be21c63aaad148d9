"""Tiny synthetic measured runs in each format the serving-run readers know (none reads ../shared)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from servegym.envs.sim.serving_runs import Measured

BLIS_EXPERIMENT = "20260101-000000-llama-2-7b-tp1-general"
BLIS_HEADER = [
    *("experiment", "sim2real_exp_id", "model", "tp", "max_num_seqs", "max_num_batched_tokens", "max_model_len"),
    *("system_prompt_len", "question_len", "output_len", "num_system_prompts", "users_per_prompt", "stage"),
    *("requested_rate", "stage_duration_s", "n_success", "n_fail", "prompt_len_mean", "output_len_mean"),
    *("ttft_mean_ms", "ttft_median_ms", "ttft_p90_ms", "ttft_p99_ms"),
    *("e2e_mean_ms", "e2e_median_ms", "e2e_p90_ms", "e2e_p99_ms"),
]


def blis_folder(root: Path, ttft_mean: str = "25.0", load_type: str = "constant") -> Path:
    """A BLIS-like folder: two stages (4 and 8 req/s, 10 s each) of a 3x2 shared-prefix workload, a summary row."""
    root.mkdir(parents=True, exist_ok=True)
    common = {
        "experiment": BLIS_EXPERIMENT,
        "sim2real_exp_id": "",
        "model": "meta-llama/Llama-2-7b-hf",
        "tp": "1",
        "max_num_seqs": "64",
        "max_num_batched_tokens": "1024",
        "max_model_len": "4096",
        "system_prompt_len": "100",
        "question_len": "150",
        "output_len": "33",
        "num_system_prompts": "3",
        "users_per_prompt": "2",
        "stage_duration_s": "10",
        "n_fail": "0",
        "prompt_len_mean": "259.6",
        "output_len_mean": "20.1",
        "ttft_median_ms": "24",
        "ttft_p99_ms": "40",
        "e2e_median_ms": "300",
        "e2e_p99_ms": "400",
    }
    rows = [
        {
            **common,
            "stage": "0",
            "requested_rate": "4.0",
            "n_success": "40",
            "ttft_mean_ms": ttft_mean,
            "ttft_p90_ms": "30.0",
            "e2e_mean_ms": "345.0",
            "e2e_p90_ms": "360.0",
        },
        {
            **common,
            "stage": "1",
            "requested_rate": "8.0",
            "n_success": "80",
            "ttft_mean_ms": "28.0",
            "ttft_p90_ms": "33.0",
            "e2e_mean_ms": "380.0",
            "e2e_p90_ms": "400.0",
        },
        {**common, "stage": "summary", "requested_rate": "", "n_success": "120", "ttft_mean_ms": "27",
         "ttft_p90_ms": "", "e2e_mean_ms": "370", "e2e_p90_ms": ""},
    ]  # fmt: skip
    with open(root / "summary_per_stage.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=BLIS_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    run_dir = root / "runs" / BLIS_EXPERIMENT
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "exp-config.yaml").write_text(
        "model: meta-llama/Llama-2-7b-hf\ntensor_parallelism: 1\nmax_model_len: 4096\n"
        "max_num_batched_tokens: 1024\nmax_num_seqs: 64\napp: inference-perf\n"
    )
    profile = {
        "data": {"shared_prefix": {"num_unique_system_prompts": 3, "num_users_per_system_prompt": 2}},
        "load": {"stages": [{"duration": 10, "rate": 4}, {"duration": 10, "rate": 8}], "type": load_type},
    }
    (run_dir / "profile.yaml").write_text(json.dumps(profile))
    return root


def request_rows(count: int = 30, gap_s: float = 0.25) -> list[dict]:
    return [
        {
            "request_id": f"bench-{i}",
            "arrival_s": round(i * gap_s, 6),
            "input_tokens": 200 + 10 * (i % 5),
            "output_tokens": 20 + (i % 3),
            "queue_wait_ms": 0.01,
            "ttft_ms": 40.0 + i,
            "tpot_ms": 9.0 + 0.1 * i,
            "e2e_ms": 250.0 + 3 * i,
        }
        for i in range(count)
    ]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def request_run(parent: Path, meta_extra: dict | None = None, rows: list[dict] | None = None) -> Path:
    """An LLMServingSim-like run folder: per_request_normalized.csv and vllm/meta.json (an RTX 4090)."""
    run_dir = parent / "RTX4090" / "Llama-3.1-8B"
    (run_dir / "vllm").mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "meta-llama/Llama-3.1-8B",
        "engine_kwargs": {
            "tensor_parallel_size": 1,
            "data_parallel_size": 1,
            "enable_expert_parallel": False,
            "max_num_seqs": 64,
            "max_num_batched_tokens": 2048,
            "max_model_len": 8192,
            "dtype": "bfloat16",
        },
        "kv_cache": {"num_gpu_blocks": 2000, "block_size": 16, "gpu_memory_utilization": 0.9,
                     "enable_prefix_caching": True},
        "hardware": {"device_name": "NVIDIA GeForce RTX 4090"},
        **(meta_extra or {}),
    }  # fmt: skip
    (run_dir / "vllm" / "meta.json").write_text(json.dumps(meta))
    write_csv(run_dir / "per_request_normalized.csv", rows or request_rows())
    return run_dir


def plain_document(**overrides) -> dict:
    """A plain-format run: Llama-2-7B on an H100, two short stages (even, then Poisson) with a shared prefix."""
    document = {
        "format": "servegym.serving_run/1",
        "name": "tiny-h100",
        "gpu": "H100-SXM",
        "model": "Llama-2-7B",
        "tp": 1,
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 1024, "max_model_len": 4096, "block_size": 16},
        "prefix": {"groups": 3, "users_per_group": 2, "system_prompt_tokens": 100},
        "stages": [
            {"rate": 4, "duration_s": 10, "arrivals": "even", "prompt_tokens": 260, "output_tokens": 33,
             "measured": {"requests": 40, "ttft_mean_ms": 25.0, "ttft_p90_ms": 30.0, "tpot_mean_ms": 9.0,
                          "e2e_mean_ms": 310.0, "e2e_p90_ms": 330.0}},
            {"rate": 8, "duration_s": 10, "arrivals": "poisson", "prompt_tokens": 260, "output_tokens": 33,
             "measured": {"requests": 80, "ttft_mean_ms": 28.0, "ttft_p90_ms": 33.0, "tpot_mean_ms": 10.0,
                          "e2e_mean_ms": 350.0, "e2e_p90_ms": 380.0}},
        ],
    }  # fmt: skip
    document.update(overrides)
    return document


def plain_run(path: Path, **overrides) -> Path:
    path.write_text(json.dumps(plain_document(**overrides)))
    return path


def self_measured(result, run):
    """The run with the simulator's own numbers (a replay's) as its measurement."""
    stages = []
    for stage, row in zip(run.stages, result.table.to_dict("records"), strict=True):
        values = {f"{m}_{s}_ms": row[f"{m}_{s}_sim_ms"] for m in ("ttft", "tpot", "e2e") for s in ("mean", "p90")}
        stages.append(dataclasses.replace(stage, measured=Measured(requests=row["sim_requests"], **values)))
    return dataclasses.replace(run, stages=tuple(stages))
