"""Benchmarks of the router service (printed figures, not tests).

    python -m servegym.serving.bench                      # router overhead, then decision latency per policy kind
    python -m servegym.serving.bench --soak-s 600 --rate 50   # a steady-rate soak through the router

- **Overhead**: a twin (its simulated time 1000x the wall clock, so generation costs next to nothing) and
  a router in front of it, each in its own process; the client, in a third, streams small completions
  directly to the twin and through the router: latency p50/p99 at concurrency 1, throughput at 32.
- **Decision latency**: the router's decision (the ``ClusterView`` built as the router builds it from
  scraped gauges and bookkeeping, plus the policy's ``route``), no HTTP, for 8 and 64 backends and a
  heuristic (LOR), a predictive heuristic (PRISM) and an ONNX export (an untrained one of the contract's
  shape, written here with the project's exporter unless ``--export8/--export64`` name real ones).
- **Soak**: steady open-loop rate through the router for ``--soak-s`` seconds; requests sent = responses
  + errors on the client and in the router's counters; the router's RSS at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from servegym.envs.features import FeatureSpec
from servegym.envs.sim.request import SloClass
from servegym.envs.sim.view import RequestInfo
from servegym.serving.router import Router
from servegym.serving.router_config import load_routing_policy, router_config
from servegym.serving.scrape import EngineMetrics

MODEL = "Llama-3-8B"
FAST_TWIN = 0.001  # wall seconds per simulated second: the twin answers almost at once
BODY = {"model": MODEL, "prompt": "one two three four", "max_tokens": 8, "ignore_eos": True, "stream": True}


def tiny_export(slots: int, out: str | Path) -> Path:
    """An untrained routing policy of the contract's shape for ``slots`` engines, saved as a training run
    (``agents.run_dir.save_run``) and exported (``agents.exported.export_run``): what decision latency and
    tests need without training. Returns the export directory (the run is its parent)."""
    import gymnasium as gym
    from gymnasium import spaces
    from servegym.agents import run_dir
    from servegym.agents.exported import export_run
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    spec = FeatureSpec(slots)

    class ContractShaped(gym.Env):
        """Only the spaces of the routing contract: enough for stable-baselines3 to build a policy."""

        observation_space = spaces.Box(spec.low, spec.high, dtype=np.float32)
        action_space = spaces.Discrete(slots)

        def reset(self, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, True, False, {}

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    vec = VecNormalize(DummyVecEnv([ContractShaped]))
    model = PPO("MlpPolicy", vec, n_steps=64, device="cpu", policy_kwargs={"net_arch": [64, 64]}, seed=0)
    run_dir.save_run(run, model, vec, "servegym/Route-v0", "PPO", slots)
    return export_run(run, run / "export")


# -- servers in their own processes -------------------------------------------------------------------------
def _serve(kind: str, argument: Any, ready: Any, stop: Any) -> None:
    """Child process: a twin (``argument``: its time scale) or a router (``argument``: the twin's URL)."""
    from servegym.serving.router import start_router
    from servegym.serving.twin import start_twin

    async def main() -> None:
        if kind == "twin":
            server = start_twin(time_scale=argument)
        else:
            config = router_config(
                {"cluster": {"groups": [{"count": 1, "engine": {"gpu": "H100-SXM", "model": MODEL}}]},
                 "backends": [argument], "time_scale": FAST_TWIN, "scrape_interval_s": 0.1}
            )  # fmt: skip
            server = start_router(config, "vllm_lor")
        async with server as running:
            ready.put(running.url)
            while not stop.is_set():
                await asyncio.sleep(0.1)

    asyncio.run(main())


@contextlib.contextmanager
def served(kind: str, argument: Any):
    """A twin or router in a child process; yields (url, pid)."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve, args=(kind, argument, ready, stop), daemon=True)
    process.start()
    try:
        yield ready.get(timeout=60), process.pid
    finally:
        stop.set()
        process.join(10)
        if process.is_alive():
            process.terminate()


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- client side -----------------------------------------------------------------------------------------------
async def _stream(session: aiohttp.ClientSession, url: str) -> tuple[bool, float]:
    started = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=BODY) as response:
            await response.read()
            return response.status == 200, time.perf_counter() - started
    except (aiohttp.ClientError, TimeoutError):
        return False, time.perf_counter() - started


async def latency(url: str, count: int) -> np.ndarray:
    """Wall seconds of ``count`` streamed requests one after another (after a warm-up)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            await _stream(session, url)
        return np.array([(await _stream(session, url))[1] for _ in range(count)])


async def throughput(url: str, concurrency: int, duration_s: float) -> tuple[float, int]:
    """Streamed requests per second completed by ``concurrency`` closed-loop clients, and the failures."""
    done = failed = 0
    deadline = time.perf_counter() + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            ok, _ = await _stream(session, url)
            done, failed = done + ok, failed + (not ok)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return done / (time.perf_counter() - started), failed


def overhead(count: int, duration_s: float) -> None:
    with served("twin", FAST_TWIN) as (twin, _), served("router", twin) as (router, _):
        rows = {}
        for name, url in (("direct", twin), ("router", router)):
            ms = asyncio.run(latency(url, count)) * 1e3
            rps, failed = asyncio.run(throughput(url, 32, duration_s))
            rows[name] = (np.percentile(ms, 50), np.percentile(ms, 99), rps, failed)
    print(f"router overhead: streamed completions of 8 tokens, {count} at c=1, {duration_s:g} s at c=32")
    print(f"  {'path':<8}{'c=1 p50 ms':>12}{'c=1 p99 ms':>12}{'c=32 req/s':>12}{'failed':>8}")
    for name, (p50, p99, rps, failed) in rows.items():
        print(f"  {name:<8}{p50:>12.2f}{p99:>12.2f}{rps:>12.0f}{failed:>8}")
    (d50, d99, drps, _), (r50, r99, rrps, _) = rows["direct"], rows["router"]
    print(f"  added by the router: p50 {r50 - d50:+.2f} ms, p99 {r99 - d99:+.2f} ms; c=32 {rrps / drps:.0%} of direct")


# -- decision latency ----------------------------------------------------------------------------------------
def decision_router(backends: int, policy: str) -> Router:
    """A router of ``backends`` H100 backends whose view is filled as after a scrape and some traffic (no
    server, no HTTP: the view and the policy call are what is timed)."""
    config = router_config(
        {"cluster": {"snapshot_interval_s": 0.1, "groups": [{"count": backends, "engine": {"gpu": "H100-SXM"}}]},
         "backends": [f"http://127.0.0.1:{9000 + i}" for i in range(backends)]}
    )  # fmt: skip
    router = Router(config, load_routing_policy(policy, backends))
    router.scraper = _StaticScraper(backends)
    rng = np.random.default_rng(0)
    for i in range(backends):
        prompts = rng.integers(50, 2000, size=int(rng.integers(0, 12)))
        for prompt in prompts:
            router.tap.sent(i, int(prompt))
        for prompt in prompts[: int(rng.integers(0, len(prompts) + 1))]:
            router.tap.first_token(i, int(prompt))
            for _ in range(int(rng.integers(1, 200))):
                router.tap.token(i, 0.012)
    return router


class _StaticScraper:
    """What the router reads of a scraper, frozen: gauges of a moderately loaded engine, 50 ms old."""

    def __init__(self, count: int) -> None:
        self.latest = [EngineMetrics(8 + i % 5, i % 3, 0.3 + 0.01 * (i % 7), 30000, 16) for i in range(count)]

    def age_s(self, index: int) -> float:
        return 0.05

    def stale(self, index: int) -> bool:
        return False


def decision_latency(policy: str, backends: int, count: int) -> np.ndarray:
    """Seconds per decision (view + policy) of ``count`` decisions."""
    router = decision_router(backends, policy)
    candidates = list(range(backends))
    timer: Callable[[], float] = time.perf_counter
    out = np.empty(count)
    for k in range(count + 200):
        info = RequestInfo(k, router.now_s(), 200 + (k * 37) % 3000, SloClass("chat", 2.0, 0.1))
        started = timer()
        router.decide(info, candidates, first=True)
        if k >= 200:  # warm-up: caches of the performance model, onnxruntime's first runs
            out[k - 200] = timer() - started
    return out


def decisions(count: int, exports: dict[int, str | None]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        paths = {n: exports.get(n) or str(tiny_export(n, Path(scratch) / f"tiny{n}")) for n in (8, 64)}
        print(f"decision latency (view built as the router builds it + policy.route), {count} decisions")
        print(f"  {'policy':<16}{'backends':>9}{'p50 us':>10}{'p99 us':>10}")
        for label, policy in (("LOR", "vllm_lor"), ("PRISM", "vllm_prism"), ("ONNX (MLP 64x64)", None)):
            for backends in (8, 64):
                seconds = decision_latency(policy or paths[backends], backends, count) * 1e6
                print(
                    f"  {label:<16}{backends:>9}{np.percentile(seconds, 50):>10.1f}{np.percentile(seconds, 99):>10.1f}"
                )


# -- soak ------------------------------------------------------------------------------------------------------
async def _soak_client(url: str, rate: float, duration_s: float) -> dict[str, int]:
    counts = {"sent": 0, "responses": 0, "errors": 0}
    tasks: set[asyncio.Task] = set()

    async def one(session: aiohttp.ClientSession) -> None:
        ok, _ = await _stream(session, url)
        counts["responses" if ok else "errors"] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < duration_s:
            counts["sent"] += 1
            task = asyncio.ensure_future(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, counts["sent"] / rate - elapsed))
        await asyncio.gather(*tasks)
    return counts


async def _router_counters(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    out = {"received": 0.0, "responses": 0.0, "errors": 0.0}
    names = {"servegym_router_requests_received_total": "received", "servegym_router_responses_total": "responses",
             "servegym_router_errors_total": "errors"}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                out[names[sample.name]] += sample.value
    return out


def soak(duration_s: float, rate: float) -> None:
    with served("twin", 0.01) as (twin, _), served("router", twin) as (router, pid):
        asyncio.run(latency(router, 50))  # warm: connections, imports, caches
        start_rss = rss_mib(pid)
        started = time.perf_counter()
        client = asyncio.run(_soak_client(router, rate, duration_s))
        wall = time.perf_counter() - started
        end_rss = rss_mib(pid)
        counters = asyncio.run(_router_counters(router))
    warm = 20 + 50  # the warm-up requests of latency() the router also counted
    client_ok = client["sent"] == client["responses"] + client["errors"]
    router_ok = counters["received"] == counters["responses"] + counters["errors"]
    print(f"soak: {duration_s:g} s at {rate:g} req/s through the router (streamed, 8 tokens), {wall:.0f} s wall")
    print(
        f"  client: sent {client['sent']}, responses {client['responses']}, errors {client['errors']}: "
        + ("adds up" if client_ok else "DOES NOT add up")
    )
    print(
        f"  router: received {counters['received'] - warm:.0f} (after {warm} warm-up), "
        f"responses {counters['responses'] - warm:.0f}, errors {counters['errors']:.0f}: "
        + ("adds up" if router_ok else "DOES NOT add up")
    )
    print(f"  router RSS: {start_rss:.1f} MiB at start, {end_rss:.1f} MiB at end ({end_rss - start_rss:+.1f} MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m servegym.serving.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="c=1 requests per path")
    parser.add_argument("--duration-s", type=float, default=5.0, help="c=32 seconds per path")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--export8", help="an export with 8 slots (default: an untrained one written here)")
    parser.add_argument("--export64", help="an export with 64 slots")
    parser.add_argument("--soak-s", type=float, help="run the soak for this many seconds instead")
    parser.add_argument("--rate", type=float, default=50.0, help="soak rate, requests per second")
    args = parser.parse_args(argv)
    if args.soak_s is not None:
        if not (args.soak_s > 0 and args.rate > 0):
            raise SystemExit("error: --soak-s and --rate must be positive")
        soak(args.soak_s, args.rate)
        return
    overhead(args.requests, args.duration_s)
    decisions(args.decisions, {8: args.export8, 64: args.export64})


if __name__ == "__main__":
    main()
