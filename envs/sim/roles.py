"""The roles an instance plays in a cluster, and the one rule every change of role obeys."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class Role(StrEnum):
    """What an instance serves. ``DRAINING``: leaving its role (a drain flip), it takes no new work."""

    BOTH = "both"  # colocated: prefill and decode
    PREFILL = "prefill"
    DECODE = "decode"
    DRAINING = "draining"

    @property
    def accepts_new(self) -> bool:
        """Takes newly arriving requests (prefill or both)."""
        return self in TAKES_NEW

    @property
    def accepts_decode(self) -> bool:
        """Takes decodes handed over by prefill instances (decode or both)."""
        return self in TAKES_DECODE


SERVING_ROLES = (Role.BOTH, Role.PREFILL, Role.DECODE)  # the roles a configuration or a flip may ask for
TAKES_NEW = frozenset((Role.BOTH, Role.PREFILL))  # (sets: the views' candidate lists test them per decision)
TAKES_DECODE = frozenset((Role.BOTH, Role.DECODE))


def flip_allowed(roles: Sequence[Role], index: int, target: Role) -> bool:
    """Whether instance ``index`` may take ``target`` without leaving the cluster with no instance that
    takes new requests or none that decodes (the one rule every pool flip obeys)."""
    rest = [role for i, role in enumerate(roles) if i != index] + [target]
    return any(role.accepts_new for role in rest) and any(role.accepts_decode for role in rest)
