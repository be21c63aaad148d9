"""Fitted coefficients of the structural model, per GPU, and the profiles that ship them.

Every coefficient is dimensionless (a fraction of a datasheet peak) or a time in ms, so a GPU without
measurements borrows the efficiencies of its family and keeps its own datasheet peaks. The defaults
below are priors: what a GPU gets when neither it nor its family has been measured. Their values and
reasons are in ``docs/perfmodel.md``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from servegym.perfmodel.catalog import DATA_DIR, CatalogError, GpuSpec, get_gpu

ELEMENTWISE_KINDS = ("norm", "rope", "act", "add", "emb")

# Families without a measured member borrow from the nearest measured architecture.
FAMILY_FALLBACK = {"ada": "ampere", "blackwell": "hopper", "cdna3": "hopper"}


@dataclass(frozen=True)
class Coefficients:
    """The fitted constants of one GPU (efficiencies are fractions of the datasheet peak).

    GEMMs take ``launch + smoothmax(flops / (eff_f * peak), bytes / (eff_b * bandwidth))`` with a
    p-norm smooth maximum of order ``gemm_smoothness``, FLOPs counted on ``tokens + gemm_pad_tokens``
    rows (the tiles a small batch leaves idle); each elementwise kind ``launch + bytes /
    (eff * bandwidth)``; attention ``launch + flops / (eff_f * peak) + kv_bytes / (eff_b * bandwidth)``;
    an all-reduce ``latency + ring_bytes / (eff * link_bandwidth)``; every step pays ``step_overhead_ms``
    plus ``seq_overhead_ms`` per sequence for scheduling, input preparation and sampling on the CPU.
    ``host_launch_ms`` is the host's cost of launching one kernel eagerly (framework dispatch and the CUDA
    launch): the GPU part of a step cannot finish before the host has launched all of its kernels.
    ``request_overhead_ms`` is not a step term: the serving stack's time from a request's arrival to the
    scheduler seeing it (HTTP, tokenisation), which the simulated engine adds before queuing it; 0 unless a
    serving calibration measured it.
    """

    gemm_flops_eff: float = 0.70
    gemm_mem_eff: float = 0.80
    gemm_launch_ms: float = 0.006
    gemm_smoothness: float = 3.0
    gemm_pad_tokens: float = 64.0
    elem_mem_eff: dict[str, float] = field(
        default_factory=lambda: {"norm": 0.35, "rope": 0.45, "act": 0.55, "add": 0.8, "emb": 0.1}
    )
    elem_launch_ms: dict[str, float] = field(
        default_factory=lambda: {"norm": 0.003, "rope": 0.003, "act": 0.003, "add": 0.001, "emb": 0.002}
    )
    attn_flops_eff: float = 0.50
    attn_mem_eff: float = 0.60
    attn_launch_ms: float = 0.010
    comm_link_eff: float = 0.70
    comm_latency_ms: float = 0.020
    host_launch_ms: float = 0.005
    step_overhead_ms: float = 1.0
    seq_overhead_ms: float = 0.005
    request_overhead_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "profile") -> Coefficients:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise CatalogError(f"{origin}: unknown coefficient(s) {sorted(unknown)}")
        base = cls()
        merged = {}
        for name in known:
            if name not in values:
                continue
            value = values[name]
            if isinstance(getattr(base, name), dict):
                merged[name] = {**getattr(base, name), **{k: float(v) for k, v in value.items()}}
            else:
                merged[name] = float(value)
        return replace(base, **merged)

    def as_vector(self) -> np.ndarray:
        """Flat vector of all coefficients, in :meth:`vector_names` order (for fitting)."""
        return np.array([self.value(name) for name in self.vector_names()], dtype=np.float64)

    def value(self, name: str) -> float:
        """One coefficient by name; elementwise kinds are dotted (``elem_mem_eff.norm``)."""
        if "." in name:
            group, kind = name.split(".", 1)
            return getattr(self, group)[kind]
        return getattr(self, name)

    @staticmethod
    def vector_names() -> list[str]:
        names = []
        for f in fields(Coefficients):
            if f.name in ("elem_mem_eff", "elem_launch_ms"):
                names += [f"{f.name}.{kind}" for kind in ELEMENTWISE_KINDS]

            else:
                names.append(f.name)
        return names

    def with_values(self, values: dict[str, float]) -> Coefficients:
        """A copy with some coefficients (dotted names for elementwise kinds) replaced."""
        scalars: dict[str, Any] = {}
        nested = {
            "elem_mem_eff": dict(self.elem_mem_eff),
            "elem_launch_ms": dict(self.elem_launch_ms),
        }
        for name, value in values.items():
            if "." in name:
                group, kind = name.split(".", 1)
                nested[group][kind] = float(value)
            else:
                scalars[name] = float(value)
        return replace(self, **scalars, **nested)


def geometric_mean(sets: list[Coefficients]) -> Coefficients:
    """Coefficient-wise geometric mean: how a family summarises its measured members."""
    if len(sets) == 1:
        return sets[0]
    names = Coefficients.vector_names()
    stacked = np.array([c.as_vector() for c in sets])
    positive = np.all(stacked > 0, axis=0)  # a term that is zero somewhere (not measured there) averages plainly
    logs = np.log(np.where(positive, stacked, 1.0))
    means = np.where(positive, np.exp(logs.mean(axis=0)), stacked.mean(axis=0))
    return Coefficients().with_values(dict(zip(names, means, strict=True)))


@dataclass
class Profile:
    """Coefficients per GPU name, with provenance, and the family fallback for unmeasured GPUs."""

    name: str
    gpus: dict[str, Coefficients] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def coefficients(self, gpu: str | GpuSpec) -> Coefficients:
        """Coefficients of ``gpu``: its own if measured, else its family's, else the nearest family's, else priors.

        Borrowed all-reduce terms come only from members on the same kind of link (NVLink or not): an
        NVLink member's all-reduce (custom one-shot kernels over peer memory) says nothing of one over PCIe,
        which keeps the priors."""
        spec = get_gpu(gpu)
        if spec.name in self.gpus:
            return self.gpus[spec.name]
        family = spec.family
        members: list[str] = []
        while family is not None and not members:
            members = [name for name in self.gpus if _family_of(name) == family]
            family = FAMILY_FALLBACK.get(family)
        members = members or list(self.gpus)
        if not members:
            return Coefficients()
        borrowed = geometric_mean([self.gpus[name] for name in members])
        same_link = [name for name in members if _nvlink(name) == _nvlink(spec.name)]
        if not same_link:
            prior = Coefficients()
            return borrowed.with_values({name: prior.value(name) for name in COMM_TERMS})
        links = geometric_mean([self.gpus[name] for name in same_link])
        return borrowed.with_values({name: links.value(name) for name in COMM_TERMS})

    def source_of(self, gpu: str | GpuSpec) -> str:
        """Where :meth:`coefficients` takes ``gpu``'s values from, for reports."""
        spec = get_gpu(gpu)
        if spec.name in self.gpus:
            return "measured"
        family = spec.family
        while family is not None:
            members = sorted(name for name in self.gpus if _family_of(name) == family)
            if members:
                return f"family {family} ({', '.join(members)})"
            family = FAMILY_FALLBACK.get(family)
        return "all measured GPUs" if self.gpus else "priors"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provenance": self.provenance,
            "gpus": {name: c.to_dict() for name, c in sorted(self.gpus.items())},
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile JSON; a bare name loads a shipped profile (``default``)."""
        path = Path(path)
        if not path.suffix and not path.exists():
            path = DATA_DIR / "profiles" / f"{path}.json"
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CatalogError(f"{path}: cannot read profile ({error})") from None
        if not isinstance(document, dict) or "gpus" not in document:
            raise CatalogError(f"{path}: a profile is a JSON object with a 'gpus' mapping")
        gpus = {}
        for name, values in document["gpus"].items():
            gpus[get_gpu(name).name] = Coefficients.from_dict(values, origin=f"{path} gpus.{name}")
        return cls(name=document.get("name", path.stem), gpus=gpus, provenance=document.get("provenance", {}))


def _family_of(gpu_name: str) -> str:
    return get_gpu(gpu_name).family


def _nvlink(gpu_name: str) -> bool:
    return get_gpu(gpu_name).link.startswith("nvlink")


COMM_TERMS = ("comm_latency_ms", "comm_link_eff")


PROFILE_DIR = DATA_DIR / "profiles"
_REGISTERED: dict[str, Profile] = {}
_registry_version = 0  # bumped by every registration, so caches keyed on a profile name never go stale


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with the package (``default``: the Vidur fit)."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.json"))


def register_profile(profile: Profile) -> None:
    """Make an in-memory profile usable by its name wherever a profile is named (clusters, environments,
    policies): what a calibration loop does with each candidate instead of writing files."""
    global _registry_version
    _REGISTERED[profile.name] = profile
    _registry_version += 1  # invalidates the structural models built under the name; files stay cached


def registry_version() -> int:
    return _registry_version


def load_profile(ref: str | Profile | None = None) -> Profile:
    """The profile ``ref`` names: a registered name, a JSON file's path, or a shipped name (``default``
    when None). Anything else is a :class:`CatalogError` that lists what is known."""
    if isinstance(ref, Profile):
        return ref
    ref = "default" if ref is None else str(ref)
    if ref in _REGISTERED:
        return _REGISTERED[ref]
    return _load_file(ref)


@functools.lru_cache(maxsize=64)
def _load_file(ref: str) -> Profile:
    path = Path(ref)
    if path.is_file():
        return Profile.load(path)
    shipped = PROFILE_DIR / f"{ref}.json"
    if not path.suffix and shipped.is_file():
        return Profile.load(shipped)
    if ref == "default":  # the shipped fit is missing (a stripped install): the priors
        return Profile(name="priors")
    known = ", ".join(shipped_profiles() + sorted(_REGISTERED)) or "none"
    raise CatalogError(f"unknown profile {ref!r}: no such file, and not a shipped or registered profile ({known})")


def default_profile() -> Profile:
    """The shipped profile fitted on Vidur's A100/A40/H100 measurements (priors if it is missing)."""
    return load_profile("default")
