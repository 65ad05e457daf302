"""Multi-LoRA serving through EngineCore: parity with transformers + peft (mixed batches,
both delta strategies), the prefix cache keyed by adapter, slots and host-memory eviction,
and adapters that cannot be served."""

from __future__ import annotations

import pytest

import fleetllm.lora.ops as lora_ops
from tests.helpers import random_prompts
from tests.lora_helpers import make_adapters, make_core, references, run

pytest.importorskip("peft", reason="the LoRA tests need peft: pip install -e .[test]")

PROMPTS = random_prompts((3, 9, 17, 30, 41, 64, 77, 100, 5, 12, 20, 33), seed=3)
MAX_TOKENS = 16


def _mixed(loras):
    """Twelve requests: the three adapters in turn, every fourth one on the base model."""
    return [None if i % 4 == 3 else loras[i % 3] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, ckpt, tmp_path_factory):
    base = ckpt(request.param)
    loras = make_adapters(base, tmp_path_factory.mktemp(f"lora_{request.param}"))
    per = _mixed(loras)
    return base, loras, per, references(base, PROMPTS, per, MAX_TOKENS)


@pytest.mark.parametrize("strategy", ["auto", "dense", "segmented"])
def test_mixed_batch_matches_peft(setup, strategy, monkeypatch):
    base, loras, per, want = setup
    base_only = references(base, PROMPTS, [None] * len(PROMPTS), MAX_TOKENS)
    # The adapters must change the outputs, or parity means little.
    assert sum(w != b for w, b, x in zip(want, base_only, per) if x is not None) >= 6
    if strategy != "auto":
        big = 1 << 40 if strategy == "dense" else 0
        monkeypatch.setattr(lora_ops, "DENSE_MAX_WORK", big)
        monkeypatch.setattr(lora_ops, "DENSE_MAX_SLOT_RANK", big)
    used = []
    prepare = lora_ops.LoRAMapping.prepare

    def spy(self, *args, **kwargs):
        prepare(self, *args, **kwargs)
        if self.active:
            used.append("dense" if self.dense else "segmented")

    monkeypatch.setattr(lora_ops.LoRAMapping, "prepare", spy)
    core = make_core(base)
    try:
        got = run(core, PROMPTS, per, MAX_TOKENS)
        assert core.list_loras() == {1, 2, 3}
    finally:
        core.shutdown()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} under {per[i]} differs from transformers + peft"
    assert used and (strategy == "auto" or set(used) == {strategy})


def test_prefix_cache_is_keyed_by_adapter(setup):
    base, loras, _, _ = setup
    prompt = random_prompts((70,), seed=11)[0]
    order = [loras[0], loras[1], None, loras[0]]
    want = references(base, [prompt] * 4, order, MAX_TOKENS)
    assert len({tuple(w) for w in want}) == 3
    core = make_core(base, enable_prefix_caching=True)
    try:
        got = []
        for lora in order:  # one at a time: each may reuse the blocks the previous cached
            got += run(core, [prompt], [lora], MAX_TOKENS)
        stats = core.stats()
    finally:
        core.shutdown()
    assert got == want
    assert stats["prefix_cache_hits"] >= 64  # the repeat under the first adapter hit


def test_two_slots_four_adapters(ckpt, tmp_path):
    base = ckpt("llama")
    specs = [(4, 8, ("q_proj", "v_proj"), False), (8, 8, ("o_proj", "down_proj"), False),
             (8, 16, ("gate_proj", "up_proj", "k_proj"), True), (16, 32, ("q_proj",), False)]
    loras = make_adapters(base, tmp_path, tuple(specs))
    per = [loras[i % 4] if i % 5 != 4 else None for i in range(len(PROMPTS))]
    want = references(base, PROMPTS, per, MAX_TOKENS)
    core = make_core(base, max_loras=2)
    by_id = {f"r{i}": lora for i, lora in enumerate(per)}
    seen: list[set[int]] = []
    schedule = core.scheduler.schedule

    def recording():
        out = schedule()
        seen.append({by_id[r].lora_int_id for r in out.num_scheduled_tokens if by_id[r]})
        return out

    core.scheduler.schedule = recording
    try:
        got = run(core, PROMPTS, per, MAX_TOKENS)
    finally:
        core.shutdown()
    assert got == want
    assert max(len(s) for s in seen) == 2
    assert set().union(*seen) == {1, 2, 3, 4}


def test_host_cache_evicts_lru_and_keeps_pinned(ckpt, tmp_path):
    base = ckpt("llama")
    loras = make_adapters(base, tmp_path)
    prompts = PROMPTS[:3]
    want = {lora.lora_int_id: references(base, prompts, [lora] * 3, MAX_TOKENS)
            for lora in loras}
    core = make_core(base, max_loras=1, max_cpu_loras=2)
    try:
        assert core.add_lora(loras[0]) and core.add_lora(loras[1])
        assert not core.add_lora(loras[1])  # already loaded
        assert core.pin_lora(1)
        with pytest.raises(ValueError, match="max_cpu_loras=2"):
            core.pin_lora(2)  # would leave no room for any other adapter
        seen = []
        for k in (2, 1, 0, 1, 2, 0):  # id 3 evicts 2, 2 evicts 3, ...; pinned 1 stays
            lora = loras[k]
            assert run(core, prompts, [lora] * 3, MAX_TOKENS) == want[lora.lora_int_id]
            seen.append(core.list_loras())
        assert seen == [{1, 3}, {1, 2}, {1, 2}, {1, 2}, {1, 3}, {1, 3}]
        assert core.remove_lora(3) and not core.remove_lora(3)
        assert 3 not in core.list_loras()
    finally:
        core.shutdown()
