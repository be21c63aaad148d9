"""Open-loop load generator: replay any workload the simulator takes against an OpenAI-compatible URL.

    python -m servegym.serving.loadgen --target http://127.0.0.1:8000 --workload conf/workload/poisson.yaml \
        --requests 200 [--rate-scale 1 --seed 0 --time-limit-s 60 --time-scale 1]

Arrivals, prompt and output lengths and SLO classes come from the simulator's workload generators
(``servegym.envs.sim.config.workload_from``). Every request streams with ``ignore_eos`` and ``max_tokens`` = its
output length, its prompt built to its length under the shared token rule (:mod:`servegym.serving.tokens`), so
the engine does the work the simulator would. Per request it records TTFT, inter-token gaps and E2E,
divided by ``--time-scale`` (the twins' scale: results in simulated seconds), and prints the summary
table ``experiments/simulate.py`` prints. Bounded in count and time; loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pandas as pd
import yaml
from servegym.agents.reporting import print_summary
from servegym.envs.sim.config import workload_from
from servegym.envs.sim.metrics import RECORD_COLUMNS, summarize
from servegym.envs.sim.request import Request
from servegym.envs.sim.workload import WorkloadError, scale_load
from servegym.serving.tokens import hashed_prompt, make_prompt

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def check_loopback(target: str) -> str:
    """Refuse a target that is not on this machine (the load generator never leaves loopback)."""
    host = urlparse(target).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"target {target!r} is not a loopback address ({', '.join(sorted(LOOPBACK_HOSTS))})")
    return target.rstrip("/")


def workload_requests(path: str | Path, count: int, rate_scale: float = 1.0, seed: int = 0) -> list[Request]:
    """The first ``count`` requests of a workload YAML (``conf/workload/*.yaml`` style), its rate scaled."""
    mapping = yaml.safe_load(Path(path).read_text())
    return scale_load(workload_from(mapping), rate_scale).generate(seed)[:count]


async def _one(
    session: aiohttp.ClientSession,
    target: str,
    model: str,
    request: Request,
    start: float,
    scale: float,
    segment_tokens: int = 512,
) -> dict[str, Any]:
    """Send one request at its arrival time; its record in simulated seconds."""
    await asyncio.sleep(max(0.0, start + request.arrival_s * scale - time.monotonic()))  # open-loop arrival
    sent = time.monotonic()
    prompt = (
        hashed_prompt(request.hash_ids, request.prompt_tokens, segment_tokens, seed=request.id)
        if request.hash_ids
        else make_prompt(request.prompt_tokens, seed=request.id)
    )
    body = {"model": model, "prompt": prompt, "max_tokens": request.output_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"X-SLO-Class": request.slo.name}
    if request.session_id >= 0:
        headers["X-Session-Id"] = str(request.session_id)
    times: list[float] = []
    error, backend = "", ""
    try:
        async with session.post(target + "/v1/completions", json=body, headers=headers) as response:
            backend = response.headers.get("X-ServeGym-Twin", "")
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.text())[:200]}"
            else:
                async for line in response.content:
                    if line.startswith(b'data: {"error"'):
                        error = json.loads(line[6:])["error"]["message"]
                    elif line.startswith(b"data: {") and b'"choices":[]' not in line:
                        times.append(time.monotonic())
    except (aiohttp.ClientError, TimeoutError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    finished = not error and len(times) == request.output_tokens
    ttft = (times[0] - sent) / scale if times else math.nan
    e2e = (times[-1] - sent) / scale if finished else math.nan
    tpot = (times[-1] - times[0]) / scale / (len(times) - 1) if finished and len(times) > 1 else 0.0
    gaps = [(b - a) / scale for a, b in itertools.pairwise(times)]
    return {
        "id": request.id,
        "arrival_s": request.arrival_s,
        "instance": backend,
        "prefill_instance": backend,
        "prompt_tokens": request.prompt_tokens,
        "output_tokens": request.output_tokens,
        "slo_class": request.slo.name,
        "state": "finished" if finished else "rejected",
        "queue_s": math.nan,
        "transfer_s": 0.0,
        "ttft_s": ttft,
        "tpot_s": tpot if finished else math.nan,
        "e2e_s": e2e,
        "max_gap_s": max(gaps, default=0.0),
        "preemptions": 0,
        "prefix_hit_tokens": 0,
        "slo_met": finished and request.slo.met(ttft, tpot, e2e),
        "reject_reason": error or ("" if finished else f"{len(times)} of {request.output_tokens} tokens"),
    }


async def replay(
    target: str,
    requests: Sequence[Request],
    model: str,
    time_scale: float = 1.0,
    time_limit_s: float = 60.0,
    segment_tokens: int = 512,
) -> tuple[pd.DataFrame, float]:
    """Replay ``requests`` open-loop; per-request records and the wall seconds it took. Requests still
    running at the time limit are cancelled and recorded as not finished.

    Each request carries its SLO class (``X-SLO-Class``) and session (``X-Session-Id``); one with prefix
    hashes is sent as a token-id prompt whose ``segment_tokens``-token segments follow its hashes, so the
    router and the twins see the workload's prefix sharing."""
    target = check_loopback(target)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [
            asyncio.ensure_future(_one(session, target, model, r, started, time_scale, segment_tokens))
            for r in requests
        ]
        done, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    rows = [t.result() for t in tasks if t in done]
    finished_ids = {row["id"] for row in rows}
    for request in requests:
        if request.id not in finished_ids:
            rows.append({"id": request.id, "arrival_s": request.arrival_s, "prompt_tokens": request.prompt_tokens,
                         "output_tokens": request.output_tokens, "slo_class": request.slo.name, "state": "in_flight",
                         "slo_met": False, "preemptions": 0, "prefix_hit_tokens": 0,
                         "reject_reason": "time limit"})  # fmt: skip
    records = pd.DataFrame(rows, columns=list(RECORD_COLUMNS)).sort_values("id", ignore_index=True)
    return records, time.monotonic() - started


def summary(records: pd.DataFrame, wall_s: float, time_scale: float) -> dict[str, Any]:
    """The simulator's run summary over live records (simulated seconds; no engine-side counts)."""
    done = records[records["state"] == "finished"]
    ends = done["arrival_s"] + done["e2e_s"]
    sim_s = float(ends.max()) if len(done) else wall_s / time_scale
    out = summarize(records, [], sim_s, wall_s)
    out["errors"] = int((records["state"] == "rejected").sum())
    return out


def per_backend(records: pd.DataFrame) -> pd.DataFrame:
    """Requests, SLO attainment and latency medians per backend (the ``X-ServeGym-Twin`` each answered from)."""
    done = records[records["state"] == "finished"]
    table = done.groupby("instance").agg(
        requests=("id", "size"),
        slo_attainment=("slo_met", "mean"),
        ttft_p50_ms=("ttft_s", lambda x: 1e3 * x.median()),
        tpot_p50_ms=("tpot_s", lambda x: 1e3 * x.median()),
        e2e_p50_s=("e2e_s", "median"),
    )
    return table.rename_axis("backend")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m servegym.serving.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="router or twin URL (loopback)")
    parser.add_argument("--workload", required=True, help="a workload YAML (conf/workload/*.yaml)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rate-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit-s", type=float, default=60.0, help="wall seconds before the rest is cancelled")
    parser.add_argument("--time-scale", type=float, default=1.0, help="the twins' --time-scale")
    parser.add_argument("--model", default="Llama-3-8B")
    parser.add_argument("--segment-tokens", type=int, default=512, help="prompt tokens per prefix hash")
    args = parser.parse_args(argv)
    try:
        check_loopback(args.target)
        requests = workload_requests(args.workload, args.requests, args.rate_scale, args.seed)
    except (OSError, ValueError, WorkloadError) as error:
        raise SystemExit(f"error: {error}") from None
    records, wall_s = asyncio.run(
        replay(args.target, requests, args.model, args.time_scale, args.time_limit_s, args.segment_tokens)
    )
    result = summary(records, wall_s, args.time_scale)
    print_summary(result, f"{Path(args.workload).stem} live at {args.target} ({len(requests)} requests)")
    print(f"errors: {result['errors']}, in flight at the time limit: {result['in_flight'] - result['errors']}")
    backends = per_backend(records)
    if len(backends) > 1:
        print("per backend (simulated units):")
        print(backends.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
