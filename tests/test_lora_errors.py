"""Adapters that cannot be served, LoRA settings, and the scheduler's adapter admission."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import msgspec
import pytest
import torch

from fleetllm.config import EngineArgs, SchedulerConfig
from fleetllm.engine.messages import EngineCoreRequest
from fleetllm.entrypoints.cli import _llm_kwargs, build_parser
from fleetllm.errors import ConfigurationError, LoRAAdapterError
from fleetllm.lora.models import load_lora_model
from fleetllm.lora.random_adapter import write_random_adapter
from fleetllm.lora.request import LoRARequest
from fleetllm.sched.request import Request, RequestStatus
from fleetllm.sched.scheduler import Scheduler
from tests.helpers import greedy, random_prompts
from tests.lora_helpers import ALL_SEVEN, make_adapter, make_core, references, run

pytest.importorskip("peft", reason="the LoRA tests need peft: pip install -e .[test]")

PROMPTS = random_prompts((9, 30), seed=5)


def _edit_config(path: Path, **changes: object) -> None:
    file = path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def _bad_adapters(base: Path, other_base: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """case -> (adapter directory, a piece of the error it must give)."""
    good = make_adapter(base, root / "good", 8, 16, ALL_SEVEN)
    cases: dict[str, tuple[Path, str]] = {
        "rank": (make_adapter(base, root / "rank", 32, 32, ("q_proj",)),
                 "r=32 is more than max_lora_rank=16"),
        "no_path": (root / "nowhere", "does not exist"),
        "shape": (make_adapter(other_base, root / "shape", 8, 8, ALL_SEVEN),
                  "was trained for another base model"),
        "embedding": (make_adapter(base, root / "embed", 4, 8, ("q_proj", "embed_tokens")),
                      "embed_tokens"),
        "lm_head": (make_adapter(base, root / "head", 4, 8, ("q_proj", "lm_head")),
                    "lm_head"),
    }
    for name, drop in (("no_config", "adapter_config.json"),
                       ("no_weights", "adapter_model.safetensors")):
        path = shutil.copytree(good, root / name)
        (path / drop).unlink()
        cases[name] = (path, f"{drop} is missing")
    lacks = shutil.copytree(good, root / "lacks")
    _edit_config(lacks, target_modules=["q_proj", "c_attn"])
    cases["lacks_module"] = (lacks, "'c_attn', which this model (LlamaForCausalLM) does not")
    tensor = shutil.copytree(good, root / "tensor")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tensor / "adapter_model.safetensors"))
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key.replace("q_proj", "qkv")] = weights.pop(key)
    save_file(weights, str(tensor / "adapter_model.safetensors"))
    cases["lacks_tensor"] = (tensor, "targets self_attn.qkv, which this model")
    return cases


def test_bad_adapters_fail_clearly_and_the_engine_goes_on(ckpt, tmp_path, caplog):
    base, other = ckpt("llama"), ckpt("llama", intermediate_size=96)
    cases = _bad_adapters(base, other, tmp_path)
    good = LoRARequest("good", 99, str(make_adapter(base, tmp_path / "ok", 4, 8, ("q_proj",))))
    want = references(base, PROMPTS, [good, None], 8)
    core = make_core(base)
    try:
        for k, (name, (path, message)) in enumerate(cases.items()):
            bad = LoRARequest(name, 10 + k, str(path))
            with pytest.raises(LoRAAdapterError, match="E004") as info:
                core.add_lora(bad)
            assert message in str(info.value) and repr(name) in str(info.value), name
            with pytest.raises(LoRAAdapterError):  # a request needing it fails alone
                core.add_request(EngineCoreRequest("bad", PROMPTS[0], greedy(8), [],
                                                   lora_request=bad))
            assert run(core, PROMPTS, [good, None], 8) == want, name
            assert 10 + k not in core.list_loras()
        renamed = LoRARequest("renamed", 99, str(tmp_path / "ok"))
        with pytest.raises(ValueError, match="already adapter 'good'"):
            core.add_lora(renamed)
        with pytest.raises(ValueError, match="not loaded"):
            core.pin_lora(77)
        # Trained on another base: a warning, and it is served.
        elsewhere = shutil.copytree(tmp_path / "ok", tmp_path / "elsewhere")
        _edit_config(elsewhere, base_model_name_or_path="someone/OtherModel-7B")
        with caplog.at_level(logging.WARNING, logger="fleetllm.lora.models"):
            assert core.add_lora(LoRARequest("elsewhere", 50, str(elsewhere)))
        assert "someone/OtherModel-7B" in caplog.text
    finally:
        core.shutdown()


def test_lora_off_says_how_to_turn_it_on(llama_dir):
    core = make_core(llama_dir, enable_lora=False)
    try:
        with pytest.raises(ConfigurationError, match="enable_lora=True"):
            core.add_lora(LoRARequest("a", 1, "/x"))
        with pytest.raises(ConfigurationError, match="enable_lora=True"):
            core.add_request(EngineCoreRequest("x", [1, 2], greedy(2), [],
                                               lora_request=LoRARequest("a", 1, "/x")))
    finally:
        core.shutdown()


def test_lora_settings_are_checked(llama_dir):
    cfg = EngineArgs(model=str(llama_dir), enable_lora=True, max_loras=3).create_engine_config()
    assert (cfg.lora_config.max_loras, cfg.lora_config.max_lora_rank,
            cfg.lora_config.max_cpu_loras) == (3, 16, 3)
    assert EngineArgs(model=str(llama_dir)).create_engine_config().lora_config is None
    for bad, match in (({"max_loras": 0}, "max_loras=0 must be a positive"),
                       ({"max_lora_rank": -1}, "max_lora_rank=-1"),
                       ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras=2 is fewer")):
        with pytest.raises(ConfigurationError, match=match):
            EngineArgs(model=str(llama_dir), enable_lora=True, **bad).create_engine_config()
    with pytest.raises(ValueError, match="lora_int_id=0"):
        LoRARequest("a", 0, "/x")
    req = EngineCoreRequest("r", [1], greedy(1), [], lora_request=LoRARequest("a", 3, "/p"))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(req), type=EngineCoreRequest) == req
    a = build_parser().parse_args(["generate", "hi", "--enable-lora", "--max-loras", "2",
                                   "--max-lora-rank", "64", "--max-cpu-loras", "5"])
    kw = _llm_kwargs(a)
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"], kw["max_cpu_loras"]) == (
        True, 2, 64, 5)


def test_random_adapter_for_benchmarks_loads(llama_dir, tmp_path):
    mc = EngineArgs(model=str(llama_dir)).create_engine_config().model_config
    path = write_random_adapter(mc, tmp_path / "rand", rank=8)
    lora = load_lora_model(LoRARequest("rand", 1, str(path)), mc, 16, torch.float32)
    assert lora.rank == 8 and lora.scaling == 2.0 and len(lora.weights) == 2 * 7
    with pytest.raises(LoRAAdapterError, match="r=8 is more than max_lora_rank=4"):
        load_lora_model(LoRARequest("rand", 1, str(path)), mc, 4, torch.float32)


def _req(name: str, lora_id: int | None) -> Request:
    lora = LoRARequest(f"a{lora_id}", lora_id, "/x") if lora_id else None
    return Request(name, [1, 2, 3], greedy(4), lora_request=lora)


def test_scheduler_holds_back_without_starving():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8), 64, 16, max_loras=1)
    for name, lora_id in (("a1", 1), ("b", 2), ("a2", 1), ("base", None)):
        sched.add_request(_req(name, lora_id))
    out = sched.schedule()
    # b would be a second adapter: held back, and a2 (behind it) may not pass it either;
    # the base-model request takes no slot.
    assert set(out.num_scheduled_tokens) == {"a1", "base"}
    assert [n.lora_request for n in out.scheduled_new_reqs][0].lora_int_id == 1
    sched.finish_requests(["a1"], RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"b"}  # adapter 1 drained; a2 now waits behind b
