"""GPU microbenchmark: time real torch kernels of a model's shapes and write a measured step log.

For each batch composition of a seeded grid (one prefill chunk at some context, plus a group of
decodes at some context), it runs every layer of the model — RMSNorm, QKV GEMM, RoPE, attention
through ``scaled_dot_product_attention`` (GQA), O GEMM, gated MLP, residual adds — then the LM head
for the sampling sequences, and records the wall time of the whole step. Weights are distinct per
layer up to a memory budget, then reused, so weight reads come from device memory as in a real step.
It runs on CUDA (events, synchronised) and on CPU (for tests). The engine's own CPU overhead is not
in these figures; calibrating on them fits the overhead of this harness instead.

Its output feeds ``python -m servegym.perfmodel calibrate``. On CPU it also measures a "datasheet" for the
host (peak BF16 matmul FLOP/s, copy bandwidth) as a catalog entry, since no table lists one.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from servegym.perfmodel.catalog import ModelSpec, gpu_names

CUDA_NAMES = (  # substring of torch.cuda.get_device_name() -> catalog name, most specific first
    ("H100 PCIe", "H100-PCIe"),
    ("H100 NVL", "H100-NVL"),
    ("H100", "H100-SXM"),
    ("H200", "H200"),
    ("A100-SXM4-40GB", "A100-40GB"),
    ("A100-PCIE-40GB", "A100-40GB"),
    ("A100", "A100-80GB"),
    ("L40S", "L40S"),
    ("L4", "L4"),
    ("A10G", "A10G"),
    ("A40", "A40"),
    ("A10", "A10"),
    ("B200", "B200"),
    ("MI300X", "MI300X"),
)


@dataclass(frozen=True)
class Composition:
    """One grid point: a prefill chunk after some context, plus ``decodes`` sequences at ``decode_context``."""

    prefill: int
    prefill_context: int
    decodes: int
    decode_context: int

    def seqs(self) -> list[list[int]]:
        seqs = [[self.prefill, self.prefill_context]] if self.prefill else []
        return seqs + [[1, self.decode_context]] * self.decodes


def grid(seed: int = 0, points: int = 60, max_tokens: int = 4096, max_context: int = 4096) -> list[Composition]:
    """A seeded spread of prefill-only, decode-only and mixed steps (token counts log-uniform)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(points):
        kind = index % 3  # 0 prefill-only, 1 decode-only, 2 mixed
        prefill = int(2 ** rng.uniform(4, np.log2(max_tokens))) if kind != 1 else 0
        context = int(rng.choice([0, 0, 256, 1024, max_context // 2])) if prefill else 0
        decodes = int(2 ** rng.uniform(0, 7)) if kind != 0 else 0
        decode_context = int(2 ** rng.uniform(5, np.log2(max_context))) if decodes else 0
        out.append(Composition(min(prefill, max_tokens), context, decodes, decode_context))
    return out


def detect_gpu_name() -> str:
    """Catalog name of the current CUDA device (``--gpu`` overrides when this guesses wrong)."""
    name = torch.cuda.get_device_name()
    for needle, catalog in CUDA_NAMES:
        if needle in name:
            return catalog
    raise ValueError(f"cannot map CUDA device {name!r} to a catalog GPU ({', '.join(gpu_names())}); pass --gpu")


class _Layer:
    def __init__(self, model: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
        h, q, kv, inter = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
        scale = h**-0.5

        def weight(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, device=device, dtype=dtype) * scale

        self.qkv = weight(h, q + 2 * kv)
        self.o = weight(q, h)
        self.up = weight(h, (2 if model.gated_mlp else 1) * inter)
        self.down = weight(inter, h)
        self.norm1 = torch.ones(h, device=device, dtype=dtype)
        self.norm2 = torch.ones(h, device=device, dtype=dtype)


class StepRunner:
    """Runs whole model steps of given compositions on one device with synthetic weights."""

    def __init__(self, model: ModelSpec, device: str = "cpu", weight_budget_gb: float = 8.0) -> None:
        self.model, self.device = model, torch.device(device)
        self.dtype = torch.bfloat16
        per_layer = model.layer_params * 2
        distinct = max(1, min(model.num_hidden_layers, int(weight_budget_gb * 1e9 // per_layer)))
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.layers = [_Layer(model, self.device, self.dtype) for _ in range(distinct)]
        self.lm_head = torch.randn(model.hidden_size, model.vocab_size, device=self.device, dtype=self.dtype) * 0.02
        torch.random.set_rng_state(generator_state)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: Composition) -> torch.Tensor:
        m = self.model
        heads, kv_heads, hd = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        outputs = []
        offset = 0
        if c.prefill:
            n, ctx = c.prefill, c.prefill_context
            qp = q[:n].view(1, n, heads, hd).transpose(1, 2)
            # the cached context is read from the KV cache; new keys are appended after it
            kp = torch.cat([self._cache(ctx, kv_heads, hd), k[:n].view(1, n, kv_heads, hd).transpose(1, 2)], dim=2)
            vp = torch.cat([self._cache(ctx, kv_heads, hd), v[:n].view(1, n, kv_heads, hd).transpose(1, 2)], dim=2)
            mask = None
            if ctx:
                mask = torch.ones(n, ctx + n, dtype=torch.bool, device=self.device).tril(diagonal=ctx)
            out = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=mask, is_causal=mask is None, enable_gqa=heads != kv_heads
            )
            outputs.append(out.transpose(1, 2).reshape(n, heads * hd))
            offset = n
        if c.decodes:
            b, ctx = c.decodes, c.decode_context
            qd = q[offset : offset + b].view(b, 1, heads, hd).transpose(1, 2)
            kd = self._cache(ctx + 1, kv_heads, hd, batch=b)
            out = F.scaled_dot_product_attention(qd, kd, kd, enable_gqa=heads != kv_heads)
            outputs.append(out.transpose(1, 2).reshape(b, heads * hd))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _cache(self, tokens: int, kv_heads: int, hd: int, batch: int = 1) -> torch.Tensor:
        key = (tokens, batch)
        cache = getattr(self, "_caches", {})
        if key not in cache:
            cache[key] = torch.randn(batch, kv_heads, tokens, hd, device=self.device, dtype=self.dtype)
            self._caches = cache
        return cache[key]

    def step(self, c: Composition) -> None:
        """One forward step of the whole model for composition ``c`` (results discarded)."""
        m = self.model
        n = c.prefill + c.decodes
        q_size, kv_size = m.q_size, m.kv_size
        x = torch.randn(n, m.hidden_size, device=self.device, dtype=self.dtype)
        cos = torch.randn(n, 1, m.head_dim, device=self.device, dtype=self.dtype)
        for index in range(m.num_hidden_layers):
            layer = self.layers[index % len(self.layers)]
            h = F.rms_norm(x, (m.hidden_size,), layer.norm1)
            qkv = h @ layer.qkv
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = (q.view(n, -1, m.head_dim) * cos).view(n, q_size)  # RoPE-like elementwise pass
            k = (k.view(n, -1, m.head_dim) * cos).view(n, kv_size)
            attn = self._attention(q, k, v, c)
            x = x + attn @ layer.o
            h = F.rms_norm(x, (m.hidden_size,), layer.norm2)
            up = h @ layer.up
            if m.gated_mlp:
                gate, value = up.chunk(2, dim=-1)
                up = F.silu(gate) * value
            else:
                up = F.gelu(up)
            x = x + up @ layer.down
        sampling = (1 if c.prefill else 0) + c.decodes
        _ = x[-sampling:] @ self.lm_head

    def time_step(self, c: Composition, repeats: int = 3, warmup: int = 1) -> float:
        """Wall time (ms) of the step over ``repeats`` runs after ``warmup``: the median on CUDA (events), the
        minimum on CPU, where other processes only ever add time."""
        for _ in range(warmup):
            self.step(c)
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.step(c)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                self.step(c)
                times.append((time.perf_counter() - begin) * 1e3)
        return float(np.median(times) if self.device.type == "cuda" else np.min(times))


def measure_host(device: str = "cpu") -> dict[str, float | str]:
    """A catalog entry for the host CPU with measured peak BF16 matmul FLOP/s and copy bandwidth."""
    size = 2048
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3):  # warm the BLAS threads and caches
        a @ b
    flops = []
    for _ in range(10):
        begin = time.perf_counter()
        a @ b
        flops.append(2 * size**3 / (time.perf_counter() - begin))
    src = torch.empty(128 * 1024 * 1024, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    bandwidth = []
    for _ in range(10):
        begin = time.perf_counter()
        dst.copy_(src)
        bandwidth.append(2 * src.numel() * 2 / (time.perf_counter() - begin))
    import os

    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "name": f"CPU-{platform.machine()}-{torch.get_num_threads()}t",
        "family": "cpu",
        "memory_gb": round(memory_gb, 1),
        "mem_bandwidth_gbps": round(max(bandwidth) / 1e9, 2),
        "bf16_dense_tflops": round(max(flops) / 1e12, 4),
        "fp8": False,
        "link": "none",
        "link_bandwidth_gbps": 1.0,
        "source": f"measured by perfmodel.microbench on {platform.processor() or platform.machine()}",
    }


def run(
    model: ModelSpec,
    gpu: str,
    device: str,
    compositions: list[Composition],
    repeats: int = 3,
    progress: bool = True,
) -> Iterator[dict]:
    """Yield one measured step-log line per composition."""
    runner = StepRunner(model, device=device)
    iterator = compositions
    if progress:
        from tqdm import tqdm

        iterator = tqdm(compositions, desc=f"microbench {model.name} on {gpu}", unit="step")
    with torch.inference_mode():
        for composition in iterator:
            latency = runner.time_step(composition, repeats=repeats)
            yield {
                "gpu": gpu,
                "model": model.name,
                "tp": 1,
                "dtype": "bf16",
                "seqs": composition.seqs(),
                "latency_ms": round(latency, 5),
                "device": device,
            }


def write_log(lines: Iterator[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
            count += 1
    return count
