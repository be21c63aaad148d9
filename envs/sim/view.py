"""What a router can see: engine metrics as vLLM exports them (possibly stale), and its own bookkeeping.

Snapshots carry vLLM's Prometheus names (``vllm:num_requests_running`` → ``num_requests_running`` ...).
With a refresh interval Δ > 0 a policy deciding at time t sees the gauges scraped at ⌊t/Δ⌋·Δ, as a
router scraping every Δ does; Δ = 0 gives the live state. What the router knows from its own traffic
(requests and prompt tokens sent and not finished, pending prefill, decodes and their KV, the relayed
inter-token time: :mod:`servegym.envs.sim.router_tap`) is always current, in the simulator as in the router
service. A request's true output length is hidden unless the cluster runs in oracle mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from servegym.envs.sim.request import SloClass
from servegym.envs.sim.roles import TAKES_DECODE, TAKES_NEW, Role
from servegym.perfmodel.batch import StepBatch


@dataclass(slots=True)  # not frozen: construction is 8x cheaper, and it is on every step and decision
class EngineSnapshot:
    """One engine's scraped metrics at ``time_s``."""

    time_s: float
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float  # fraction in [0, 1], as vLLM exports it
    num_gpu_blocks: int
    block_size: int
    # What the router knows from its own traffic (envs.sim.router_tap), live at the decision:
    pending_prefill_tokens: int = 0  # prompt tokens of its requests still waiting for their first token
    num_decodes: int = 0  # its requests past their first token, not finished
    decode_kv_tokens: int = 0  # their KV tokens: prompt + tokens streamed so far
    next_step_tokens: int = 0  # decodes + a budget chunk of pending prefill (the scheduling mode)
    recent_step_ms: float = 0.0  # EWMA of the inter-token gaps it relayed
    predicted_step_ms: float = 0.0  # performance model: latency of that next step
    role: Role = Role.BOTH

    def running_decodes(self) -> StepBatch | None:
        """The engine's decode batch as the pushed counts describe it (None when nothing decodes)."""
        if not self.num_decodes:
            return None
        return StepBatch.decode(self.num_decodes, max(0, self.decode_kv_tokens - self.num_decodes))


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Static facts of an engine a router is configured with."""

    index: int
    gpu: str
    model: str
    tp: int
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_capacity_tokens: int
    dtype: str = "bf16"
    profile: str = "default"  # the performance-model profile its predictions use (the engine's own)
    cuda_graphs: bool = True  # its decode-only steps replay CUDA graphs (one host launch per step)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a router knows of an arriving request; ``output_tokens`` is None unless in oracle mode."""

    id: int
    arrival_s: float
    prompt_tokens: int
    slo: SloClass
    session_id: int = -1
    output_tokens: int | None = None
    hash_ids: tuple[int, ...] = ()  # prefix-segment hashes of the prompt (what a cache-aware router matches)


class ClusterView:
    """Everything a routing policy may read at a decision.

    Snapshots are taken on first access, so policies that never read engine metrics (round-robin,
    least-outstanding) cost nothing for them.
    """

    __slots__ = (
        "_snapshot_source",
        "_snapshots",
        "engines",
        "now_s",
        "outstanding_prompt_tokens",
        "outstanding_requests",
        "roles",
    )

    def __init__(
        self,
        now_s: float,
        engines: list[EngineInfo],
        snapshots: list[EngineSnapshot] | Callable[[], list[EngineSnapshot]],
        outstanding_requests: list[int],
        outstanding_prompt_tokens: list[int],
        roles: list[Role] | None = None,
    ) -> None:
        self.now_s, self.engines = now_s, engines
        self.roles = roles if roles is not None else [Role.BOTH] * len(engines)
        self.outstanding_requests, self.outstanding_prompt_tokens = outstanding_requests, outstanding_prompt_tokens
        self._snapshots = None if callable(snapshots) else snapshots
        self._snapshot_source = snapshots

    @property
    def snapshots(self) -> list[EngineSnapshot]:
        if self._snapshots is None:
            self._snapshots = self._snapshot_source()
        return self._snapshots

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    @property
    def prefill_candidates(self) -> list[int]:
        """Engines that take new requests now (role prefill or both; not draining)."""
        return [i for i, role in enumerate(self.roles) if role in TAKES_NEW]

    @property
    def decode_candidates(self) -> list[int]:
        """Engines that take decodes handed over from prefill instances (role decode or both)."""
        return [i for i, role in enumerate(self.roles) if role in TAKES_DECODE]


class LocalCorrection:
    """What this router sent to each engine since the scraped gauges it is looking at.

    A router scraping every Δ sees running/waiting/KV gauges up to Δ old; adding what it routed since
    keeps it from herding onto the engine that looked emptiest. (The tapped fields — pending prefill,
    decodes — are live and need no correction.)
    """

    def __init__(self) -> None:
        self._since: dict[int, tuple[float, int, int]] = {}  # engine -> (snapshot time, requests, prompt tokens)

    def _entry(self, view: ClusterView, engine: int) -> tuple[float, int, int]:
        stamp = view.snapshots[engine].time_s
        entry = self._since.get(engine)
        if entry is None or entry[0] != stamp:
            entry = (stamp, 0, 0)
            self._since[engine] = entry
        return entry

    def requests(self, view: ClusterView, engine: int) -> int:
        return self._entry(view, engine)[1]

    def tokens(self, view: ClusterView, engine: int) -> int:
        return self._entry(view, engine)[2]

    def record(self, view: ClusterView, engine: int, request: RequestInfo) -> None:
        stamp, count, tokens = self._entry(view, engine)
        self._since[engine] = (stamp, count + 1, tokens + request.prompt_tokens)
