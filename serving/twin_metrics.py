"""The twin's Prometheus exposition: vLLM V1's metric names and labels, in its own registry.

Gauges are read from the simulated engine when ``/metrics`` is scraped; counters and histograms are fed
as requests finish, in simulated seconds. ``names`` chooses vLLM's current KV-usage name, the deprecated
one (``vllm:gpu_cache_usage_perc``, still met in the field), or both.
"""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from servegym.envs.sim.engine import Engine

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
METRIC_NAMES = ("current", "deprecated", "both")
disable_created_metrics()  # vLLM's pages carry no *_created series; neither do ours


class TwinMetrics:
    """vLLM's engine metrics for one twin (labels ``model_name`` and ``engine``)."""

    def __init__(self, model_name: str, engine_index: int, names: str = "current") -> None:
        if names not in METRIC_NAMES:
            raise ValueError(f"metric names must be one of {METRIC_NAMES}, got {names!r}")
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": str(engine_index)}
        keys = list(self.labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, keys, registry=self.registry).labels(**self.labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, keys, buckets=LATENCY_BUCKETS, registry=self.registry).labels(**self.labels)

        self.running = gauge("vllm:num_requests_running", "Requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be processed.")
        self.kv_usage = [
            gauge(name, "KV-cache usage, a fraction in [0, 1].")
            for name, wanted in (
                ("vllm:kv_cache_usage_perc", names in ("current", "both")),
                ("vllm:gpu_cache_usage_perc", names in ("deprecated", "both")),
            )
            if wanted
        ]
        self.cache_info = Gauge(
            "vllm:cache_config_info", "Cache configuration.", ["engine", "block_size", "num_gpu_blocks"],
            registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", keys, registry=self.registry)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", keys, registry=self.registry
        )
        self.success = Counter(
            "vllm:request_success",
            "Successfully finished requests.",
            [*keys, "finished_reason"],
            registry=self.registry,
        )
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token (simulated s).")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency (simulated s).")
        self.tpot = (
            histogram("vllm:time_per_output_token_seconds", "Deprecated name of the inter-token latency.")
            if names != "current"
            else None
        )
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency (simulated s).")
        self.queue = histogram("vllm:request_queue_time_seconds", "Time waiting before first scheduled (simulated s).")

    def finished(self, prompt_tokens: int, token_times_s: list[float], arrival_s: float, queue_s: float, reason: str):
        """Account one finished request: its tokens, latencies and finish reason."""
        self.prompt_tokens.labels(**self.labels).inc(prompt_tokens)
        self.generation_tokens.labels(**self.labels).inc(len(token_times_s))
        self.success.labels(**self.labels, finished_reason=reason).inc()
        if token_times_s:
            self.ttft.observe(token_times_s[0] - arrival_s)
            self.e2e.observe(token_times_s[-1] - arrival_s)
        self.queue.observe(max(queue_s, 0.0))
        for earlier, later in itertools.pairwise(token_times_s):
            self.itl.observe(later - earlier)
            if self.tpot is not None:
                self.tpot.observe(later - earlier)

    def render(self, engine: Engine) -> bytes:
        """The exposition text with the gauges read from ``engine`` now."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        usage = engine.used_blocks_at(engine.env.now) / engine.total_blocks
        for gauge in self.kv_usage:
            gauge.set(usage)
        self.cache_info.labels(
            engine=self.labels["engine"], block_size=str(engine.block_size), num_gpu_blocks=str(engine.total_blocks)
        ).set(1)
        return generate_latest(self.registry)
