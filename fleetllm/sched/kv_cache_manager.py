"""Block pool with a prefix cache of full blocks and LRU eviction of free cached blocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from fleetllm.sched.request import Request

NULL_BLOCK_ID = 0  # padding in block tables points here; it is never handed out


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front is evicted first.
        self.free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:]
        )
        self.cached: dict[bytes, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[KVCacheBlock]:
        out = []
        for _ in range(n):
            _, block = self.free.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference; blocks given first are evicted first once free."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free[block.block_id] = block

    def uncache(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Forgets these blocks' hashes: their KV was never computed (the step failed)."""
        for block in blocks:
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        if len(self.free) != len(self.blocks) - 1:
            return False
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        return True


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Blocks hashed since the last take_new_hashes(): their KV is computed by the step
        # being scheduled, so they leave the cache again if that step fails.
        self.new_hashes: list[KVCacheBlock] = []

    @property
    def usage(self) -> float:
        total = len(self.pool.blocks) - 1
        return 1.0 - self.pool.num_free_blocks / total

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks, leaving at least one token to compute."""
        if req.cache_salt is None:
            return [], 0
        hashes = req.update_block_hashes(self.block_size)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.cached.get(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed: list[KVCacheBlock] | None = None) -> list[int] | None:
        """Makes room for num_new_tokens more tokens; returns the block ids added, or None."""
        blocks = self.req_blocks.setdefault(req.request_id, [])
        computed = computed or []
        num_computed = req.num_computed_tokens + len(computed) * self.block_size
        need = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(computed)
        reclaimed = sum(1 for b in computed if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaimed:
            if not blocks:
                del self.req_blocks[req.request_id]
            return None
        self.pool.touch(computed)
        new = computed + self.pool.take(max(need, 0))
        blocks.extend(new)
        if req.cache_salt is not None:
            self._cache_full_blocks(req, blocks, min(num_computed + num_new_tokens, req.num_tokens))
        return [b.block_id for b in new]

    def _cache_full_blocks(self, req: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        # Blocks cached here are written by this step's forward pass before any attention
        # reads them, so a request scheduled in the same step may already share them.
        start = self.num_cached_blocks.get(req.request_id, 0)
        end = num_tokens // self.block_size
        if end <= start:
            return
        hashes = req.update_block_hashes(self.block_size)
        for i in range(start, end):
            block = blocks[i]
            if block.block_hash is None:
                block.block_hash = hashes[i]
                self.pool.cached.setdefault(hashes[i], block)
                self.new_hashes.append(block)
        self.num_cached_blocks[req.request_id] = end

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.num_cached_blocks.pop(req.request_id, None)
        self.pool.release(reversed(blocks))

    def trim(self, req: Request) -> None:
        """Frees the blocks past the request's known tokens: slots only rejected draft
        tokens used (never hashed: hashes cover known tokens only)."""
        blocks = self.req_blocks.get(req.request_id)
        keep = cdiv(req.num_tokens, self.block_size)
        if blocks is not None and len(blocks) > keep:
            extra = blocks[keep:]
            del blocks[keep:]
            self.pool.release(reversed(extra))

    def take_new_hashes(self) -> list[KVCacheBlock]:
        blocks, self.new_hashes = self.new_hashes, []
        return blocks

    def block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req.request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
