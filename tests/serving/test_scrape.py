"""The line-prefix scraper reads what the full Prometheus parser reads, under current and deprecated names."""

from __future__ import annotations

import aiohttp
import pytest
from servegym.serving.scrape import Scraper, parse_metrics
from servegym.serving.twin import start_twin
from serving_helpers import FAST, MODEL, run, samples


async def _busy_page(names: str) -> str:
    """A twin's page while requests are running and waiting (two slots, four requests)."""
    import asyncio

    async with start_twin(time_scale=FAST, metric_names=names, max_num_seqs=2) as twin, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": list(range(300)), "max_tokens": 400, "ignore_eos": True, "stream": True}
        responses = [await s.post(twin.url + "/v1/completions", json=body) for _ in range(4)]
        await asyncio.gather(*(r.content.readline() for r in responses[:2]))  # two have their first token
        async with s.get(twin.url + "/metrics") as response:
            page = await response.text()
        for r in responses:
            r.close()
        return page


@pytest.mark.parametrize("names", ["current", "deprecated", "both"])
def test_parser_agrees_with_the_full_parser_on_a_twin_page(names):
    page = run(_busy_page(names))
    full = samples(page)
    kv_name = "vllm:gpu_cache_usage_perc" if names == "deprecated" else "vllm:kv_cache_usage_perc"
    parsed = parse_metrics(page)
    assert parsed.num_requests_running == full["vllm:num_requests_running"][0][1] == 2
    assert parsed.num_requests_waiting == full["vllm:num_requests_waiting"][0][1] == 2
    assert parsed.kv_cache_usage_perc == pytest.approx(full[kv_name][0][1]) and parsed.kv_cache_usage_perc > 0
    info = full["vllm:cache_config_info"][0][0]
    assert (parsed.num_gpu_blocks, parsed.block_size) == (int(info["num_gpu_blocks"]), int(info["block_size"]))


def test_parser_reads_deprecated_names_and_sums_engines():
    page = "\n".join(
        [
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 4.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0 1700000000000',
            'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25',
            'vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.5',
            'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="1000"} 1.0',
            'vllm:num_requests_running_other{engine="0"} 99',
        ]
    )
    parsed = parse_metrics(page)
    assert parsed.num_requests_running == 7  # summed over engines; the _other line shares the prefix, not the name
    assert parsed.num_requests_waiting == 1
    assert parsed.kv_cache_usage_perc == 0.5
    assert (parsed.num_gpu_blocks, parsed.block_size) == (1000, 32)


def test_a_backend_that_stops_answering_goes_stale():
    now = [0.0]

    async def go():
        async with start_twin(time_scale=FAST) as twin, aiohttp.ClientSession() as session:
            scraper = Scraper(session, [twin.url], interval_s=0.1, stale_s=2.0, clock=lambda: now[0])
            await scraper.scrape_once()
            fresh = scraper.stale(0), scraper.latest[0]
            await twin.stop()
            now[0] = 2.5
            await scraper.scrape_once()
            return fresh, scraper.stale(0), scraper.errors[0]

    (was_stale, metrics), stale, errors = run(go())
    assert not was_stale and metrics is not None
    assert stale and errors == 1
