"""Copy the measurements ServeGym ships from a checkout of the team's shared data folder.

Run once when the shared data changes; the project never reads ``../shared`` at run time.
Vidur's per-layer operator profiles (MIT, microsoft/vidur) are reduced to their median columns and
written as compact gzip CSVs under ``perfmodel/data/measurements/``.

    python experiments/import_shared_data.py ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

OPS = (
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")
GPU_OF_VIDUR_DIR = {"a100": "A100-80GB", "h100": "H100-SXM", "a40": "A40"}
MODEL_OF_VIDUR_DIR = {
    "Llama-2-7b-hf": "Llama-2-7B",
    "Llama-2-70b-hf": "Llama-2-70B",
    "Meta-Llama-3-8B": "Llama-3-8B",
    "Meta-Llama-3-70B": "Llama-3-70B",
    "CodeLlama-34b-Instruct-hf": "CodeLlama-34B",
    "internlm-20b": "InternLM-20B",
    "Qwen-72B": "Qwen-72B",
    "phi-2": "Phi-2",
}
# Topologies whose all-reduce timings stand for a GPU's tensor-parallel link (the A100 DGX
# file mixes in multi-node runs, so the pairwise NVLink measurements are used for A100).
ALLREDUCE_SOURCES = {"H100-SXM": "h100_dgx", "A100-80GB": "a100_pairwise_nvlink"}


def compute_ops(shared: Path) -> pd.DataFrame:
    """Median per-layer operator times (ms) of every Vidur compute profile, one row per measured step."""
    frames = []
    for path in sorted((shared / "profiling/vidur/compute").glob("*/*/*/mlp.csv")):
        gpu_dir, model_dir = path.parts[-4], path.parts[-2]
        raw = pd.read_csv(path)
        frame = pd.DataFrame(
            {
                "gpu": GPU_OF_VIDUR_DIR[gpu_dir],
                "model": MODEL_OF_VIDUR_DIR[model_dir],
                "tp": raw["num_tensor_parallel_workers"].astype(int),
                "num_tokens": raw["num_tokens"].astype(int),
            }
        )
        for column in SHAPE_COLUMNS:
            frame[column] = raw[column]
        for op in OPS:  # an architecture without an operator (Phi-2 has one layernorm) leaves it empty
            column = f"time_stats.{op}.median"
            frame[op] = raw[column].round(6) if column in raw else float("nan")
        frames.append(frame)
    ops = pd.concat(frames, ignore_index=True)
    return ops.sort_values(["gpu", "model", "tp", "num_tokens"], ignore_index=True)


def all_reduce(shared: Path) -> pd.DataFrame:
    """Median all-reduce latency (ms) by message size and worker count for each GPU with data."""
    frames = []
    for gpu, topology in ALLREDUCE_SOURCES.items():
        raw = pd.read_csv(shared / f"profiling/vidur/network/{topology}/all_reduce.csv")
        frames.append(
            pd.DataFrame(
                {
                    "gpu": gpu,
                    "topology": topology,
                    "num_workers": raw["num_workers"].astype(int),
                    "size_bytes": raw["size"].astype(int),
                    "latency_ms": raw["time_stats.all_reduce.median"].round(6),
                }
            )
        )
    return pd.concat(frames, ignore_index=True).sort_values(["gpu", "num_workers", "size_bytes"])


TRACES = (  # (source file under traces/, shipped name) — gzip keeps the rows byte for byte
    ("AzureLLMInferenceTrace_conv_2023.csv", "azure_conv_2023.csv.gz"),
    ("AzureLLMInferenceTrace_code_2023.csv", "azure_code_2023.csv.gz"),
    ("arxiv_summarization_lengths.csv", "arxiv_summarization_lengths.csv.gz"),
)


def copy_traces(shared: Path, out: Path) -> None:
    """Ship the Azure 2023 traces (CC-BY-4.0) and Vidur's arXiv length sample (MIT) gzipped, unchanged."""
    import gzip

    out.mkdir(parents=True, exist_ok=True)
    for source, name in TRACES:
        data = (shared / "traces" / source).read_bytes()
        with gzip.GzipFile(out / name, "wb", mtime=0) as handle:
            handle.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shared_data", type=Path, help="path of the shared data folder (../shared/data)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "perfmodel/data/measurements")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ops = compute_ops(args.shared_data)
    ops.to_csv(args.out / "vidur_ops.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
    collectives = all_reduce(args.shared_data)
    collectives.to_csv(args.out / "vidur_allreduce.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
    print(f"wrote {len(ops)} operator rows and {len(collectives)} all-reduce rows to {args.out}")
    traces = Path(__file__).resolve().parents[1] / "envs/sim/data/traces"
    copy_traces(args.shared_data, traces)
    print(f"copied {len(TRACES)} traces to {traces}")


if __name__ == "__main__":
    main()
