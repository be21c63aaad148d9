"""The twin serves vLLM's OpenAI wire semantics, with the timing of one simulated engine."""

from __future__ import annotations

import time

import aiohttp
import numpy as np
import pytest
import simpy
from servegym.envs.sim.engine import Engine
from servegym.envs.sim.policies import VllmPolicy
from servegym.envs.sim.request import Request
from servegym.serving.tokens import make_prompt
from servegym.serving.twin import TWIN_HEADER, TwinConfig, start_twin
from serving_helpers import FAST, MODEL, read_events, run, samples


async def _post(session, url, path, body):
    async with session.post(url + path, json=body) as response:
        return response.status, dict(response.headers), await response.json()


def test_completion_stream_has_exactly_max_tokens_chunks_then_usage_then_done():
    async def go():
        async with start_twin(time_scale=FAST, name="twin-a") as twin, aiohttp.ClientSession() as session:
            body = {"model": MODEL, "prompt": make_prompt(50), "max_tokens": 12, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            async with session.post(twin.url + "/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers[TWIN_HEADER] == "twin-a"
                assert response.headers["Content-Type"].startswith("text/event-stream")
                events = await read_events(response)
        assert events[-1] == "[DONE]"
        usage = events[-2]
        assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 50, "completion_tokens": 12,
                                                              "total_tokens": 62}  # fmt: skip
        tokens = events[:-2]
        assert len(tokens) == 12
        assert all(e["object"] == "text_completion" and "usage" not in e for e in tokens)
        assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * 11 + ["length"]

    run(go())


def test_chat_stream_starts_with_the_role_and_has_no_usage_unless_asked():
    async def go():
        async with start_twin(time_scale=FAST) as twin, aiohttp.ClientSession() as session:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": True,
                    "max_completion_tokens": 5, "ignore_eos": True}  # fmt: skip
            async with session.post(twin.url + "/v1/chat/completions", json=body) as response:
                events = await read_events(response)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-1] == "[DONE]"
        content = events[1:-1]
        assert len(content) == 5 and all(e["object"] == "chat.completion.chunk" for e in content)
        assert all("usage" not in e for e in events[:-1])

    run(go())


def test_whole_responses_report_usage_and_text_of_that_many_tokens():
    async def go():
        async with start_twin(time_scale=FAST) as twin, aiohttp.ClientSession() as session:
            _, _, completion = await _post(session, twin.url, "/v1/completions",
                                           {"model": MODEL, "prompt": list(range(30)), "max_tokens": 7,
                                            "ignore_eos": True})  # fmt: skip
            _, _, chat = await _post(session, twin.url, "/v1/chat/completions",
                                     {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}],
                                      "max_tokens": 4, "min_tokens": 4})  # fmt: skip
        assert completion["usage"] == {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
        assert len(completion["choices"][0]["text"].split()) == 7
        assert completion["choices"][0]["finish_reason"] == "length"
        assert chat["object"] == "chat.completion" and chat["usage"]["prompt_tokens"] == 3
        assert len(chat["choices"][0]["message"]["content"].split()) == 4

    run(go())


def test_outputs_end_early_with_stop_unless_eos_is_ignored():
    async def go():
        async with start_twin(time_scale=FAST, eos_mean_tokens=4) as twin, aiohttp.ClientSession() as session:
            bodies = [{"model": MODEL, "prompt": "x y", "max_tokens": 64} for _ in range(6)]
            results = [await _post(session, twin.url, "/v1/completions", b) for b in bodies]
        reasons = {r[2]["choices"][0]["finish_reason"] for r in results}
        assert "stop" in reasons
        assert all(r[2]["usage"]["completion_tokens"] <= 64 for r in results)

    run(go())


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b'{"model": "Llama-3-8B"}', 400, "prompt is required"),
        ("/v1/chat/completions", b'{"model": "Llama-3-8B", "prompt": "x"}', 400, "messages is required"),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "The model `nope` does not exist."),
        ("/v1/completions", b'{"model": "Llama-3-8B", "prompt": "x", "stream_options": {}}', 400, "stream_options"),
        ("/v1/completions", b'{"model": "Llama-3-8B", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_error_bodies(path, body, status, words):
    async def go():
        async with (
            start_twin(time_scale=FAST) as twin,
            aiohttp.ClientSession() as session,
            session.post(twin.url + path, data=body) as response,
        ):
            return response.status, await response.json()

    got, error = run(go())
    assert got == status
    assert words in error["error"]["message"] and error["error"]["code"] == status


def test_a_prompt_beyond_the_context_is_refused_with_vllms_message():
    async def go():
        async with start_twin(time_scale=FAST, max_model_len=64) as twin, aiohttp.ClientSession() as session:
            return await _post(session, twin.url, "/v1/completions", {"model": MODEL, "prompt": make_prompt(100)})

    status, _, error = run(go())
    assert status == 400
    assert error["error"]["message"].startswith(
        "This model's maximum context length is 64 tokens. However, your prompt contains 100 input tokens"
    )


def test_models_health_and_dying():
    async def go():
        async with start_twin(time_scale=FAST, served_model_name="m") as twin, aiohttp.ClientSession() as session:
            async with session.get(twin.url + "/v1/models") as response:
                models = await response.json()
            async with session.get(twin.url + "/health") as response:
                healthy = response.status
            await session.post(twin.url + "/admin/die")
            async with session.get(twin.url + "/health") as response:
                dead = response.status
            status, _, _ = await _post(session, twin.url, "/v1/completions", {"model": "m", "prompt": "x"})
            await session.post(twin.url + "/admin/revive")
            revived, _, _ = await _post(session, twin.url, "/v1/completions", {"model": "m", "prompt": "x"})
        return models, healthy, dead, status, revived

    models, healthy, dead, status, revived = run(go())
    assert models["data"][0]["id"] == "m"
    assert (healthy, dead, status, revived) == (200, 503, 503, 200)


def test_fault_menu_fail_first_and_fail_rate():
    async def go():
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        async with start_twin(time_scale=FAST, fail_first=2) as twin, aiohttp.ClientSession() as session:
            first = [(await _post(session, twin.url, "/v1/completions", body))[0] for _ in range(3)]
        async with start_twin(time_scale=FAST, fail_rate=1.0, fail_status=429) as twin, aiohttp.ClientSession() as s:
            limited = (await _post(s, twin.url, "/v1/completions", body))[0]
        return first, limited

    first, limited = run(go())
    assert first == [500, 500, 200]
    assert limited == 429


def test_metrics_carry_vllm_names_and_labels():
    async def go(names):
        async with (
            start_twin(time_scale=FAST, engine_index=3, metric_names=names) as twin,
            aiohttp.ClientSession() as s,
        ):
            await _post(
                s, twin.url, "/v1/completions", {"model": MODEL, "prompt": "a b", "max_tokens": 3, "ignore_eos": True}
            )
            async with s.get(twin.url + "/metrics") as response:
                return samples(await response.text())

    page = run(go("current"))
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert page[name][0][0] == {"model_name": MODEL, "engine": "3"}
    info = page["vllm:cache_config_info"][0][0]
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) > 0
    assert page["vllm:generation_tokens_total"][0][1] == 3
    assert page["vllm:prompt_tokens_total"][0][1] == 2
    assert page["vllm:request_success_total"][0][0]["finished_reason"] == "length"
    assert page["vllm:inter_token_latency_seconds_count"][0][1] == 2
    assert "vllm:gpu_cache_usage_perc" not in page
    deprecated = run(go("deprecated"))
    assert "vllm:gpu_cache_usage_perc" in deprecated and "vllm:kv_cache_usage_perc" not in deprecated


def _simulated_alone(config: TwinConfig, prompt: int, output: int) -> tuple[float, float]:
    """TTFT and E2E (simulated s) of one request on an idle simulator engine (decode jumps on)."""
    env = simpy.Environment()
    engine = Engine(env, 0, config.engine_config(), VllmPolicy(), np.random.default_rng(0))
    request = Request(0, 0.0, prompt, output)
    engine.submit(request)
    env.run()
    ttft, _, e2e = request.latencies()
    return ttft, e2e


def test_token_timing_follows_the_simulated_engine():
    config = TwinConfig(time_scale=1.0)
    prompt, output = 2000, 24
    ttft_sim, e2e_sim = _simulated_alone(config, prompt, output)

    async def go():
        async with start_twin(config) as twin, aiohttp.ClientSession() as session:
            body = {
                "model": MODEL,
                "prompt": list(range(prompt)),
                "max_tokens": output,
                "stream": True,
                "ignore_eos": True,
            }
            start = time.monotonic()
            arrivals = []
            async with session.post(twin.url + "/v1/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        arrivals.append(time.monotonic() - start)
            async with session.get(twin.url + "/metrics") as response:
                page = samples(await response.text())
        return arrivals, page

    arrivals, page = run(go())
    assert len(arrivals) == output
    # the engine's own record is the simulator's, exactly
    assert page["vllm:time_to_first_token_seconds_sum"][0][1] == pytest.approx(ttft_sim, rel=1e-9)
    assert page["vllm:e2e_request_latency_seconds_sum"][0][1] == pytest.approx(e2e_sim, rel=1e-9)
    # and the client sees it on the wall clock (loopback and scheduling add a few ms)
    assert arrivals[0] == pytest.approx(ttft_sim, abs=0.015)
    assert arrivals[-1] == pytest.approx(e2e_sim, abs=0.015)


def test_preempted_requests_still_stream_every_token():
    async def go():
        # 40 KV blocks of 16 tokens: four 100-token prompts growing to 300 tokens cannot all stay resident
        async with start_twin(time_scale=FAST, num_gpu_blocks=40) as twin, aiohttp.ClientSession() as session:
            import asyncio

            body = {"model": MODEL, "prompt": make_prompt(100), "max_tokens": 200, "stream": True, "ignore_eos": True}

            async def one():
                async with session.post(twin.url + "/v1/completions", json=body) as response:
                    return await read_events(response)

            results = await asyncio.gather(*(one() for _ in range(4)))
            return results, twin.twin.engine.engine.preemptions

    results, preemptions = run(go())
    assert preemptions > 0
    assert [len(events) - 1 for events in results] == [200] * 4
