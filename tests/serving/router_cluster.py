"""A served cluster for router tests: N twins on free loopback ports and a router in front of them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from servegym.serving.router import RunningRouter, start_router
from servegym.serving.router_config import router_config
from servegym.serving.twin import RunningTwin, TwinConfig, start_twin
from serving_helpers import FAST, MODEL, samples


class ServedCluster:
    def __init__(self, twins: list[RunningTwin], router: RunningRouter) -> None:
        self.twins, self.router_server = twins, router
        self.router = router.router
        self.url = router.url

    async def router_counters(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/metrics") as response:
            page = samples(await response.text())
        return {
            "received": sum(v for _, v in page["servegym_router_requests_received_total"]),
            "responses": sum(v for _, v in page.get("servegym_router_responses_total", [])),
            "errors": {labels["kind"]: v for labels, v in page["servegym_router_errors_total"]},
            "failovers": page["servegym_router_failovers_total"][0][1],
            "routed": {labels["backend"]: v for labels, v in page["servegym_router_routed_total"]},
        }


@contextlib.asynccontextmanager
async def served_cluster(
    count: int, policy: str = "vllm_rr", faults: Mapping[int, Mapping[str, Any]] | None = None, **router_keys: Any
) -> AsyncIterator[ServedCluster]:
    """``count`` H100 twins named t0, t1, ... (``faults[i]``: TwinConfig overrides of twin i) behind a router."""
    faults = faults or {}
    async with contextlib.AsyncExitStack() as stack:
        twins: Sequence[RunningTwin] = []
        for i in range(count):
            config = TwinConfig(time_scale=FAST, engine_index=i, name=f"t{i}", seed=i, **dict(faults.get(i, {})))
            twins.append(await stack.enter_async_context(start_twin(config)))
        mapping = {
            "cluster": {"groups": [{"name": "h100", "count": count, "engine": {"gpu": "H100-SXM", "model": MODEL}}]},
            "backends": [t.url for t in twins],
            "time_scale": FAST,
            "scrape_interval_s": 0.05,
            "probe_interval_s": 0.05,
            **router_keys,
        }
        router = await stack.enter_async_context(start_router(router_config(mapping), policy))
        yield ServedCluster(list(twins), router)
