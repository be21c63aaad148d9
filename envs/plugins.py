"""A user's own policy from outside the checkout, by import path: ``package.module:Class`` (or
``package.module.Class``) on ``sys.path``, or ``path/to/file.py:Class``. The environments take one as their
``router=``/``batch=``/``pools=`` argument (a class is built with no arguments; a mapping with a ``_target_``
is built by hydra with its other keys), and ``servegym.agents.harness.plugin_policy_spec`` turns one into a
policy of the comparison harness, the leaderboard and ``evaluate.py``.

A file's folder is put on ``sys.path`` and the file imported as a module of its name, so the ``_target_``
that comes back (``module.Class``) also imports in the harness's spawned worker processes (they inherit
``sys.path``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class PluginError(ValueError):
    """A policy import path that does not import, or names something that is not a policy (named)."""


def looks_like_import_path(value: Any) -> bool:
    """Whether a string names a class by import path (``a.b:C``, ``a.b.C`` or ``file.py:C``) rather than a
    config name such as ``vllm_prism``."""
    return isinstance(value, str) and (":" in value or "." in value)


def import_target(ref: str) -> tuple[Any, str]:
    """The object an import path names, and the ``_target_`` string that imports it in any process."""
    if not looks_like_import_path(ref):
        raise PluginError(f"{ref!r} is not an import path (package.module:Class or path/to/file.py:Class)")
    module_name, _, attribute = ref.rpartition(":") if ":" in ref else ref.rpartition(".")
    if not module_name or not attribute:
        raise PluginError(f"{ref!r} is not an import path (package.module:Class or path/to/file.py:Class)")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"policy import path {ref!r} does not import: no file {path}")
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = path.stem
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a syntax error or a failing import inside the user's file counts too
        raise PluginError(f"policy import path {ref!r} does not import: {type(error).__name__}: {error}") from None
    if not hasattr(module, attribute):
        raise PluginError(f"policy import path {ref!r} does not import: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute), f"{module_name}.{attribute}"


def normalised(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``_target_`` mapping whose target may be a file path (``file.py:Class``), made importable by name."""
    spec = dict(spec)
    target = spec.get("_target_")
    if isinstance(target, str) and (":" in target or target.split(":")[0].endswith(".py")):
        spec["_target_"] = import_target(target)[1]
    return spec


def policy_object(what: str, value: Any, base: type) -> Any:
    """``value`` as a policy object of ``base``: an object as it is, a class by import path built with no
    arguments, a ``_target_`` mapping built by hydra; anything else is left for ``check_policy`` to refuse."""
    if looks_like_import_path(value):
        cls, _ = import_target(value)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{what}={value!r} is not a subclass of servegym.envs.sim.policies.{base.__name__}")
        return cls()
    if isinstance(value, Mapping) and "_target_" in value:
        from hydra.utils import instantiate

        return instantiate(normalised(value))
    return value
