"""KV cache manager: which blocks each request owns, and prefix-cache lookups.

In: scheduling decisions (allocate slots for N new tokens of a request, free a request).
Out: per-request block ids (the rows of the block table) and prefix-cache hits. Called by the
Scheduler only.

Block hashes chain: hash(block i) = hash((hash(block i-1), tokens of block i)), so equal hashes
mean equal whole prefixes.
"""

from __future__ import annotations

from anybit.core.block_pool import BlockPool
from anybit.core.request import Request


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[int]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of each request already registered

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        """The request's memoized block hashes, computed up to at least ``num_full_blocks`` full
        blocks (the list may be longer: slice it)."""
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(chain_hash(parent, tuple(request.token_ids_range(i * bs, (i + 1) * bs))))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks: (block ids, number of tokens they cover).
        At least one token is always left to compute so that the step produces logits."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        self.pool.queries += 1
        for h in self._block_hashes(request, max_blocks)[:max_blocks]:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hit.append(block_id)
        if hit:
            self.pool.hits += 1
        return hit, len(hit) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens after request.num_computed_tokens (plus the
        prefix hit given by ``computed_blocks`` for a newly scheduled request). False if the pool
        cannot, in which case nothing changed."""
        blocks = self.req_blocks.get(request.request_id, [])
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total_needed = self.blocks_needed(num_computed + num_new_tokens)
        new_count = total_needed - len(blocks) - len(computed_blocks)
        # Cached blocks we are about to revive are on the free list too: they are not available.
        revive = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if new_count > self.pool.num_free_blocks - revive:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks = blocks + computed_blocks
        if new_count > 0:
            blocks = blocks + self.pool.allocate(new_count)
        self.req_blocks[request.request_id] = blocks
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full and computed in the prefix cache (only
        those not registered by an earlier call: a step costs O(new blocks), not O(context))."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))
