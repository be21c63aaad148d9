"""What an environment shows of the state at its pending decision: ``render_mode="ansi"`` (a per-engine text
table) and ``"rgb_array"`` (a small plot of queues and KV usage), both from the router's view — the
same ``ClusterView`` the observation is computed from."""

from __future__ import annotations

import numpy as np
from servegym.envs.sim.policies import Decision
from servegym.envs.sim.view import ClusterView

RENDER_MODES = ("ansi", "rgb_array")


def _headline(now_s: float, decision: Decision | None, decisions: int) -> str:
    if decision is None:
        return f"t={now_s:.3f} s, {decisions} decisions taken, no decision pending (episode over)"
    what = decision.kind.value if hasattr(decision.kind, "value") else str(decision.kind)
    if decision.request is not None:
        what += f" request {decision.request.id} ({decision.request.prompt_tokens} prompt tokens)"
    if decision.engine is not None:
        what += f" engine {decision.engine.index}"
    return f"t={now_s:.3f} s, decision {decisions + 1}: {what}"


def ansi(view: ClusterView, decision: Decision | None, decisions: int, mask: np.ndarray) -> str:
    """A text table: one row per engine (GPU, role, gauges, the router tap, whether the action is allowed)."""
    lines = [_headline(view.now_s, decision, decisions)]
    header = (f"{'#':>3} {'gpu':<10} {'role':<8} {'run':>4} {'wait':>4} {'kv%':>5} {'out':>4} "
              f"{'pending':>8} {'dec':>4} {'step ms':>8} {'next ms':>8} {'ok':>3}")  # fmt: skip
    lines.append(header)
    for i, (info, snap) in enumerate(zip(view.engines, view.snapshots, strict=True)):
        allowed = "yes" if i < len(mask) and mask[i] else "-"
        lines.append(
            f"{i:>3} {info.gpu[:10]:<10} {str(view.roles[i])[:8]:<8} {snap.num_requests_running:>4} "
            f"{snap.num_requests_waiting:>4} {100 * snap.kv_cache_usage_perc:>5.1f} "
            f"{view.outstanding_requests[i]:>4} {snap.pending_prefill_tokens:>8} {snap.num_decodes:>4} "
            f"{snap.recent_step_ms:>8.2f} {snap.predicted_step_ms:>8.2f} {allowed:>3}"
        )
    return "\n".join(lines) + "\n"


def rgb_array(view: ClusterView, decision: Decision | None, decisions: int) -> np.ndarray:
    """A small RGB image (H, W, 3, uint8): per engine its running and waiting requests and its KV usage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    snaps = view.snapshots
    index = np.arange(view.num_engines)
    figure = Figure(figsize=(6.4, 3.2), dpi=80)
    queues, kv = figure.subplots(1, 2)
    running = [s.num_requests_running for s in snaps]
    queues.bar(index, running, label="running")
    queues.bar(index, [s.num_requests_waiting for s in snaps], bottom=running, label="waiting")
    queues.set(xlabel="engine", ylabel="requests", xticks=index)
    queues.legend(fontsize=7)
    kv.bar(index, [100 * s.kv_cache_usage_perc for s in snaps], color="tab:green")
    kv.set(xlabel="engine", ylabel="KV usage (%)", ylim=(0, 100), xticks=index)
    figure.suptitle(_headline(view.now_s, decision, decisions), fontsize=8)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
