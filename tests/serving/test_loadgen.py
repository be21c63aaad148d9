"""The load generator replays a simulator workload through the router and summarises it like simulate.py."""

from __future__ import annotations

import math

import pytest
import yaml
from router_cluster import served_cluster
from servegym.serving.loadgen import check_loopback, per_backend, replay, summary, workload_requests
from serving_helpers import FAST, MODEL, run


def test_a_workload_replayed_through_the_router_completes_with_its_lengths(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"kind": "synthetic", "num_requests": 6, "arrivals": {"rate": 20.0},
                                    "lengths": {"kind": "fixed", "prompt": 64, "output": 8},
                                    "slo": [{"name": "chat", "ttft_s": 2.0, "tpot_s": 0.1}]}))  # fmt: skip
    requests = workload_requests(path, 6, rate_scale=1.0, seed=1)

    async def go():
        async with served_cluster(2, "vllm_lor") as cluster:
            records, wall_s = await replay(cluster.url, requests, MODEL, time_scale=FAST, time_limit_s=20)
            generated = sum(t.twin.metrics.generation_tokens.labels(**t.twin.metrics.labels)._value.get()
                            for t in cluster.twins)  # fmt: skip
            return records, wall_s, generated

    records, wall_s, generated = run(go())
    result = summary(records, wall_s, FAST)
    assert result["completed"] == 6 and result["errors"] == 0
    assert generated == 6 * 8
    assert set(records["instance"]) == {"t0", "t1"}
    assert all(math.isfinite(v) and v > 0 for v in records["ttft_s"])
    assert result["slo_attainment"] == 1.0  # 64-token prompts and 8 tokens on idle H100s meet 2 s / 100 ms
    table = per_backend(records)
    assert list(table.index) == ["t0", "t1"] and table["requests"].sum() == 6
    assert (table["slo_attainment"] == 1.0).all() and (table["ttft_p50_ms"] > 0).all()


def test_targets_off_this_machine_are_refused():
    with pytest.raises(ValueError, match="not a loopback address"):
        check_loopback("http://10.1.2.3:8000")
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
