"""One serving engine (a vLLM v1-like instance) as a simpy process.

Scheduling follows vLLM v1 with chunked prefill: each step has a token budget; running decodes take one
token each, running prefills continue with a chunk, then waiting requests are admitted FCFS while budget,
``max_num_seqs`` and KV blocks allow; a request that cannot get a KV block preempts the most recently
admitted running request (recompute: its KV is freed and it re-prefills prompt + generated tokens). No
waiting request is admitted in a step that preempted. Decodes are served before prefill chunks (vLLM
iterates its running list in admission order, where decodes are almost always older); the budget never
starves a running decode.

Speed: decodes are kept as aggregates — count, sum of contexts, a histogram of when each next needs a KV
block (every ``block_size`` tokens), and a heap of finishing steps — so a step costs O(1) plus O(prefill
chunks), and per-request work happens only at admission, completion and preemption. A stretch of
decode-only steps in which nothing else can happen (no arrival before it ends, no completion, no KV
shortage, no admissible waiting request) is advanced in one computed jump, using that step latency is
linear in the decodes' KV tokens at a fixed batch size; a request submitted during a jump cuts it at
the end of the step in progress, exactly where a step-by-step engine would first see it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import simpy
from servegym.envs.sim.errors import ClusterConfigError
from servegym.envs.sim.policies import BatchPolicy, EngineView, check_policy, overrides
from servegym.envs.sim.prefix_cache import PrefixCache
from servegym.envs.sim.request import Request, State
from servegym.envs.sim.roles import SERVING_ROLES, Role
from servegym.envs.sim.view import EngineInfo
from servegym.perfmodel.batch import StepBatch
from servegym.perfmodel.capacity import KvCapacity, kv_capacity
from servegym.perfmodel.catalog import get_gpu, get_model
from servegym.perfmodel.structural import StructuralModel, structural_model


class EngineHost(Protocol):
    """What an engine tells the cluster it belongs to."""

    def engine_finished(self, request: Request) -> None:
        """``request`` finished on this engine."""

    def engine_first_token(self, engine: Engine, request: Request) -> None:
        """``request``'s first token was sampled now (what a router relaying the stream sees)."""

    def engine_tokens(self, engine: Engine, decodes: int, gaps_s: np.ndarray | float) -> None:
        """Steps ended in which ``decodes`` requests each got another token, ``gaps_s`` (one per step) after
        their previous one."""

    def engine_handoff(self, engine: Engine, request: Request) -> simpy.Event | None:
        """A prefill instance computed ``request``'s prompt: move it to a decode instance. Returns a pending
        event when an agent makes the choice (the engine waits on it; no time passes)."""


@dataclass(frozen=True)
class EngineConfig:
    """One instance: hardware, model and the vLLM engine arguments that shape scheduling."""

    gpu: str = "H100-SXM"
    model: str = "Llama-3-8B"
    tp: int = 1
    dtype: str = "bf16"
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    noise_sigma: float = 0.0  # lognormal sigma of a multiplicative step-time noise (0: deterministic)
    role: Role = Role.BOTH  # both (colocated), prefill or decode (disaggregated pools)
    enable_prefix_caching: bool = False
    prefix_segment_tokens: int = 512  # tokens per prompt hash (Mooncake's hash_ids cover 512)
    profile: str = "default"  # performance-model profile: a shipped name, a JSON path, or a registered name
    # decode-only steps replay CUDA graphs (vLLM's default unless enforce_eager): one host launch per step
    cuda_graphs: bool = True
    num_gpu_blocks: int | None = None  # KV blocks as a real engine reported them; None: the model's memory budget
    # vLLM V1's asynchronous scheduling (on by default since late 2025, vllm#27614): the scheduler forms
    # step N+1's batch when step N starts, so a request arriving during step N joins step N+2 at the earliest.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.num_gpu_blocks is not None and (
            isinstance(self.num_gpu_blocks, bool) or not isinstance(self.num_gpu_blocks, int) or self.num_gpu_blocks < 1
        ):
            raise ClusterConfigError(f"num_gpu_blocks must be a positive integer or null, got {self.num_gpu_blocks!r}")
        if self.role not in SERVING_ROLES:
            raise ClusterConfigError(f"role must be one of {[str(r) for r in SERVING_ROLES]}, got {self.role!r}")
        object.__setattr__(self, "role", Role(self.role))

    def perf_model(self) -> StructuralModel:
        """The shared performance model of this engine's GPU, model, TP, dtype, profile and CUDA graphs."""
        return structural_model(
            self.gpu, self.model, tp=self.tp, dtype=self.dtype, profile=self.profile, cuda_graphs=self.cuda_graphs
        )

    def kv_capacity(self, perf: StructuralModel | None = None) -> KvCapacity:
        """KV blocks and tokens left for the cache by weights and activations (raises if the model does not fit)."""
        return kv_capacity(
            perf or self.perf_model(),
            self.gpu_memory_utilization,
            self.block_size,
            self.max_num_batched_tokens,
            self.max_num_seqs,
        )

    def num_blocks(self, perf: StructuralModel | None = None) -> int:
        """KV blocks the engine holds: a measured count if given, else what the memory budget leaves."""
        return self.num_gpu_blocks or self.kv_capacity(perf).num_blocks

    def engine_info(self, index: int) -> EngineInfo:
        """The static facts a router is configured with for engine ``index`` of this configuration (what the
        simulator's cluster gives its policies and the router service its backends)."""
        return EngineInfo(
            index,
            get_gpu(self.gpu).name,
            get_model(self.model).name,
            self.tp,
            self.max_num_batched_tokens,
            self.max_num_seqs,
            self.num_blocks() * self.block_size,
            self.dtype,
            self.profile,
            self.cuda_graphs,
        )


class Engine:
    """A simpy process that runs steps; requests enter through :meth:`submit`."""

    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        config: EngineConfig,
        policy: BatchPolicy,
        rng: np.random.Generator,
        host: EngineHost | None = None,
        perf: StructuralModel | None = None,
        step_listeners: list | None = None,
    ) -> None:
        self.env, self.index, self.config, self.policy, self.rng = env, index, config, policy, rng
        self.host = host  # None: a stand-alone engine (finished requests go nowhere, prefills stay here)
        self.set_role(config.role)
        # Observer.on_step of the subscribed observers (shared with the cluster, which appends to it)
        self._step_listeners = step_listeners if step_listeners is not None else []
        self.perf = perf or config.perf_model()
        self.total_blocks = config.num_blocks(self.perf)  # a measured count replaces the estimate
        self.free_blocks = self.total_blocks
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or self.perf.model.max_position_embeddings
        self.running: dict[int, Request] = {}  # admission order
        self.prefilling: dict[int, Request] = {}
        self.waiting: deque[Request] = deque()
        self.incoming: deque[Request] = deque()  # KV-ready requests handed over by a prefill instance
        self.transferring = 0  # requests handed over whose KV this engine still holds
        # decode aggregates
        self.n_dec = 0
        self.dec_ctx_sum = 0  # KV tokens of all decodes before the next step
        self.block_hist = [0] * self.block_size  # decodes needing a block at steps ≡ key (mod block_size)
        self.finish_heap: list[tuple[int, int, int, Request]] = []
        self.step_count = 0
        self._decode_blocks_for = -1  # step whose decode KV demand is already allocated
        # step latencies (s) in a ring indexed by step number: long enough for the longest decode span that
        # can still be asked about (a request's largest gap between tokens), so memory stays flat
        self._latency_ring = np.zeros(1024)
        # statistics
        self.busy_s = 0.0
        self.tokens_computed = 0
        self.preemptions = 0
        self.jumps = 0
        self.min_free_blocks = self.total_blocks  # KV never over capacity iff this stays >= 0
        self.cache = (
            PrefixCache(config.prefix_segment_tokens, config.block_size) if config.enable_prefix_caching else None
        )
        # during a decode jump: (start time, step latencies, first step, blocks used before)
        self._jump: tuple[float, np.ndarray, int, int] | None = None
        self._decode_base: dict[int, float] = {}  # decode step time (s) of n sequences at zero KV
        kv_probe = 1 << 16
        self._decode_per_kv = (
            (self.perf.predict(StepBatch.decode(1, kv_probe)) - self.perf.predict(StepBatch.decode(1, 0)))
            / kv_probe
            / 1e3
        )
        self._interrupt_pending = False
        self._inflight_step: int | None = None  # the regular step running now, if any
        self._wake = env.event()
        check_policy("batch policy", policy, BatchPolicy)
        self._chunk_cap = policy.max_chunk_tokens or (1 << 62)
        self._shortest_first = policy.prefill_order == "shortest_remaining"
        # optional hooks, called only when the policy overrides them (the defaults cost nothing here)
        self._admit_hook = policy.admit if overrides(policy, BatchPolicy, "admit") else None
        self._external_budget = policy.request_budget if overrides(policy, BatchPolicy, "request_budget") else None
        # queued prefill work (what the batch policies read)
        self.waiting_tokens = 0  # prefill tokens of waiting requests
        self.prefill_remaining = 0  # tokens running prefills still have to compute
        self._jump_told = 0  # steps of the decode jump in progress whose tokens the host was told of
        # a serving stack's per-request latency before scheduling (HTTP, tokenisation): a profile term, 0 by default
        self._frontend_s = self.perf.coefficients.request_overhead_ms / 1e3
        self.in_frontend = 0
        self.view = EngineView(self)  # what the batch policy reads
        policy.attach(self.view)
        self.process = env.process(self._run())

    def set_role(self, role: Role) -> None:
        """Serve as ``role`` from now on (a prefill instance hands its finished prefills over)."""
        self.role = Role(role)
        self.hands_off = self.role is Role.PREFILL

    # -- outside view ------------------------------------------------------------------------------------
    def submit(self, request: Request) -> bool:
        """Queue a request; False (and the request marked rejected) when it can never be served here."""
        needed = request.prompt_tokens + request.output_tokens - 1
        if needed > self.max_model_len:
            return self._reject(request, f"prompt+output {needed + 1} tokens exceed max_model_len {self.max_model_len}")
        if -(-needed // self.block_size) > self.total_blocks:
            return self._reject(
                request, f"needs {needed} KV tokens, engine holds {self.total_blocks * self.block_size}"
            )
        request.state, request.instance, request.prefill_instance = State.WAITING, self.index, self.index
        request.prefill_target = request.prompt_tokens
        if self._frontend_s > 0:  # the API server's work before the scheduler sees the request
            self.in_frontend += 1
            self.env.process(self._after_frontend(request))
            return True
        self._enqueue(request)
        return True

    def _enqueue(self, request: Request) -> None:
        request.ready_step = self._first_joinable_step() if self.config.async_scheduling else 0
        self.waiting.append(request)
        self.waiting_tokens += request.prefill_target
        self._notify()

    def _after_frontend(self, request: Request):
        yield self.env.timeout(self._frontend_s)
        self.in_frontend -= 1
        if request.aborted:  # its client left while the API server held it
            self._end_aborted(request)
            return
        self._enqueue(request)

    def abort(self, request: Request) -> None:
        """The client went away: stop serving ``request``, as vLLM's scheduler aborts it and frees its KV.

        A request that holds no place in a running batch (in the frontend, waiting, prefilling) ends now; a
        decode ends with the step in progress (its token is being computed) — a decode jump is cut there.
        Its ``generated`` count is what it produced; the host hears of it as of a finished request.
        """
        if request.instance != self.index or request.state in (State.FINISHED, State.REJECTED) or request.aborted:
            return
        request.aborted = True
        state = request.state
        if state is State.WAITING and request in self.waiting:
            self.waiting.remove(request)
            self.waiting_tokens -= request.prefill_target
            self._end_aborted(request)
        elif state is State.PREFILL:
            self.free_blocks += request.blocks
            request.blocks = 0
            self._release_shared(request)
            self.prefill_remaining -= request.prefill_target - request.computed
            del self.prefilling[request.id]
            del self.running[request.id]
            self._end_aborted(request)
        elif state is State.INCOMING:
            self.incoming.remove(request)
            self._end_aborted(request)
        elif state is State.DECODE:
            if self._jump is not None:
                ending = self._jump[2] + self._jump_steps_started(self.env.now) - 1
            else:
                ending = self._inflight_step if self._inflight_step is not None else self.step_count + 1
            request.heap_version += 1
            heapq.heappush(self.finish_heap, (ending, request.heap_version, request.id, request))
        # WAITING in the frontend ends when it leaves it; TRANSFER when its KV lands (the cluster checks)
        self._notify()  # the schedule changed: wake the engine, or cut a decode jump after the step in progress

    def _end_aborted(self, request: Request) -> None:
        request.state = State.FINISHED
        request.finished_s = self.env.now
        if self.host is not None:
            self.host.engine_finished(request)

    def submit_decode(self, request: Request) -> bool:
        """Accept a request whose prompt KV was computed elsewhere and has just arrived (PD handoff)."""
        if -(-request.max_kv_tokens // self.block_size) > self.total_blocks:
            return self._reject(
                request,
                f"decode needs {request.max_kv_tokens} KV tokens, engine {self.index} "
                f"holds {self.total_blocks * self.block_size}",
            )
        request.state, request.instance = State.INCOMING, self.index
        self.incoming.append(request)
        self._notify()
        return True

    def release_transferred(self, request: Request) -> None:
        """Free the KV of a request whose transfer to a decode instance completed."""
        self.free_blocks += request.blocks
        request.blocks = 0
        self._release_shared(request)
        self.transferring -= 1
        self._notify()

    def _notify(self) -> None:
        """Wake an idle engine, or cut a decode jump so the new work joins at the next step boundary."""
        if not self._wake.triggered:
            self._wake.succeed()
        elif self._jump is not None and not self._interrupt_pending:
            self._interrupt_pending = True
            self.process.interrupt("arrival")

    def _first_joinable_step(self) -> int:
        """With asynchronous scheduling, the first step a request queued now can join: the one after the
        next while a step runs (the next was scheduled when the running one started), else the next."""
        if self._jump is not None:
            running = self._jump[2] + self._jump_steps_started(self.env.now) - 1
            return running + 2
        if self._inflight_step is not None:
            return self._inflight_step + 2
        return 0

    @property
    def idle(self) -> bool:
        return not (self.running or self.waiting or self.incoming or self.transferring or self.in_frontend)

    def _reject(self, request: Request, reason: str) -> bool:
        request.state, request.instance, request.reject_reason = State.REJECTED, self.index, reason
        return False

    def used_blocks_at(self, t: float) -> int:
        """KV blocks in use at time ``t`` (``t`` within the current step or jump), as a scraper would read."""
        if self._jump is not None:
            _, _, first_step, used_before = self._jump  # reconstructed only when someone looks
            keys = (first_step + np.arange(self._jump_steps_started(t))) % self.block_size
            return used_before + int(np.asarray(self.block_hist)[keys].sum())
        return self.total_blocks - self.free_blocks

    def _jump_steps_started(self, t: float) -> int:
        """How many steps of the decode jump in progress have started by time ``t``."""
        start, latencies, _, _ = self._jump
        starts = np.concatenate([[0.0], np.cumsum(latencies[:-1])])
        return int(np.searchsorted(starts, t - start, side="right"))

    def decode_step_s(self, num_seqs: int, kv_tokens: int) -> float:
        """Noise-free time (s) of a decode-only step; linear in the KV tokens at a fixed batch size."""
        base = self._decode_base.get(num_seqs)
        if base is None:
            base = self.perf.predict(StepBatch.decode(num_seqs, 0)) / 1e3 - self._decode_per_kv * num_seqs
            self._decode_base[num_seqs] = base
        return base + self._decode_per_kv * (kv_tokens + num_seqs)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- the step loop -----------------------------------------------------------------------------------
    def _run(self):
        env = self.env
        while True:
            if not self.running and not self.waiting and not self.incoming:
                self._wake = env.event()
                yield self._wake
                continue
            jump = self._plan_jump()
            if jump is not None:
                latencies, blocks = jump
                first, start = self.step_count + 1, env.now
                self._jump = (start, latencies, first, self.total_blocks - self.free_blocks)
                self._jump_told = 0
                self._take(blocks)
                try:
                    yield env.timeout(float(latencies.sum()))
                except simpy.Interrupt:  # a request arrived: stop after the step in progress
                    latencies = yield from self._cut_jump(start, latencies, first, blocks)
                self._jump = None
                steps = len(latencies)
                if steps:
                    self._record(first, latencies)
                    self.tokens_computed += self.n_dec * steps
                    if self.host is not None and steps > self._jump_told:
                        self.host.engine_tokens(self, self.n_dec, latencies[self._jump_told :])
                    for observe in self._step_listeners:  # costs per step only when someone listens
                        for j in range(steps):
                            observe(
                                self.view,
                                StepBatch.decode(self.n_dec, self.dec_ctx_sum + j * self.n_dec),
                                float(latencies[j]),
                            )
                self.step_count += steps
                self.dec_ctx_sum += steps * self.n_dec
                self._complete_decodes()
                self.jumps += 1
                continue
            budget = None
            if self._external_budget is not None:  # an agent decides this step's budget (Batch-v0)
                budget = self._external_budget(self.view)
                if isinstance(budget, simpy.Event):
                    budget = yield budget
            plan = self._schedule(budget)
            if plan is None:
                if self.transferring:  # KV held by outgoing transfers: wait until one completes
                    self._wake = env.event()
                    yield self._wake
                    continue
                raise RuntimeError(f"engine {self.index}: waiting requests but nothing schedulable and nothing running")
            batch, chunks, n_dec = plan
            latency = self.perf.predict(batch) / 1e3
            if self.config.noise_sigma > 0:
                latency *= float(self._noise(1)[0])
            step = self.step_count + 1
            self._record_one(step, latency)
            self.tokens_computed += batch.num_tokens
            self._inflight_step = step
            yield env.timeout(latency)
            self._inflight_step = None
            for observe in self._step_listeners:
                observe(self.view, batch, latency)
            if n_dec and self.host is not None:
                self.host.engine_tokens(self, n_dec, latency)
            self.step_count = step
            self.dec_ctx_sum += n_dec
            self._complete_decodes()
            yield from self._advance_prefills(chunks)

    def tell_tokens(self, t: float) -> None:
        """Tell the host of the tokens the decode jump in progress produced by time ``t`` (steps ended),
        so a router's view mid-jump counts them as a router relaying the stream would."""
        if self._jump is None or self.host is None:
            return
        start, latencies, _, _ = self._jump
        ended = int(np.searchsorted(np.cumsum(latencies), t - start, side="right"))
        if ended > self._jump_told:
            self.host.engine_tokens(self, self.n_dec, latencies[self._jump_told : ended])
            self._jump_told = ended

    def _cut_jump(self, start: float, latencies: np.ndarray, first: int, blocks: int):
        """Keep the jump's steps that started before now; return the unstarted steps' KV blocks."""
        self._interrupt_pending = False
        self.tell_tokens(self.env.now)
        self._jump = None
        starts = np.concatenate([[0.0], np.cumsum(latencies[:-1])])
        steps = int(np.searchsorted(starts, self.env.now - start, side="left"))
        keys = (first + np.arange(steps)) % self.block_size
        self.free_blocks += blocks - int(np.asarray(self.block_hist)[keys].sum())
        latencies = latencies[:steps]
        end = start + float(latencies.sum())
        if end > self.env.now:
            yield self.env.timeout(end - self.env.now)
        return latencies

    def _take(self, blocks: int) -> None:
        """Allocate ``blocks`` (the caller checked they fit), evicting cached prefixes if plain free blocks lack."""
        if self.cache is not None:
            plain = self.free_blocks - self.cache.evictable_blocks
            if plain < blocks:
                self.cache.evict(blocks - plain)
        self.free_blocks -= blocks
        self.min_free_blocks = min(self.min_free_blocks, self.free_blocks)

    def _release_shared(self, request: Request) -> None:
        if request.shared:
            self.free_blocks += self.cache.release(request.shared)
            request.shared, request.shared_blocks = [], 0

    def _noise(self, count: int) -> np.ndarray:
        if self.config.noise_sigma <= 0:
            return np.ones(count)
        return np.exp(self.config.noise_sigma * self.rng.standard_normal(count))

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens queued or still prefilling here (what PRISM calls pending prefill tokens)."""
        return self.waiting_tokens + self.prefill_remaining

    def held_blocks(self, request: Request) -> int:
        """KV blocks a running request holds exclusively (shared prefix blocks excluded)."""
        if request.state is State.DECODE:
            ctx = request.decode_entry_ctx + self.step_count - request.decode_entry_step
            return -(-ctx // self.block_size) - request.shared_blocks
        return request.blocks

    def computed_tokens(self, request: Request) -> int:
        """KV tokens a running request has computed (the work a preemption throws away)."""
        if request.state is State.DECODE:
            return request.decode_entry_ctx + self.step_count - request.decode_entry_step
        return request.computed

    def _record(self, first_step: int, latencies: np.ndarray) -> None:
        """Keep the latencies of steps ``first_step, first_step + 1, ...`` in the ring."""
        count = len(latencies)
        if count >= len(self._latency_ring):
            self._reserve_ring(count)
        ring = self._latency_ring
        start = first_step & (len(ring) - 1)
        head = min(count, len(ring) - start)
        ring[start : start + head] = latencies[:head]
        if head < count:
            ring[: count - head] = latencies[head:]
        self.busy_s += float(latencies.sum())

    def _record_one(self, step: int, latency: float) -> None:
        self._latency_ring[step & (len(self._latency_ring) - 1)] = latency
        self.busy_s += latency

    def _reserve_ring(self, span: int) -> None:
        """Make the latency ring hold at least the last ``span`` steps (a power of two, kept in place)."""
        size = len(self._latency_ring)
        if span < size:
            return
        grown = np.zeros(1 << int(span).bit_length())
        steps = np.arange(max(0, self.step_count - size + 1), self.step_count + 1)
        grown[steps & (len(grown) - 1)] = self._latency_ring[steps & (size - 1)]
        self._latency_ring = grown

    def step_latencies(self, last: int) -> np.ndarray:
        """Latencies (s) of the engine's ``last`` most recent steps (at most the ring's length), oldest first."""
        last = min(last, self.step_count, len(self._latency_ring))
        steps = np.arange(self.step_count - last + 1, self.step_count + 1)
        return self._latency_ring[steps & (len(self._latency_ring) - 1)]

    # -- decode-only jumps -------------------------------------------------------------------------------
    def _plan_jump(self) -> tuple[np.ndarray, int] | None:
        """Latencies (s) of the decode-only steps that can run unperturbed, and the KV blocks they allocate.

        The stretch ends at the step that finishes a request and before the step that would lack a KV
        block; a request submitted meanwhile cuts it after the step in progress (:meth:`_cut_jump`).
        """
        if self.prefilling or self.n_dec == 0 or not self.policy.supports_decode_jumps:
            return None
        steps = self._next_finish_step() - self.step_count
        if self.waiting:
            ready = self.waiting[0].ready_step
            if ready <= self.step_count + 1:
                if self._head_admissible():
                    return None
            else:  # the head joins a later step (asynchronous scheduling): decode until then
                steps = min(steps, ready - 1 - self.step_count)
        if self.incoming and self._incoming_admissible():
            return None
        if steps < 2:
            return None
        t0 = self.decode_step_s(self.n_dec, self.dec_ctx_sum)
        slope = self._decode_per_kv * self.n_dec  # each step adds one KV token per sequence
        latencies = t0 + slope * np.arange(steps)
        if self.config.noise_sigma > 0:
            latencies = latencies * self._noise(steps)
        first = self.step_count + 1
        if (steps // self.block_size + 1) * self.n_dec > self.free_blocks:  # KV may run short: find where
            keys = (first + np.arange(steps)) % self.block_size
            cumulative = np.cumsum(np.asarray(self.block_hist)[keys])
            steps = min(steps, int(np.searchsorted(cumulative, self.free_blocks, side="right")))
            if steps < 2:
                return None
            return latencies[:steps], int(cumulative[steps - 1])
        full, rest = divmod(steps, self.block_size)
        partial = sum(self.block_hist[(first + j) % self.block_size] for j in range(rest))
        return latencies, full * self.n_dec + partial

    def _incoming_admissible(self) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        demand = self.block_hist[(self.step_count + 1) % self.block_size] if self.n_dec else 0
        return -(-(self.incoming[0].computed + 1) // self.block_size) <= self.free_blocks - demand

    def _admit_incoming(self) -> None:
        """KV-ready requests join the decode set FCFS while sequences and blocks allow (they decode this step)."""
        while self.incoming and self._incoming_admissible():
            request = self.incoming.popleft()
            self._take(-(-request.computed // self.block_size))
            self.running[request.id] = request
            self._join_decode(request, self.step_count)

    def _head_admissible(self) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        left = max(self.policy.token_budget(self.view), self.n_dec) - self.n_dec
        if left <= 0:
            return False
        demand = self.block_hist[(self.step_count + 1) % self.block_size]
        _, _, _, need, revived = self._admission(self.waiting[0], left)
        return need + revived <= self.free_blocks - demand

    def _next_finish_step(self) -> int:
        heap = self.finish_heap
        while heap and (heap[0][3].heap_version != heap[0][1] or heap[0][3].state is not State.DECODE):
            heapq.heappop(heap)
        return heap[0][0] if heap else self.step_count + 1

    # -- one regular step --------------------------------------------------------------------------------
    def _schedule(self, budget: int | None = None) -> tuple[StepBatch, list[tuple[Request, int]], int] | None:
        step = self.step_count + 1
        preempted = False
        if self.incoming:
            self._admit_incoming()
        demand = self.block_hist[step % self.block_size] if self.n_dec else 0
        while demand > self.free_blocks and self.n_dec:
            self._preempt(step)
            preempted = True
            demand = self.block_hist[step % self.block_size] if self.n_dec else 0
        self._take(demand)
        self._decode_blocks_for = step
        budget = max(self.policy.token_budget(self.view) if budget is None else int(budget), self.n_dec)
        left = budget - self.n_dec
        chunks: list[tuple[Request, int]] = []
        prefilling = list(self.prefilling.values())
        if self._shortest_first:
            prefilling.sort(key=lambda r: r.prefill_target - r.computed)
        for request in prefilling:
            if left <= 0:
                break
            if request.state is not State.PREFILL:  # preempted earlier in this loop
                continue
            chunk = min(request.prefill_target - request.computed, left, self._chunk_cap)
            need = -(-(request.computed + chunk) // self.block_size) - request.shared_blocks - request.blocks
            while need > self.free_blocks and request.state is State.PREFILL:
                self._preempt(step)
                preempted = True
            if request.state is not State.PREFILL:
                continue
            self._take(need)
            request.blocks += need
            chunks.append((request, chunk))
            left -= chunk
        while not preempted and self.waiting and left > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.ready_step > step and (self.n_dec or chunks):  # scheduled a step ahead: not yet
                break
            hits, hit_tokens, chunk, need, revived = self._admission(request, left)
            if need + revived > self.free_blocks:
                break
            if self._admit_hook is not None and not self._admit_hook(self.view, request, need + revived):
                break
            self.waiting.popleft()
            self.waiting_tokens -= request.prefill_target
            self.prefill_remaining += request.prefill_target - hit_tokens
            if hits:
                self.cache.hit_tokens += hit_tokens
                self.free_blocks -= self.cache.acquire(request.hash_ids[:hits])
                request.shared = list(request.hash_ids[:hits])
                request.shared_blocks = hits * self.cache.blocks_per_segment
                request.prefix_hit_tokens += hit_tokens
            if self.cache is not None:
                self.cache.query_tokens += request.prefill_target
            request.state, request.computed, request.blocks = State.PREFILL, hit_tokens, need
            self._take(need)
            self.running[request.id] = request
            self.prefilling[request.id] = request
            if math.isnan(request.first_scheduled_s):
                request.first_scheduled_s = self.env.now
            chunks.append((request, chunk))
            left -= chunk
        n_dec = self.n_dec
        if n_dec == 0 and not chunks:
            return None
        decode_kv = self.dec_ctx_sum + n_dec
        tokens, pairs, kv = n_dec, float(decode_kv), decode_kv
        for request, chunk in chunks:
            tokens += chunk
            pairs += chunk * (request.computed + (chunk + 1) / 2)
            kv += request.computed + chunk
        batch = StepBatch(tokens, n_dec + len(chunks), n_dec, pairs, kv, decode_kv)
        return batch, chunks, n_dec

    def _admission(self, request: Request, left: int) -> tuple[int, int, int, int, int]:
        """What admitting ``request`` with ``left`` budget takes: (cached segments, their tokens, first chunk,
        new KV blocks, evictable blocks the hits revive). At least one prompt token is always computed."""
        hits = hit_tokens = revived = shared_blocks = 0
        if self.cache is not None and request.hash_ids:
            usable = min(len(request.hash_ids), (request.prefill_target - 1) // self.cache.segment_tokens)
            hits = self.cache.match(request.hash_ids[:usable])
            if hits:
                hit_tokens = hits * self.cache.segment_tokens
                shared_blocks = hits * self.cache.blocks_per_segment
                revived = self.cache.match_cost(request.hash_ids[:hits])
        chunk = min(request.prefill_target - hit_tokens, left, self._chunk_cap)
        need = -(-(hit_tokens + chunk) // self.block_size) - shared_blocks
        return hits, hit_tokens, chunk, need, revived

    def _preempt(self, step: int) -> None:
        """Preempt a running request (recompute), freeing its KV blocks: the most recently admitted unless
        the batch policy chooses."""
        victim = self.policy.choose_victim(self.view)  # vLLM's default: the newest admitted
        if victim.state is State.DECODE:
            done = self.step_count - victim.decode_entry_step
            ctx = victim.decode_entry_ctx + done
            held = -(-(ctx + 1) // self.block_size) if self._decode_blocks_for == step else -(-ctx // self.block_size)
            self.free_blocks += held - victim.shared_blocks
            self.n_dec -= 1
            self.dec_ctx_sum -= ctx
            self.block_hist[(victim.decode_entry_step + 1 - victim.decode_entry_ctx) % self.block_size] -= 1
            victim.heap_version += 1
            victim.generated = victim.decode_entry_generated + done
            if done:  # scheduling runs at the end of the latest step, which sampled its latest token
                victim.last_token_s = self.env.now
            victim.max_gap_s = max(victim.max_gap_s, self._max_latency(victim.decode_entry_step, self.step_count))
        else:
            self.free_blocks += victim.blocks
            self.prefill_remaining -= victim.prefill_target - victim.computed
            del self.prefilling[victim.id]
        self._release_shared(victim)
        del self.running[victim.id]
        victim.state, victim.computed, victim.blocks, victim.ready_step = State.WAITING, 0, 0, 0
        victim.prefill_target = victim.prompt_tokens + victim.generated
        self.waiting_tokens += victim.prefill_target
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    def _max_latency(self, after_step: int, through_step: int) -> float:
        """The longest step in (after_step, through_step]: a decode's largest gap between tokens."""
        if through_step <= after_step:
            return 0.0
        ring, mask = self._latency_ring, len(self._latency_ring) - 1
        start, end = (after_step + 1) & mask, through_step & mask
        if start <= end:
            return float(ring[start : end + 1].max())
        return float(max(ring[start:].max(), ring[: end + 1].max()))

    # -- step completion ---------------------------------------------------------------------------------
    def _complete_decodes(self) -> None:
        heap, now = self.finish_heap, self.env.now
        while heap and heap[0][0] <= self.step_count:
            _, version, _, request = heapq.heappop(heap)
            if request.heap_version != version or request.state is not State.DECODE:
                continue
            done = self.step_count - request.decode_entry_step
            ctx = request.decode_entry_ctx + done
            self.free_blocks += -(-ctx // self.block_size) - request.shared_blocks
            self._release_shared(request)
            self.n_dec -= 1
            self.dec_ctx_sum -= ctx
            self.block_hist[(request.decode_entry_step + 1 - request.decode_entry_ctx) % self.block_size] -= 1
            request.generated = request.decode_entry_generated + done
            request.max_gap_s = max(request.max_gap_s, self._max_latency(request.decode_entry_step, self.step_count))
            self._finish(request, now)

    def _advance_prefills(self, chunks: list[tuple[Request, int]]) -> Generator[simpy.Event, object, None]:
        """Account a step's prefill chunks; a generator because a PD handoff may wait on an agent's choice."""
        now, step = self.env.now, self.step_count
        for request, chunk in chunks:
            if request.state is not State.PREFILL:
                continue
            request.computed += chunk
            self.prefill_remaining -= chunk
            if request.computed < request.prefill_target:
                continue
            request.generated += 1  # the last prefill chunk samples a token
            if math.isnan(request.first_token_s):
                request.first_token_s = now
                if self.host is not None:
                    self.host.engine_first_token(self, request)
            else:  # a preempted request's recomputation samples its next token
                request.max_gap_s = max(request.max_gap_s, now - request.last_token_s)
                if self.host is not None:
                    self.host.engine_tokens(self, 1, now - request.last_token_s)
            request.last_token_s = now
            del self.prefilling[request.id]
            if self.cache is not None and request.hash_ids:
                self._publish(request)
            if request.generated >= request.output_tokens:
                self.free_blocks += request.blocks
                request.blocks = 0
                self._release_shared(request)
                self._finish(request, now)
                continue
            if self.hands_off and self.host is not None:
                request.state = State.TRANSFER  # keeps its KV blocks until the transfer completes
                del self.running[request.id]
                self.transferring += 1
                decision = self.host.engine_handoff(self, request)
                if decision is not None:  # an agent places the decode: wait for it (no time passes)
                    yield decision
                continue
            request.blocks = 0  # from here on the decode aggregates account for its KV
            self._join_decode(request, step)

    def _join_decode(self, request: Request, step: int) -> None:
        """Enter the decode set after ``step``; its KV (``computed`` tokens) is accounted in aggregate from now."""
        request.state = State.DECODE
        request.decode_entry_step, request.decode_entry_ctx = step, request.computed
        request.decode_entry_generated = request.generated
        self.n_dec += 1
        self.dec_ctx_sum += request.computed
        self.block_hist[(step + 1 - request.computed) % self.block_size] += 1
        finish = step + request.output_tokens - request.generated
        self._reserve_ring(finish - step + 1)  # its largest gap is asked over these steps
        heapq.heappush(self.finish_heap, (finish, request.heap_version, request.id, request))

    def _publish(self, request: Request) -> None:
        """Share the request's freshly computed full prompt segments with later requests."""
        full = min(len(request.hash_ids), request.prompt_tokens // self.cache.segment_tokens)
        added = self.cache.publish(request.hash_ids[len(request.shared) : full])
        if added:
            converted = len(added) * self.cache.blocks_per_segment
            request.blocks -= converted
            request.shared.extend(added)
            request.shared_blocks += converted

    def _finish(self, request: Request, now: float) -> None:
        request.state = State.FINISHED
        request.finished_s = request.last_token_s = now
        del self.running[request.id]
        if self.host is not None:
            self.host.engine_finished(request)
