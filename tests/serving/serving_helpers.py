"""Helpers of the serving tests: run a coroutine, read an SSE stream, parse a Prometheus page."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

MODEL = "Llama-3-8B"
FAST = 0.05  # wall seconds per simulated second: simulated time 20x faster than the wall


def run(coroutine: Coroutine) -> Any:
    return asyncio.run(coroutine)


async def read_events(response: aiohttp.ClientResponse) -> list[Any]:
    """The SSE events of a stream: decoded JSON objects, and the string "[DONE]"."""
    raw = await response.read()
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip(b"\n")  # a caller may have read the first event's line already
        if not block:
            continue
        assert block.startswith(b"data: "), block
        payload = block[len(b"data: ") :]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a Prometheus page by name (the full parser: fine in tests)."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out
