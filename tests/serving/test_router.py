"""The router in front of twins: the OpenAI client works through it, bodies pass unchanged, routing
follows the policy, faults fail over or end in clear errors, and every request is accounted once."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import openai
import pytest
from router_cluster import served_cluster
from servegym.serving.router_config import RouterConfigError, router_config
from servegym.serving.twin import TWIN_HEADER
from serving_helpers import MODEL, read_events, run

SHORT = {"model": MODEL, "prompt": "hello world", "max_tokens": 3, "ignore_eos": True}


async def _post(session, url, body, path="/v1/completions", **kwargs):
    async with session.post(url + path, json=body, **kwargs) as response:
        return response.status, response.headers.get(TWIN_HEADER), await response.read()


async def _accounted(cluster, session):
    counters = await cluster.router_counters(session)
    assert counters["received"] == counters["responses"] + sum(counters["errors"].values()), counters
    return counters


def test_the_openai_client_through_the_router():
    async def go():
        async with served_cluster(2) as cluster:
            client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
            models = await client.models.list()
            whole = await client.completions.create(model=MODEL, prompt="one two three", max_tokens=5,
                                                    extra_body={"ignore_eos": True})  # fmt: skip
            stream = await client.completions.create(
                model=MODEL, prompt="one two", max_tokens=4, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = [c async for c in stream]
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            chat_stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chat_chunks = [c async for c in chat_stream]
            recorded = [t.twin.last_request for t in cluster.twins]
            await client.close()
            return models, whole, chunks, chat, chat_chunks, recorded

    models, whole, chunks, chat, chat_chunks, recorded = run(go())
    assert models.data[0].id == MODEL
    assert whole.usage.completion_tokens == 5 and len(whole.choices[0].text.split()) == 5
    assert [c.choices[0].text for c in chunks[:-1]] and len(chunks) == 5
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].usage.total_tokens == 1 + 3
    bodies = [json.loads(r["body"]) for r in recorded]  # round robin: the 3rd request on t0, the 4th on t1
    assert bodies[1] == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
                         "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    assert bodies[0]["ignore_eos"] is True and "stream" not in bodies[0]


def test_the_body_reaching_the_twin_is_the_one_sent_and_the_request_id_is_forwarded():
    raw = b'{"model":  "Llama-3-8B", "prompt": "a  b", "max_tokens": 2, "unknown_field": [1, {"x": null}]}'

    async def go():
        async with served_cluster(1) as cluster, aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/json", "X-Request-Id": "req-42", "Connection": "keep-alive"}
            async with session.post(cluster.url + "/v1/completions", data=raw, headers=headers) as response:
                echoed = response.headers["X-Request-Id"], response.status
            async with session.post(cluster.url + "/v1/completions", json=SHORT) as response:
                generated = response.headers["X-Request-Id"]
            return echoed, generated, cluster.twins[0].twin.last_request

    (request_id, status), generated, last = run(go())
    assert status == 200 and request_id == "req-42"
    assert generated and generated != "req-42"
    assert {k.lower(): v for k, v in last["headers"].items()}["x-request-id"] == generated


def test_the_body_bytes_are_unchanged():
    raw = b'{"model":  "Llama-3-8B", "prompt": "a  b", "max_tokens": 2, "unknown_field": [1, {"x": null}]}'

    async def go():
        async with served_cluster(1) as cluster, aiohttp.ClientSession() as session:
            async with session.post(cluster.url + "/v1/completions", data=raw) as response:
                assert response.status == 200
            return cluster.twins[0].twin.last_request["body"]

    assert run(go()).encode() == raw


def test_round_robin_spreads_evenly():
    async def go():
        async with served_cluster(3, "vllm_rr") as cluster, aiohttp.ClientSession() as session:
            tags = [(await _post(session, cluster.url, SHORT))[1] for _ in range(9)]
            await _accounted(cluster, session)
            return tags

    assert Counter(run(go())) == {"t0": 3, "t1": 3, "t2": 3}


def test_least_outstanding_avoids_a_busy_twin():
    async def go():
        async with served_cluster(2, "vllm_lor") as cluster, aiohttp.ClientSession() as session:
            long = dict(SHORT, max_tokens=2000, stream=True)
            busy = await session.post(cluster.url + "/v1/completions", json=long)
            await busy.content.readline()  # its first token: it is running on its twin
            tags = [(await _post(session, cluster.url, SHORT))[1] for _ in range(4)]
            busy_tag = busy.headers[TWIN_HEADER]
            busy.close()
            return busy_tag, tags

    busy_tag, tags = run(go())
    assert busy_tag == "t0"
    assert tags == ["t1"] * 4


def test_a_twin_failing_its_first_requests_fails_over_without_client_errors():
    async def go():
        async with served_cluster(2, "vllm_rr", faults={0: {"fail_first": 2}}) as cluster, aiohttp.ClientSession() as s:
            results = [await _post(s, cluster.url, SHORT) for _ in range(4)]
            counters = await _accounted(cluster, s)
            return results, counters

    results, counters = run(go())
    assert [status for status, _, _ in results] == [200] * 4
    assert counters["failovers"] >= 1


def test_a_twin_answering_429_fails_over_and_alone_its_answer_is_relayed():
    async def go():
        limited = {0: {"fail_rate": 1.0, "fail_status": 429}}
        async with served_cluster(2, "vllm_rr", faults=limited) as cluster, aiohttp.ClientSession() as s:
            pair = [await _post(s, cluster.url, SHORT) for _ in range(2)]
        async with served_cluster(1, "vllm_rr", faults=limited) as cluster, aiohttp.ClientSession() as s:
            alone = await _post(s, cluster.url, SHORT)
            await _accounted(cluster, s)
        return pair, alone

    pair, (status, tag, body) = run(go())
    assert [(s, t) for s, t, _ in pair] == [(200, "t1"), (200, "t1")]
    assert status == 429 and tag == "t0" and "injected failure" in json.loads(body)["error"]["message"]


def test_a_twin_killed_mid_stream_ends_its_stream_with_an_error_frame_others_unaffected():
    async def go():
        async with served_cluster(2, "vllm_lor") as cluster, aiohttp.ClientSession() as session:
            body = dict(SHORT, max_tokens=300, stream=True)
            first = await session.post(cluster.url + "/v1/completions", json=body)
            second = await session.post(cluster.url + "/v1/completions", json=body)
            await asyncio.gather(first.content.readline(), second.content.readline())
            victim = next(t for t in cluster.twins if t.twin.tag == first.headers[TWIN_HEADER])
            async with session.post(victim.url + "/admin/die"):
                pass
            killed, survived = await asyncio.gather(read_events(first), read_events(second))
            counters = await _accounted(cluster, session)
            up = list(cluster.router.up)
            return first.headers[TWIN_HEADER], second.headers[TWIN_HEADER], killed, survived, counters, up

    tag_a, tag_b, killed, survived, counters, up = run(go())
    assert tag_a != tag_b
    assert killed[-1] == "[DONE]" and "error" in killed[-2] and "mid-stream" in killed[-2]["error"]["message"]
    assert len(killed) < 300
    assert survived[-1] == "[DONE]" and len(survived) == 299 + 1  # the first event was read before
    assert counters["errors"]["upstream_midstream"] == 1
    assert up.count(False) == 1  # the dead twin is down (its /health answers 503)


def test_all_backends_down_is_a_503_naming_why_and_a_twin_that_returns_rejoins():
    async def go():
        async with served_cluster(2, "vllm_rr") as cluster, aiohttp.ClientSession() as session:
            for twin in cluster.twins:
                twin.twin.die()
            status, _, body = await _post(session, cluster.url, SHORT)
            async with session.get(cluster.url + "/health") as response:
                health = response.status
            again = await _post(session, cluster.url, SHORT)
            for twin in cluster.twins:
                twin.twin.dead = False
            deadline = time.monotonic() + 5
            while not all(cluster.router.up) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the router's re-probe is on its own cadence: poll its state
            back = [(await _post(session, cluster.url, SHORT))[:2] for _ in range(2)]
            await _accounted(cluster, session)
            return status, body, health, again, back

    status, body, health, again, back = run(go())
    message = json.loads(body)["error"]["message"]
    assert status == 503 and "backend 0 answered 503" in message and "the engine is dead" in message
    assert health == 503
    assert again[0] == 503 and "is down" in json.loads(again[2])["error"]["message"]
    assert sorted(back) == [(200, "t0"), (200, "t1")]


def test_stopped_backends_refuse_connections_and_the_router_says_so():
    async def go():
        async with served_cluster(2, "vllm_rr") as cluster, aiohttp.ClientSession() as session:
            for twin in cluster.twins:
                await twin.stop()
            result = await _post(session, cluster.url, SHORT)
            await _accounted(cluster, session)
            return result

    status, _, body = run(go())
    assert status == 503
    message = json.loads(body)["error"]["message"]
    assert "ClientConnectorError" in message and "backend 0" in message and "backend 1" in message


@pytest.mark.parametrize(
    ("raw", "path", "status", "words"),
    [
        (b"{oops", "/v1/completions", 400, "not valid JSON"),
        (b'{"model": "Llama-3-8B"}', "/v1/completions", 400, "prompt is required"),
        (b'{"model": "Llama-3-8B"}', "/v1/chat/completions", 400, "messages is required"),
        (b'{"model": "gpt-9", "prompt": "x"}', "/v1/completions", 404, "does not exist"),
        (b"[1, 2]", "/v1/completions", 400, "JSON object"),
    ],
)
def test_malformed_requests_never_reach_a_twin(raw, path, status, words):
    async def go():
        async with served_cluster(1) as cluster, aiohttp.ClientSession() as session:
            async with session.post(cluster.url + path, data=raw) as response:
                answer = response.status, await response.json()
            counters = await _accounted(cluster, session)
            return answer, cluster.twins[0].twin.received, counters

    (got, error), received, counters = run(go())
    assert got == status and words in error["error"]["message"]
    assert received == 0
    assert counters["responses"] == 0 and sum(counters["errors"].values()) == 1


def test_a_client_that_leaves_mid_stream_frees_the_backend():
    async def go():
        async with served_cluster(1, "vllm_lor") as cluster:
            async with aiohttp.ClientSession() as session:
                response = await session.post(
                    cluster.url + "/v1/completions", json=dict(SHORT, max_tokens=3000, stream=True)
                )
                await response.content.readline()
                during = list(cluster.router.tap.outstanding)
                (stream,) = cluster.twins[0].twin.engine._streams.values()
            deadline = time.monotonic() + 5
            while cluster.router.tap.outstanding[0] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the router notices at its next write: poll its state
            engine = cluster.twins[0].twin.engine
            while engine.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the router closed the upstream request: the twin aborts it
            engine.advance()
            async with aiohttp.ClientSession() as session:
                counters = await _accounted(cluster, session)
            simulated = engine.engine
            freed = not simulated.running and simulated.free_blocks == simulated.total_blocks
            left = stream.request
            return during, list(cluster.router.tap.outstanding), counters, engine.in_flight, freed, left

    during, after, counters, in_flight, freed, left = run(go())
    assert during == [1] and after == [0]
    assert counters["errors"]["client_disconnect"] == 1
    # the simulated engine stopped generating the 3000 tokens nobody reads, and freed their KV
    assert in_flight == 0 and freed and left.aborted and left.generated < 1000


def test_a_router_config_with_the_wrong_number_of_backends_is_refused():
    with pytest.raises(RouterConfigError, match="2 backend URL"):
        router_config({"cluster": "h100x8", "backends": ["http://127.0.0.1:1", "http://127.0.0.1:2"]})


def test_the_view_holds_scraped_gauges_and_live_bookkeeping_and_prism_routes_on_it():
    async def go():
        async with served_cluster(2, "vllm_prism") as cluster, aiohttp.ClientSession() as session:
            body = dict(SHORT, prompt=list(range(500)), max_tokens=2000, stream=True)
            busy = await session.post(cluster.url + "/v1/completions", json=body)
            await busy.content.readline()
            await cluster.router.scraper.scrape_once()
            index = int(busy.headers[TWIN_HEADER][1:])
            snap = cluster.router.view([0, 1]).snapshots[index]
            routed = await _post(session, cluster.url, SHORT)
            busy.close()
            return snap, routed

    snap, (status, _, _) = run(go())
    assert snap.num_requests_running == 1 and snap.kv_cache_usage_perc > 0  # scraped
    assert snap.num_decodes == 1 and snap.pending_prefill_tokens == 0 and snap.decode_kv_tokens >= 501  # tapped
    assert snap.predicted_step_ms > 0
    assert status == 200
