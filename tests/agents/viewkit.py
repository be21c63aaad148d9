from envs.sim.request import SloClass
from envs.sim.view import ClusterView, EngineInfo, EngineSnapshot, RequestInfo


def info(i, gpu="H100-SXM", model="Llama-3-8B", budget=8192, kv_tokens=400_000):
    return EngineInfo(i, gpu, model, 1, budget, 256, kv_tokens)


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
        time_s,
        running,
        waiting,
        kv,
        25_000,
        16,
        0,
        0,
        pending,
        decodes,
        decode_kv,
        tokens_per_step,
        step_ms,
        predicted_ms,
        role,
    )


def view(snapshots, outstanding=None, infos=None, roles=None, now=0.0, prompts=None):
    n = len(snapshots)
    return ClusterView(
        now,
        infos or [info(i) for i in range(n)],
        snapshots,
        outstanding or [0] * n,
        prompts or [0] * n,
        roles or [s.role for s in snapshots],
    )


def request(prompt=1000, session=-1, hashes=(), output=None, rid=0):
    return RequestInfo(rid, 0.0, prompt, SloClass(), session, output, hashes)
