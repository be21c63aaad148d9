"""GPU and model catalogs: the static facts the structural performance model is built from.

GPUs come from datasheets (``data/gpus.csv``), models from their Hugging Face ``config.json`` fields
(``data/models.json``). Users extend both with a YAML file of their own entries or, for a model, the
path of a ``config.json``. Lookups are case-insensitive; a model also answers to its Hugging Face repo
id (``meta-llama/Llama-2-7b-hf``) and to the full name in the shared table (``Mistral-7B-v0.1``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from servegym.perfmodel.errors import PerfModelError

DATA_DIR = Path(__file__).resolve().parent / "data"

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}


class CatalogError(PerfModelError):
    """An unknown or malformed GPU or model entry; the message names it and what is wrong."""


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one accelerator (units in the field names)."""

    name: str
    family: str
    memory_gb: float
    mem_bandwidth_gbps: float
    bf16_dense_tflops: float
    fp8: bool = False
    link: str = "pcie4"
    link_bandwidth_gbps: float = 32.0
    source: str = "user"

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense tensor-core FLOP/s for ``dtype`` (FP8 doubles BF16 where the hardware has it)."""
        check_dtype(dtype)
        if dtype == "fp8":
            if not self.fp8:
                raise CatalogError(f"GPU {self.name} ({self.family}) has no FP8 tensor cores; use dtype bf16")
            return 2.0 * self.bf16_dense_tflops * 1e12
        return self.bf16_dense_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        """HBM/GDDR bandwidth in bytes/s."""
        return self.mem_bandwidth_gbps * 1e9

    @property
    def link_bandwidth(self) -> float:
        """Unidirectional per-GPU tensor-parallel link bandwidth in bytes/s."""
        return self.link_bandwidth_gbps * 1e9


@dataclass(frozen=True)
class ModelSpec:
    """Transformer architecture as in a Hugging Face ``config.json`` (decoder-only, RoPE, optional MoE)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0
    gated_mlp: bool = True
    num_local_experts: int = 1
    num_experts_per_tok: int = 1
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    hf_repo: str = ""
    source: str = "user"
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
        ):
            if getattr(self, name) <= 0:
                raise CatalogError(f"model {self.name}: {name} must be positive, got {getattr(self, name)}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise CatalogError(f"model {self.name}: num_experts_per_tok exceeds num_local_experts")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def mlp_params_per_expert(self) -> int:
        """Weights of one expert's MLP (gate, up and down projections)."""
        projections = 3 if self.gated_mlp else 2
        return projections * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        """All weights of one transformer layer (every expert counted)."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        router = self.hidden_size * self.num_local_experts if self.is_moe else 0
        return attn + router + self.num_local_experts * self.mlp_params_per_expert

    @property
    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * self.layer_params + embeddings

    def weight_bytes(self, dtype: str = "bf16") -> float:
        return self.num_params * DTYPE_BYTES[check_dtype(dtype)]

    def kv_bytes_per_token(self, dtype: str = "bf16") -> float:
        """KV-cache bytes one token occupies across all layers and all GPUs of the replica."""
        return 2 * self.num_hidden_layers * self.kv_size * DTYPE_BYTES[check_dtype(dtype)]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_BYTES:
        raise CatalogError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return dtype


def _key(name: str) -> str:
    return name.strip().lower()


@cache
def _builtin_gpus() -> dict[str, GpuSpec]:
    gpus = {}
    with open(DATA_DIR / "gpus.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            gpus[_key(row["name"])] = _gpu_from_mapping(row, origin="data/gpus.csv")
    return gpus


@cache
def _builtin_models() -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for entry in json.loads((DATA_DIR / "models.json").read_text()):
        aliases = [entry["name"] + "-v0.1"] if entry["name"].startswith(("Mistral", "Mixtral")) else []
        if entry.get("hf_repo"):
            aliases.append(entry["hf_repo"])
        spec = _model_from_mapping({**entry, "aliases": tuple(aliases)}, origin="data/models.json")
        for name in (spec.name, *spec.aliases):
            models[_key(name)] = spec
    return models


_user_gpus: dict[str, GpuSpec] = {}
_user_models: dict[str, ModelSpec] = {}


def _coerce(cls: type, mapping: dict[str, Any], origin: str) -> dict[str, Any]:
    """Keep the dataclass's fields of ``mapping`` and convert each to the field's declared type."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, raw in mapping.items():
        if name not in known or raw is None or raw == "":
            continue
        kind = known[name].type
        try:
            if kind == "bool":
                values[name] = raw if isinstance(raw, bool) else str(raw).strip().lower() in {"1", "true", "yes"}
            elif kind == "int":
                values[name] = int(raw)
            elif kind == "float":
                values[name] = float(raw)
            elif kind.startswith("tuple"):
                values[name] = tuple(raw)
            else:
                values[name] = str(raw)
        except (TypeError, ValueError) as error:
            raise CatalogError(f"{origin}: field {name!r} has bad value {raw!r} ({error})") from None
    return values


def _gpu_from_mapping(mapping: dict[str, Any], origin: str) -> GpuSpec:
    values = _coerce(GpuSpec, mapping, origin)
    missing = [n for n in ("name", "family", "memory_gb", "mem_bandwidth_gbps", "bf16_dense_tflops") if n not in values]
    if missing:
        raise CatalogError(f"{origin}: GPU entry lacks {', '.join(missing)}")
    return GpuSpec(**values)


def _model_from_mapping(mapping: dict[str, Any], origin: str) -> ModelSpec:
    values = _coerce(ModelSpec, mapping, origin)
    required = ("name", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [n for n in required if n not in values]
    if missing:
        raise CatalogError(f"{origin}: model entry lacks {', '.join(missing)}")
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    return ModelSpec(**values)


def gpu_names() -> list[str]:
    return sorted({spec.name for spec in (*_builtin_gpus().values(), *_user_gpus.values())})


def model_names() -> list[str]:
    return sorted({spec.name for spec in (*_builtin_models().values(), *_user_models.values())})


def get_gpu(name: str | GpuSpec) -> GpuSpec:
    """Look a GPU up by name, case-insensitively; user entries shadow built-in ones."""
    if isinstance(name, GpuSpec):
        return name
    spec = _user_gpus.get(_key(name)) or _builtin_gpus().get(_key(name))
    if spec is None:
        raise CatalogError(
            f"unknown GPU {name!r}; known: {', '.join(gpu_names())} (add one with --catalog YAML or register_catalog)"
        )
    return spec


def get_model(name: str | ModelSpec) -> ModelSpec:
    """Look a model up by name, alias or a path to a Hugging Face ``config.json``."""
    if isinstance(name, ModelSpec):
        return name
    spec = _user_models.get(_key(name)) or _builtin_models().get(_key(name))
    if spec is None and name.endswith(".json") and Path(name).is_file():
        spec = model_from_hf_config(Path(name))
    if spec is None:
        raise CatalogError(f"unknown model {name!r}; known: {', '.join(model_names())} (or give a config.json path)")
    return spec


NON_GATED_MODEL_TYPES = {"phi", "gpt2", "gpt_neox", "opt", "falcon", "gpt_bigcode", "bloom", "starcoder2"}


def model_from_hf_config(path: Path, name: str | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, Mixtral, Phi...)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CatalogError(f"{path}: not a readable config.json ({error})") from None
    if "text_config" in config:  # multimodal wrappers keep the language model's config inside
        config = config["text_config"]
    mapping = {
        "name": name or config.get("_name_or_path") or Path(path).parent.name,
        "hidden_size": config.get("hidden_size", config.get("n_embd")),
        "num_hidden_layers": config.get("num_hidden_layers", config.get("n_layer")),
        "num_attention_heads": config.get("num_attention_heads", config.get("n_head")),
        "num_key_value_heads": config.get("num_key_value_heads"),
        "head_dim": config.get("head_dim"),
        "intermediate_size": config.get("moe_intermediate_size")
        or config.get("intermediate_size")
        or config.get("ffn_hidden_size")
        or 4 * int(config.get("hidden_size", 0) or 0),
        "vocab_size": config.get("vocab_size"),
        "num_local_experts": config.get("num_local_experts") or config.get("num_experts") or 1,
        "num_experts_per_tok": config.get("num_experts_per_tok", 1),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "gated_mlp": config.get("model_type", "llama") not in NON_GATED_MODEL_TYPES,
        "source": str(path),
    }
    return _model_from_mapping(mapping, origin=str(path))


def register_catalog(path: str | Path) -> list[str]:
    """Add the GPUs and models of a user YAML file (``gpus:`` and ``models:`` lists); returns their names.

    A model entry may give ``config: path/to/config.json`` instead of the architecture fields.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise CatalogError(f"{path}: cannot read catalog YAML ({error})") from None
    if not isinstance(document, dict) or not set(document) <= {"gpus", "models"}:
        raise CatalogError(f"{path}: a catalog YAML holds only 'gpus' and 'models' lists")
    added = []
    for index, entry in enumerate(document.get("gpus") or []):
        spec = _gpu_from_mapping(entry, origin=f"{path} gpus[{index}]")
        _user_gpus[_key(spec.name)] = spec
        added.append(spec.name)
    for index, entry in enumerate(document.get("models") or []):
        origin = f"{path} models[{index}]"
        if "config" in entry:
            config_path = (path.parent / entry["config"]).resolve()
            spec = model_from_hf_config(config_path, name=entry.get("name"))
        else:
            spec = _model_from_mapping(entry, origin=origin)
        _user_models[_key(spec.name)] = spec
        added.append(spec.name)
    return added
