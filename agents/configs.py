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
    group: str,
    names: list[str],
    overrides: Mapping[str, Any] | None = None,
    extra_dirs: list[str | Path] | tuple = (),
) -> dict[str, dict[str, Any]]:
    """``conf/<group>/<name>.yaml`` as plain mappings, with per-name overrides merged in; ``extra_dirs`` are
    searched after ``conf/`` (each either holding ``<name>.yaml`` itself or a ``<group>/`` folder, as a
    ``hydra.searchpath`` entry does), so a user's configs need not be copied into the checkout. An unknown
    name raises :class:`ConfigError` listing the known ones."""
    from omegaconf import OmegaConf

    folders = [CONF / group]
    for extra in extra_dirs:
        extra = Path(str(extra).removeprefix("file://")).expanduser()
        if not extra.is_dir():
            raise ConfigError(f"config folder {extra} (for {group} configs) is not a directory")
        folders.append(extra / group if (extra / group).is_dir() else extra)
    out = {}
    for name in names:
        path = next((f / f"{name}.yaml" for f in folders if (f / f"{name}.yaml").is_file()), None)
        if path is None:
            known = sorted({p.stem for f in folders for p in f.glob("*.yaml")})
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
