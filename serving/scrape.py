"""Scraping the backends' ``/metrics`` pages every Δ: the part of a router's view that engines export.

The hot path does not run the Prometheus text parser (~4–5 ms per vLLM page): it keeps the lines that
start with the handful of names a router reads (~0.03 ms), under vLLM's current and deprecated names
(``vllm:kv_cache_usage_perc`` and ``vllm:gpu_cache_usage_perc``: a router that reads only one breaks
silently on a rename). A backend whose last good scrape is older than the staleness limit is stale.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from servegym.envs.sim.view import EngineInfo, EngineSnapshot

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_CURRENT, KV_DEPRECATED = "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"
CACHE_INFO = "vllm:cache_config_info"
PREFIXES = (RUNNING, WAITING, KV_CURRENT, KV_DEPRECATED, CACHE_INFO)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """The scraped gauges of one backend (summed over its engines if a page holds several)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0
    num_gpu_blocks: int | None = None
    block_size: int | None = None


def gauge_snapshot(info: EngineInfo, scraped: EngineMetrics | None, scraped_at_s: float) -> EngineSnapshot:
    """A backend's scraped gauges as the view's snapshot (zeros before the first scrape, cache blocks from
    the static facts then); the router tap fills the rest (:meth:`servegym.envs.sim.router_tap.RouterTap.snapshots`)."""
    scraped = scraped or EngineMetrics()
    block_size = scraped.block_size or 16
    return EngineSnapshot(
        time_s=scraped_at_s,
        num_requests_running=scraped.num_requests_running,
        num_requests_waiting=scraped.num_requests_waiting,
        kv_cache_usage_perc=scraped.kv_cache_usage_perc,
        num_gpu_blocks=scraped.num_gpu_blocks or max(1, info.kv_capacity_tokens // block_size),
        block_size=block_size,
    )


def _split(line: str) -> tuple[str, str, float]:
    """``name{labels} value [timestamp]`` → (name, label text, value)."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rindex("}")
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    return name, labels, float(rest.split()[0])


def parse_metrics(text: str) -> EngineMetrics:
    """The router's gauges from a Prometheus page, reading only lines with a known prefix."""
    running = waiting = 0.0
    kv: dict[str, float] = {}
    blocks = block_size = None
    for line in text.splitlines():
        if not line.startswith(PREFIXES):
            continue
        name, labels, value = _split(line)
        if name == RUNNING:
            running += value
        elif name == WAITING:
            waiting += value
        elif name in (KV_CURRENT, KV_DEPRECATED):
            kv[name] = max(kv.get(name, 0.0), value)
        elif name == CACHE_INFO:
            found = dict(_LABEL.findall(labels))
            if "num_gpu_blocks" in found and found["num_gpu_blocks"] not in ("", "None"):
                blocks = int(found["num_gpu_blocks"])
            if "block_size" in found:
                block_size = int(found["block_size"])
    usage = kv.get(KV_CURRENT, kv.get(KV_DEPRECATED, 0.0))
    return EngineMetrics(int(running), int(waiting), usage, blocks, block_size)


class Scraper:
    """Scrapes every backend every ``interval_s`` through one shared session; keeps the latest good page."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        urls: Sequence[str],
        interval_s: float = 0.1,
        stale_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session, self.urls, self.interval_s, self.stale_s, self.clock = (
            session,
            list(urls),
            interval_s,
            stale_s,
            clock,
        )
        self.latest: list[EngineMetrics | None] = [None] * len(self.urls)
        self.scraped_at = [-math.inf] * len(self.urls)  # clock time of the latest good scrape
        self.errors = [0] * len(self.urls)
        self._timeout = aiohttp.ClientTimeout(total=max(interval_s * 5, 0.5))
        self._task: asyncio.Task | None = None

    async def _one(self, index: int) -> None:
        try:
            async with self.session.get(self.urls[index] + "/metrics", timeout=self._timeout) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                text = await response.text()
            self.latest[index] = parse_metrics(text)
            self.scraped_at[index] = self.clock()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.errors[index] += 1

    async def scrape_once(self) -> None:
        """Scrape every backend once, concurrently."""
        await asyncio.gather(*(self._one(i) for i in range(len(self.urls))))

    def age_s(self, index: int) -> float:
        """Wall seconds since the backend's latest good scrape (inf before the first)."""
        return self.clock() - self.scraped_at[index]

    def stale(self, index: int) -> bool:
        return self.age_s(index) > self.stale_s

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            started = self.clock()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - started)))  # the scrape cadence
