"""fleetllm.sched without a model: the KV cache manager and the scheduler, driven by fake
ModelRunnerOutputs."""

from __future__ import annotations

import pytest

from fleetllm.config import SchedulerConfig
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.kv_cache_manager import KVCacheManager
from fleetllm.sched.output import ModelRunnerOutput, SchedulerOutput
from fleetllm.sched.request import Request, RequestStatus
from fleetllm.sched.scheduler import Scheduler

BS = 4  # block size used throughout


def req(rid: str, tokens: list[int], salt: str | None = "", **params) -> Request:
    params.setdefault("max_tokens", 100)
    params.setdefault("ignore_eos", True)
    return Request(rid, tokens, SamplingParams(temperature=0, **params), (0,), salt)


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# ---- KVCacheManager ----------------------------------------------------------------------

def allocate(kv: KVCacheManager, r: Request) -> list[int]:
    computed, num_hit = kv.get_computed_blocks(r)
    new = kv.allocate_slots(r, r.num_tokens - num_hit, computed)
    assert new is not None
    r.num_computed_tokens = r.num_tokens
    return kv.block_ids(r)


def test_prefix_hits_for_shared_prefix():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    shared = toks(100, 8)  # two full blocks
    a = req("a", shared + [1, 2, 3])
    a_blocks = allocate(kv, a)
    assert len(a_blocks) == 3 and 0 not in a_blocks  # block 0 is the null block

    b = req("b", shared + [7, 8, 9, 10, 11])
    computed, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8 and [blk.block_id for blk in computed] == a_blocks[:2]
    b_blocks = allocate(kv, b)
    assert b_blocks[:2] == a_blocks[:2] and not set(b_blocks[2:]) & set(a_blocks)
    assert [kv.pool.blocks[i].ref_cnt for i in a_blocks] == [2, 2, 1]

    # Only the first block in common: the hash chain stops at the first difference.
    c = req("c", shared[:4] + [50, 51, 52, 53, 54])
    assert kv.get_computed_blocks(c)[1] == 4
    # A different first block shares nothing, even if a later block is equal.
    d = req("d", [9, 9, 9, 9] + shared[4:] + [1])
    assert kv.get_computed_blocks(d)[1] == 0
    # Another salt, or no salt, shares nothing.
    assert kv.get_computed_blocks(req("e", shared + [1], salt="other"))[1] == 0
    assert kv.get_computed_blocks(req("f", shared + [1], salt=None))[1] == 0
    # b was looked up twice (once above, once by allocate), c once.
    assert kv.prefix_hits == 8 + 8 + 4
    assert kv.prefix_queries > kv.prefix_hits


def test_prefix_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    allocate(kv, req("a", toks(1, 8)))
    # The same 8 tokens again: the second block must be recomputed for the last token.
    _, num_hit = kv.get_computed_blocks(req("b", toks(1, 8)))
    assert num_hit == 4
    _, num_hit = kv.get_computed_blocks(req("c", toks(1, 9)))
    assert num_hit == 8


def test_partial_blocks_are_not_cached():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    allocate(kv, req("a", toks(1, 6)))  # one full block, one partial
    _, num_hit = kv.get_computed_blocks(req("b", toks(1, 6) + toks(40, 5)))
    assert num_hit == 4


def test_ref_counts_and_free():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    total_free = kv.pool.num_free_blocks
    assert total_free == 9
    a, b = req("a", toks(1, 9)), req("b", toks(1, 9))
    a_blocks = allocate(kv, a)
    b_blocks = allocate(kv, b)
    assert b_blocks[:2] == a_blocks[:2] and b_blocks[2] != a_blocks[2]
    assert kv.pool.num_free_blocks == total_free - 4
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in b_blocks] == [1, 1, 1]
    assert kv.pool.num_free_blocks == total_free - 3  # only a's own last block came back
    assert kv.block_ids(a) == []
    kv.free(b)
    assert kv.pool.num_free_blocks == total_free
    assert all(kv.pool.blocks[i].ref_cnt == 0 for i in a_blocks + b_blocks)
    assert kv.usage == 0.0
    # Freed blocks stay cached until evicted.
    assert kv.get_computed_blocks(req("c", toks(1, 9)))[1] == 8


def test_allocation_fails_without_free_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable blocks
    a = req("a", toks(1, 8))
    allocate(kv, a)
    big = req("big", toks(100, 9))
    assert kv.allocate_slots(big, 9) is None
    assert kv.block_ids(big) == []
    assert kv.pool.num_free_blocks == 1
    assert kv.usage == pytest.approx(2 / 3)


def test_lru_eviction_order_of_freed_cached_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)  # 9 usable blocks
    a, b, c = req("a", toks(10, 9)), req("b", toks(30, 9)), req("c", toks(50, 9))
    for r in (a, b, c):
        allocate(kv, r)  # two cached full blocks + one partial block each
    assert kv.pool.num_free_blocks == 0
    kv.free(a)
    kv.free(b)
    kv.free(c)
    # Each request's blocks are freed tail first, so a's last full block is evicted first.
    d = req("d", toks(200, 3))
    allocate(kv, d)  # takes a's partial block (never cached)
    e = req("e", toks(300, 4))
    allocate(kv, e)  # evicts a's second full block
    assert kv.get_computed_blocks(req("qa", toks(10, 9)))[1] == 4
    assert kv.get_computed_blocks(req("qb", toks(30, 9)))[1] == 8
    f = req("f", toks(400, 4))
    allocate(kv, f)  # evicts a's first block
    assert kv.get_computed_blocks(req("qa2", toks(10, 9)))[1] == 0
    assert kv.get_computed_blocks(req("qb2", toks(30, 9)))[1] == 8
    # Reusing b's cached prefix makes it most recently used: c is evicted before it.
    b2 = req("b2", toks(30, 9))
    allocate(kv, b2)
    kv.free(b2)
    for i in range(3):
        allocate(kv, req(f"g{i}", toks(500 + 10 * i, 4)))
    assert kv.get_computed_blocks(req("qc", toks(50, 9)))[1] == 0
    assert kv.get_computed_blocks(req("qb3", toks(30, 9)))[1] == 8


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", toks(1, 9))
    allocate(kv, a)
    assert not kv.reset_prefix_cache()  # blocks in use
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("b", toks(1, 9)))[1] == 0


# ---- Scheduler -----------------------------------------------------------------------------

def make_scheduler(num_blocks=64, max_num_seqs=256, max_num_batched_tokens=8192,
                   max_model_len=256) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
    return Scheduler(cfg, num_blocks, BS)


def fake_run(sched: Scheduler, so: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """What a model runner returns: one token for each request whose known tokens are all
    computed after this step, nothing for unfinished prefill chunks."""
    ids = list(so.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        r = sched.requests[rid]
        sampled.append([token] if r.num_computed_tokens == r.num_tokens else [])
    return ModelRunnerOutput(ids, {rid: i for i, rid in enumerate(ids)}, sampled)


def step(sched: Scheduler, token: int = 7):
    so = sched.schedule()
    return so, sched.update_from_output(so, fake_run(sched, so, token))


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add_request(req(f"r{i}", toks(10 * i + 1, 5), max_tokens=3))
    so, outs = step(sched)
    assert set(so.num_scheduled_tokens) == {"r0", "r1"}
    assert [n.req_id for n in so.scheduled_new_reqs] == ["r0", "r1"]
    assert len(sched.running) == 2 and [r.request_id for r in sched.waiting] == ["r2"]
    assert [o.new_token_ids for o in outs] == [[7], [7]]
    while sched.has_unfinished_requests():
        so, _ = step(sched)
        assert len(so.num_scheduled_tokens) <= 2
    assert sched.kv.usage == 0.0


def test_chunked_prefill_respects_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(req("long", toks(1, 20), max_tokens=2))
    sched.add_request(req("short", toks(100, 3), max_tokens=2))
    so, outs = step(sched)
    assert so.num_scheduled_tokens == {"long": 8}
    assert so.total_num_scheduled_tokens == 8
    assert outs == [] and sched.requests["long"].num_computed_tokens == 8
    so, outs = step(sched)
    assert so.num_scheduled_tokens == {"long": 8}
    assert so.scheduled_cached_reqs.req_ids == ["long"]
    assert so.scheduled_cached_reqs.num_computed_tokens == [8]
    so, outs = step(sched)
    # The last 4 prompt tokens, then the short request fills the rest of the budget.
    assert so.num_scheduled_tokens == {"long": 4, "short": 3}
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("long", [7]), ("short", [7])]
    so, outs = step(sched)
    assert so.num_scheduled_tokens == {"long": 1, "short": 1}
    assert all(o.finish_reason == "length" for o in outs)
    assert not sched.has_unfinished_requests()
    assert sorted(sched.schedule().finished_req_ids) == ["long", "short"]


def test_budget_shared_by_decodes_and_prefill():
    sched = make_scheduler(max_num_batched_tokens=6)
    for i in range(4):
        sched.add_request(req(f"d{i}", [i + 1], max_tokens=10))
    step(sched)  # four 1-token prompts
    sched.add_request(req("p", toks(50, 10), max_tokens=1))
    so, _ = step(sched)
    assert so.num_scheduled_tokens == {"d0": 1, "d1": 1, "d2": 1, "d3": 1, "p": 2}


def test_preempts_last_running_request():
    # 6 usable blocks of 4 tokens; three 7-token prompts take two blocks each.
    sched = make_scheduler(num_blocks=7)
    for i in range(3):
        sched.add_request(req(f"r{i}", toks(20 * i + 1, 7), max_tokens=6, salt=None))
    step(sched)  # prefill: 7 tokens + 1 sampled = 8 tokens each, blocks full
    assert sched.kv.pool.num_free_blocks == 0
    so, _ = step(sched)  # decode of token 8 still fits the second block
    assert set(so.num_scheduled_tokens) == {"r0", "r1", "r2"}
    # Token 9 needs a third block each: r2, the last running request, is preempted.
    so, outs = step(sched)
    assert sched.num_preemptions == 1
    assert sched.get_num_unfinished_requests() == 3
    assert set(so.num_scheduled_tokens) == {"r0", "r1"}
    assert {o.request_id for o in outs} == {"r0", "r1"}
    victim = sched.requests["r2"]
    assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert list(sched.waiting) == [victim] and victim not in sched.running
    assert sched.kv.block_ids(victim) == []
    assert sched.stats()["num_preemptions"] == 1
    # It comes back with everything it had generated, recomputed from scratch.
    while sched.requests["r2"].status != RequestStatus.RUNNING:
        so, _ = step(sched)
    new = {n.req_id: n for n in so.scheduled_new_reqs}
    assert new["r2"].token_ids == toks(41, 7) + [7, 7]
    assert new["r2"].num_computed_tokens == 0
    while sched.has_unfinished_requests():
        step(sched)
    assert sched.kv.usage == 0.0


def test_preempted_request_keeps_waiting_order():
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks
    sched.add_request(req("a", toks(1, 7), max_tokens=4, salt=None))
    sched.add_request(req("b", toks(20, 7), max_tokens=4, salt=None))
    step(sched)
    sched.add_request(req("c", toks(40, 3), max_tokens=1, salt=None))
    step(sched)
    step(sched)  # a needs a third block: b is preempted and goes ahead of c
    assert [r.request_id for r in sched.waiting] == ["b", "c"]


def test_abort_frees_blocks():
    sched = make_scheduler(num_blocks=16)
    sched.add_request(req("a", toks(1, 9), salt=None))
    sched.add_request(req("b", toks(30, 9), salt=None))
    step(sched)
    sched.add_request(req("w", toks(60, 5), salt=None))
    used = sched.kv.pool.num_free_blocks
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free_blocks == used + 3
    assert [r.request_id for r in sched.running] == ["b"]
    sched.finish_requests(["w", "missing"], RequestStatus.FINISHED_ABORTED)
    assert not sched.waiting
    so, outs = step(sched)
    assert set(so.finished_req_ids) == {"a", "w"}
    assert set(so.num_scheduled_tokens) == {"b"}
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv.usage == 0.0


def test_outputs_after_abort_are_dropped():
    sched = make_scheduler()
    sched.add_request(req("a", toks(1, 5)))
    so = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    runner = ModelRunnerOutput(["a"], {"a": 0}, [[7]])
    assert sched.update_from_output(so, runner) == []


def test_stop_conditions():
    sched = make_scheduler(max_model_len=12)
    sched.add_request(req("eos", toks(1, 3), ignore_eos=False))
    sched.add_request(req("stop", toks(10, 3), stop_token_ids=[7]))
    sched.add_request(req("min", toks(20, 3), stop_token_ids=[7], min_tokens=2))
    sched.add_request(req("len", toks(30, 10)))
    so, outs = step(sched, token=7)
    by_id = {o.request_id: o for o in outs}
    assert by_id["stop"].finish_reason == "stop" and by_id["stop"].stop_reason == 7
    assert by_id["min"].finish_reason is None
    assert by_id["eos"].finish_reason is None  # 7 is not eos
    so, outs = step(sched, token=0)
    by_id = {o.request_id: o for o in outs}
    assert by_id["eos"].finish_reason == "stop" and by_id["eos"].stop_reason is None
    assert by_id["len"].finish_reason == "length"  # 12 tokens = max_model_len
    so, outs = step(sched, token=7)
    assert [(o.request_id, o.finish_reason, o.stop_reason) for o in outs] == [("min", "stop", 7)]
    assert not sched.has_unfinished_requests()


def test_prefix_cache_hits_in_scheduler():
    sched = make_scheduler()
    sched.add_request(req("a", toks(1, 9), max_tokens=1))
    while sched.has_unfinished_requests():
        step(sched)
    sched.add_request(req("b", toks(1, 9) + [99], max_tokens=1))
    so, _ = step(sched)
    assert so.num_scheduled_tokens == {"b": 2}
    assert so.scheduled_new_reqs[0].num_computed_tokens == 8
    stats = sched.stats()
    assert stats["prefix_cache_hits"] == 8


def test_copies_of_one_request_leave_room_for_a_later_one():
    """n=10 copies queued first hold at most half of max_num_seqs, so a request that
    arrives after them runs in the first step instead of after all the copies."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                      max_model_len=64), num_blocks=64, block_size=BS)
    for k in range(10):
        sched.add_request(req(f"{k}_big", toks(1, 5), n=10))
    sched.add_request(req("small", toks(50, 3)))
    out = sched.schedule()
    scheduled = set(out.num_scheduled_tokens)
    assert "small" in scheduled
    assert len(scheduled - {"small"}) == 2  # half of max_num_seqs
    assert len(sched.waiting) == 8
