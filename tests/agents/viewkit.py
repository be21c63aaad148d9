"""Hand-made router views for policy tests: snapshots and engine facts built by keyword."""

from servegym.envs.sim.request import SloClass
from servegym.envs.sim.roles import Role
from servegym.envs.sim.view import ClusterView, EngineInfo, EngineSnapshot, RequestInfo


def info(i, gpu="H100-SXM", model="Llama-3-8B", budget=8192, kv_tokens=400_000):
    return EngineInfo(
        index=i,
        gpu=gpu,
        model=model,
        tp=1,
        max_num_batched_tokens=budget,
        max_num_seqs=256,
        kv_capacity_tokens=kv_tokens,
    )


def snap(
    time_s=0.0,
    running=0,
    waiting=0,
    kv=0.0,
    pending=0,
    decodes=0,
    decode_kv=0,
    tokens_per_step=0.0,
    step_ms=0.0,
    predicted_ms=10.0,
    role="both",
):
    return EngineSnapshot(
        time_s=time_s,
        num_requests_running=running,
        num_requests_waiting=waiting,
        kv_cache_usage_perc=kv,
        num_gpu_blocks=25_000,
        block_size=16,
        pending_prefill_tokens=pending,
        num_decodes=decodes,
        decode_kv_tokens=decode_kv,
        next_step_tokens=tokens_per_step,
        recent_step_ms=step_ms,
        predicted_step_ms=predicted_ms,
        role=Role(role),
    )


def view(snapshots, outstanding=None, infos=None, roles=None, now=0.0, prompts=None):
    n = len(snapshots)
    return ClusterView(
        now,
        infos or [info(i) for i in range(n)],
        snapshots,
        outstanding or [0] * n,
        prompts or [0] * n,
        [Role(r) for r in roles] if roles else [s.role for s in snapshots],
    )


def request(prompt=1000, session=-1, hashes=(), output=None, rid=0):
    return RequestInfo(rid, 0.0, prompt, SloClass(), session, output, hashes)
