"""Automatic prefix caching: KV blocks of full prompt segments, identified by hash, shared across requests.

A prompt is a sequence of segments of ``segment_tokens`` tokens, each named by a hash (Mooncake's
``hash_ids``, one per 512 tokens, or hashes derived from a chat session). A computed full segment is
published: later requests whose prompt starts with the same hashes reuse its KV instead of recomputing
it. Entries are reference-counted; an entry no running request references stays cached but evictable,
and evictions go least-recently-released first, as vLLM's free-block queue does. The engine counts
evictable blocks as free: they are handed out (and their hashes forgotten) only when no plain free block
is left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    """Reference-counted segment cache of one engine (sizes in KV blocks of the engine's block size)."""

    def __init__(self, segment_tokens: int, block_size: int) -> None:
        if segment_tokens % block_size:
            raise ValueError(
                f"prefix segment of {segment_tokens} tokens is not a whole number of {block_size}-token KV blocks"
            )
        self.segment_tokens = segment_tokens
        self.blocks_per_segment = segment_tokens // block_size
        self.refs: dict[int, int] = {}  # referenced entries: hash -> running requests holding it
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced entries, least recent first
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def evictable_blocks(self) -> int:
        return len(self.evictable) * self.blocks_per_segment

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading segments of ``hashes`` are cached (referenced or evictable)."""
        count = 0
        for h in hashes:
            if h not in self.refs and h not in self.evictable:
                break
            count += 1
        return count

    def match_cost(self, hashes: Sequence[int]) -> int:
        """Blocks that acquiring ``hashes`` would take out of the free pool (the evictable ones)."""
        return sum(self.blocks_per_segment for h in hashes if h in self.evictable)

    def acquire(self, hashes: Sequence[int]) -> int:
        """Reference cached segments; returns the blocks that stop being evictable (leave the free pool)."""
        revived = 0
        for h in hashes:
            if h in self.evictable:
                del self.evictable[h]
                self.refs[h] = 1
                revived += 1
            else:
                self.refs[h] += 1
        return revived * self.blocks_per_segment

    def publish(self, hashes: Sequence[int]) -> list[int]:
        """Register freshly computed segments (referenced by their owner); returns the ones newly cached."""
        added = []
        for h in hashes:
            if h in self.refs or h in self.evictable:
                continue  # someone else published it meanwhile: the owner's copy stays private
            self.refs[h] = 1
            added.append(h)
        return added

    def release(self, hashes: Sequence[int]) -> int:
        """Drop references; returns the blocks that become evictable (return to the free pool)."""
        freed = 0
        for h in hashes:
            count = self.refs[h] - 1
            if count:
                self.refs[h] = count
            else:
                del self.refs[h]
                self.evictable[h] = None
                freed += 1
        return freed * self.blocks_per_segment

    def evict(self, blocks: int) -> int:
        """Forget least recently released entries until ``blocks`` blocks are reclaimed; returns blocks evicted."""
        evicted = 0
        while evicted < blocks and self.evictable:
            self.evictable.popitem(last=False)
            evicted += self.blocks_per_segment
        return evicted
