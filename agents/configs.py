"""The repository's config files by name (``conf/<group>/<name>.yaml``) and the code's git revision."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


class ConfigError(ValueError):
    """A name on the command line that no config file or saved policy answers to."""


def named_configs(
    group: str, names: list[str], overrides: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """``conf/<group>/<name>.yaml`` as plain mappings, with per-name overrides merged in; an unknown name
    raises :class:`ConfigError` listing the known ones."""
    from omegaconf import OmegaConf

    out = {}
    for name in names:
        path = CONF / group / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
            raise ConfigError(f"unknown {group} {name!r}; known: {', '.join(known)}")
        config = OmegaConf.load(path)
        if overrides and name in overrides:
            config = OmegaConf.merge(config, overrides[name])
        out[name] = OmegaConf.to_container(config, resolve=True)
    return out


def git_revision() -> str:
    """The commit of the checkout this code runs from, or ``unknown`` (no git, not a checkout)."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def is_trace(workload: Mapping[str, Any]) -> bool:
    """Whether a workload mapping replays a trace (its seed moves a window) rather than generating arrivals."""
    return workload.get("kind", "trace") == "trace"
