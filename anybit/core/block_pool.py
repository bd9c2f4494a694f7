"""Block pool: the free list of KV blocks, their reference counts and the prefix-cache index.

In: block requests from the KVCacheManager. Out: block ids. A freed block whose content hash is
known stays in the prefix-cache index until it is reused for something else (LRU eviction:
blocks are reused in the order they were freed).
"""

from __future__ import annotations

from collections import OrderedDict


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None


class BlockPool:
    """``num_blocks`` blocks; block ids index the first dimension of every layer's KV cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.hits = 0
        self.queries = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner (cached-but-unused ones count as free: they can be evicted)."""
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks off the free list (evicting their cached content)."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (prefix hit); revives them from the free list."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self._free.pop(block_id)
            block.ref_cnt += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; the last reference returns it to the free list.
        Pass blocks tail first so that a sequence's last blocks are evicted before its first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"KV block {block_id} freed more often than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Record that ``block_id`` holds the full block whose content hash is ``block_hash``."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()

    def check_all_free(self) -> bool:
        return len(self._free) == self.num_blocks and all(b.ref_cnt == 0 for b in self.blocks)
