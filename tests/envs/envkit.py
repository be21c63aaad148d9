"""Small clusters and workloads the environment tests share."""

from __future__ import annotations

from typing import Any


def pd_cluster(monitor_interval_s: float = 0.5, names: tuple[str, str] = ("p", "d")) -> dict[str, Any]:
    """2 prefill + 2 decode H100s on one node (Pools-v0's smallest meaningful cluster)."""
    return {
        "snapshot_interval_s": 0.1,
        "monitor_interval_s": monitor_interval_s,
        "groups": [
            {"name": names[0], "count": 2, "node": "n0", "engine": {"gpu": "H100-SXM", "role": "prefill"}},
            {"name": names[1], "count": 2, "node": "n0", "engine": {"gpu": "H100-SXM", "role": "decode"}},
        ],
    }


def synthetic(num_requests: int, rate: float, lengths: dict[str, Any], ttft_s: float, tpot_s: float) -> dict:
    """A Poisson workload with one SLO class."""
    return {
        "kind": "synthetic",
        "num_requests": num_requests,
        "arrivals": {"rate": rate},
        "lengths": lengths,
        "slo": [{"name": "chat", "ttft_s": ttft_s, "tpot_s": tpot_s}],
    }
