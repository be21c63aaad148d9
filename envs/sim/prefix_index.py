"""What a router believes each engine's prefix cache holds: the prompt-segment hashes it sent there.

llm-d's prefix scorer and SGLang's router tree keep such an index instead of reading the engines' caches:
per engine, an LRU set of the hashes routed there, the least recently sent dropped once the engine's KV
capacity is covered. The cache-aware heuristics (:mod:`servegym.agents.routing.cache_aware`) and the
observation contract's ``prefix_match`` (:mod:`servegym.envs.features`) keep it the same way, in the
simulator and in the router service, from the ``hash_ids`` of the requests they route.
"""

from __future__ import annotations

from collections import OrderedDict

from servegym.envs.sim.view import ClusterView
from servegym.envs.sim.workload import SEGMENT_TOKENS


class PrefixIndex:
    """Per-engine LRU sets of prompt-segment hashes sent there."""

    def __init__(self) -> None:
        self._sets: dict[int, OrderedDict[int, None]] = {}

    def match(self, engine: int, hashes: tuple[int, ...]) -> int:
        """Leading segments of ``hashes`` this router believes ``engine`` holds."""
        held = self._sets.get(engine)
        count = 0
        if held is None:
            return 0
        for h in hashes:
            if h not in held:
                break
            count += 1
        return count

    def size(self, engine: int) -> int:
        return len(self._sets.get(engine, ()))

    def add(self, engine: int, hashes: tuple[int, ...], capacity_segments: int) -> None:
        held = self._sets.setdefault(engine, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > capacity_segments:
            held.popitem(last=False)


def capacity_segments(view: ClusterView, engine: int, segment_tokens: int = SEGMENT_TOKENS) -> int:
    """How many segments the engine's KV cache holds: the index's size before it forgets."""
    return max(1, view.engines[engine].kv_capacity_tokens // segment_tokens)
