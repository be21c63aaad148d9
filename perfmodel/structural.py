"""The structural step-latency model: what one engine step costs, from architecture, hardware and batch.

A step runs every layer's GEMMs (QKV, O, MLP up and down, MoE experts), elementwise kernels (norms,
RoPE, activation, residual add), attention over the KV cache, and with tensor parallelism two
all-reduces per layer; then the LM head for the sequences that sample, plus CPU overhead per step and
per sequence. Each term is a roofline of FLOPs and bytes against the GPU's datasheet peaks, scaled by
fitted efficiencies (:class:`servegym.perfmodel.profile.Coefficients`). The host launches every kernel of an eager
step; when the kernels are shorter than their launches (small shards at high TP, small batches) the GPU
waits on the host, so a step takes a smooth maximum of GPU time and host launch time, not their sum. A
decode-only step that replays a captured CUDA graph launches once. The formulas use only arithmetic
operators, so the same code evaluates one batch (Python floats, a few microseconds) or many (NumPy
arrays, vectorised).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from servegym.perfmodel.batch import StepBatch, StepBatchArray
from servegym.perfmodel.catalog import DTYPE_BYTES, CatalogError, GpuSpec, ModelSpec, check_dtype, get_gpu, get_model
from servegym.perfmodel.profile import Coefficients, Profile, default_profile, load_profile, registry_version

VIDUR_OPS = (
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
TERM_NAMES = ("overhead", "linear", "attention", "communication", "host_wait")
HOST_SMOOTHNESS = 4.0  # order of the smooth maximum of GPU time and host launch time
LINEAR_MEMO_SIZE = 1 << 16  # remembered (tokens, sequences) linear-layer times per model (a few MB at most)


@dataclass(frozen=True)
class Gemm:
    """One weight GEMM of a layer on one GPU: FLOPs and activation bytes per token, weight bytes."""

    flops_per_token: float
    weight_bytes: float
    act_bytes_per_token: float

    @classmethod
    def of_shape(cls, k: float, m: float, dtype_bytes: int) -> Gemm:
        return cls(2.0 * k * m, k * m * dtype_bytes, (k + m) * dtype_bytes)


class StructuralModel:
    """Step latency (ms) of ``model`` on ``tp`` GPUs of type ``gpu`` with the profile's coefficients.

    Args:
        gpu: catalog name or :class:`GpuSpec`.
        model: catalog name, alias, ``config.json`` path or :class:`ModelSpec`.
        tp: tensor-parallel degree; must divide the number of attention heads.
        dtype: weight and KV dtype (``bf16``, ``fp16`` or ``fp8``).
        coefficients: explicit coefficients; by default the profile's for this GPU.
        profile: where coefficients come from (the shipped default if omitted).
        cuda_graphs: decode-only steps replay a captured CUDA graph (vLLM's default unless
            ``enforce_eager``): one host launch instead of one per kernel, so such a step never waits on the
            host; other steps launch eagerly. (The GPU-side cost of each kernel stays.)
    """

    def __init__(
        self,
        gpu: str | GpuSpec,
        model: str | ModelSpec,
        tp: int = 1,
        dtype: str = "bf16",
        coefficients: Coefficients | None = None,
        profile: Profile | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.gpu = get_gpu(gpu)
        self.model = get_model(model)
        self.dtype = check_dtype(dtype)
        if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
            raise CatalogError(f"tensor-parallel degree must be a positive integer, got {tp!r}")
        if self.model.num_attention_heads % tp:
            raise CatalogError(
                f"tp={tp} does not divide the {self.model.num_attention_heads} attention heads of {self.model.name}"
            )
        self.tp = int(tp)
        self.cuda_graphs = bool(cuda_graphs)
        self.coefficients = coefficients or (profile or default_profile()).coefficients(self.gpu)
        self._precompute()

    def _precompute(self) -> None:
        self._linear_memo: dict[tuple[int, int], float] = {}
        m, c, tp = self.model, self.coefficients, self.tp
        b = DTYPE_BYTES[self.dtype]
        self.layers = m.num_hidden_layers
        self.heads_per_gpu = m.num_attention_heads / tp
        self.kv_heads_per_gpu = max(1.0, m.num_key_value_heads / tp)  # replicated when tp > KV heads
        kv_per_gpu = self.kv_heads_per_gpu * m.head_dim
        up_width = (2 if m.gated_mlp else 1) * m.intermediate_size / tp
        self.gemms: dict[str, Gemm] = {
            "attn_pre_proj": Gemm.of_shape(m.hidden_size, m.q_size / tp + 2 * kv_per_gpu, b),
            "attn_post_proj": Gemm.of_shape(m.q_size / tp, m.hidden_size, b),
        }
        experts = {
            "mlp_up_proj": Gemm.of_shape(m.hidden_size, up_width, b),
            "mlp_down_proj": Gemm.of_shape(m.intermediate_size / tp, m.hidden_size, b),
        }
        if m.is_moe:
            self.gemms["moe_router"] = Gemm.of_shape(m.hidden_size, m.num_local_experts, b)
            self.expert_gemms = experts
        else:
            self.gemms.update(experts)
            self.expert_gemms = {}
        self.lm_head = Gemm.of_shape(m.hidden_size, m.vocab_size / tp, b)

        peak, bw = self.gpu.peak_flops(self.dtype), self.gpu.bandwidth
        self._inv_gemm_flops = 1e3 / (c.gemm_flops_eff * peak)  # ms per FLOP
        self._inv_gemm_bw = 1e3 / (c.gemm_mem_eff * bw)  # ms per byte
        self._p = c.gemm_smoothness
        self._inv_p = 1.0 / c.gemm_smoothness
        self._gemm_launch = c.gemm_launch_ms
        self._pad = c.gemm_pad_tokens

        act_bytes = (3 if m.gated_mlp else 2) * m.intermediate_size / tp * b
        bytes_per_token = {
            "norm": 2 * m.hidden_size * b,
            "rope": 2 * (m.q_size / tp + kv_per_gpu) * b,
            "act": act_bytes,
            "add": 3 * m.hidden_size * b,
            "emb": 2 * m.hidden_size * b,
        }
        # ms per token of each elementwise kind, and its launch cost (ms)
        self.elem_ms_per_token = {k: v * 1e3 / (c.elem_mem_eff[k] * bw) for k, v in bytes_per_token.items()}
        self.elem_launch = dict(c.elem_launch_ms)
        norms = 2
        self._layer_elem_launch = norms * self.elem_launch["norm"] + sum(
            self.elem_launch[k] for k in ("rope", "act", "add")
        )
        self._layer_elem_per_token = (
            norms * self.elem_ms_per_token["norm"]
            + self.elem_ms_per_token["rope"]
            + self.elem_ms_per_token["act"]
            + self.elem_ms_per_token["add"]
        )

        self._attn_ms_per_pair = 4.0 * m.head_dim * self.heads_per_gpu * 1e3 / (c.attn_flops_eff * peak)
        self._attn_ms_per_kv = 2.0 * kv_per_gpu * b * 1e3 / (c.attn_mem_eff * bw)
        self._attn_launch = c.attn_launch_ms

        if tp > 1:
            ring = 2.0 * (tp - 1) / tp
            self._comm_ms_per_token = 2 * ring * m.hidden_size * b * 1e3 / (c.comm_link_eff * self.gpu.link_bandwidth)
            self._comm_latency = 2 * c.comm_latency_ms  # two all-reduces per layer
        else:
            self._comm_ms_per_token = self._comm_latency = 0.0
        # kernels the host launches in an eager step: per layer the norms, RoPE, activation, residual adds,
        # GEMMs, attention and the all-reduces; then the embedding and the LM head
        per_layer = 2 + 1 + 1 + 2 + len(self.gemms) + len(self.expert_gemms) + 1 + (2 if tp > 1 else 0)
        self._host_launch = (self.layers * per_layer + 2) * c.host_launch_ms
        self._host_pow = self._host_launch**HOST_SMOOTHNESS  # the smooth maximum works on 4th powers
        self._graph_host_pow = c.host_launch_ms**HOST_SMOOTHNESS  # a graph replay is one launch
        self._experts = float(m.num_local_experts)
        self._top_k = float(m.num_experts_per_tok)
        self._miss = 1.0 - self._top_k / self._experts

    # -- the terms; each works on Python floats and on NumPy arrays alike ---------------------------------
    def gemm_ms(self, n: Any, gemm: Gemm, weight_scale: Any = 1.0, token_scale: float = 1.0) -> Any:
        """One GEMM over ``n`` tokens: launch + p-norm smooth maximum of compute and memory time."""
        compute = (n * token_scale + self._pad) * gemm.flops_per_token * self._inv_gemm_flops
        memory = (gemm.weight_bytes * weight_scale + n * token_scale * gemm.act_bytes_per_token) * self._inv_gemm_bw
        return self._gemm_launch + (compute**self._p + memory**self._p) ** self._inv_p

    def layer_linear_ms(self, n: Any) -> Any:
        """GEMMs and elementwise kernels of one layer over ``n`` tokens (ms)."""
        total = self._layer_elem_launch + n * self._layer_elem_per_token
        for gemm in self.gemms.values():
            total = total + self.gemm_ms(n, gemm)
        if self.expert_gemms:
            touched = self._experts * (1.0 - self._miss**n)  # distinct experts the n tokens route to
            for gemm in self.expert_gemms.values():
                total = total + self.gemm_ms(n, gemm, weight_scale=touched, token_scale=self._top_k)
        return total

    def terms(self, batch: StepBatch | StepBatchArray) -> dict[str, Any]:
        """Latency of each term (ms) — overhead, linear layers, attention, communication, and the time the GPU
        waits on kernel launches — for one or many batches."""
        return dict(zip(TERM_NAMES, self._terms(batch), strict=True))

    def _linear(self, n: Any, s: Any) -> Any:
        """The linear layers' time: the part that depends only on token and sequence counts."""
        emb = self.elem_launch["emb"] + n * self.elem_ms_per_token["emb"]
        return self.layers * self.layer_linear_ms(n) + emb + self.gemm_ms(s, self.lm_head)

    def _terms(self, batch: StepBatch | StepBatchArray, linear: Any = None) -> tuple[Any, Any, Any, Any, Any]:
        n, s = batch.num_tokens, batch.num_seqs
        overhead = self.coefficients.step_overhead_ms + s * self.coefficients.seq_overhead_ms
        if linear is None:
            linear = self._linear(n, s)
        attention = self.layers * (
            self._attn_launch + batch.attn_pairs * self._attn_ms_per_pair + batch.kv_tokens * self._attn_ms_per_kv
        )
        communication = self.layers * (self._comm_latency + n * self._comm_ms_per_token)
        host_pow = self._host_pow
        if self.cuda_graphs:  # a decode-only step replays the captured graph: one launch
            host_pow = host_pow - (n == batch.num_decodes) * (host_pow - self._graph_host_pow)
        gpu = linear + attention + communication
        gpu2 = gpu * gpu
        host_wait = (gpu2 * gpu2 + host_pow) ** 0.25 - gpu  # smooth max of order HOST_SMOOTHNESS = 4
        return overhead, linear, attention, communication, host_wait

    def predict(self, batch: StepBatch) -> float:
        """Latency (ms) of one step; an empty batch costs nothing (no step runs).

        The linear layers' time (most of the cost of a prediction) is remembered per (tokens, sequences):
        steps repeat those counts all the time, and a router predicts several steps per engine per decision.
        """
        n = batch.num_tokens
        if n <= 0:
            return 0.0
        key = (n, batch.num_seqs)
        linear = self._linear_memo.get(key)
        if linear is None:
            if len(self._linear_memo) >= LINEAR_MEMO_SIZE:
                self._linear_memo.clear()
            linear = self._linear_memo[key] = self._linear(n, batch.num_seqs)
        overhead, linear, attention, communication, host_wait = self._terms(batch, linear)
        return float(overhead + linear + attention + communication + host_wait)

    def predict_seqs(self, seqs: list[tuple[int, int]]) -> float:
        """Latency (ms) of a step given as ``[(new_tokens, context_tokens), ...]``."""
        return self.predict(StepBatch.from_seqs(seqs))

    def predict_many(self, batches: StepBatchArray) -> np.ndarray:
        """Latencies (ms) of many steps at once (vectorised; empty batches give 0)."""
        overhead, linear, attention, communication, host_wait = self._terms(batches)
        total = overhead + linear + attention + communication + host_wait
        return np.where(batches.num_tokens > 0, total, 0.0)

    def vidur_ops_ms(self, num_tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Per-layer operator times (ms) in the breakdown Vidur measures, for calibration and reports."""
        n = np.asarray(num_tokens, dtype=np.float64)
        ops = {name: self.gemm_ms(n, self.gemms[name]) for name in ("attn_pre_proj", "attn_post_proj")}
        for name in ("mlp_up_proj", "mlp_down_proj"):
            ops[name] = self.gemm_ms(n, (self.expert_gemms or self.gemms)[name])
        for name, kind in (
            ("input_layernorm", "norm"),
            ("post_attention_layernorm", "norm"),
            ("attn_rope", "rope"),
            ("mlp_act", "act"),
            ("add", "add"),
            ("emb", "emb"),
        ):
            ops[name] = self.elem_launch[kind] + n * self.elem_ms_per_token[kind]
        return ops


def structural_model(
    gpu: str, model: str, tp: int = 1, dtype: str = "bf16", profile: str | None = None, cuda_graphs: bool = True
) -> StructuralModel:
    """The shared :class:`StructuralModel` of (GPU, model, TP, dtype) with the named profile (a shipped
    name, a JSON path or a registered name; the shipped default when None).

    Models are immutable once built, so clusters, engines, features and predictive policies share one per
    configuration instead of each keeping a cache of its own.
    """
    return _shared_model(gpu, model, tp, dtype, profile or "default", bool(cuda_graphs), registry_version())


@functools.lru_cache(maxsize=512)
def _shared_model(
    gpu: str, model: str, tp: int, dtype: str, profile: str, cuda_graphs: bool, _version: int
) -> StructuralModel:
    return StructuralModel(gpu, model, tp=tp, dtype=dtype, profile=load_profile(profile), cuda_graphs=cuda_graphs)
