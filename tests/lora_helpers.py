"""Helpers of the LoRA tests: random PEFT adapters, peft references, engine-core runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fleetllm.config import EngineArgs
from fleetllm.engine.core import EngineCore
from fleetllm.engine.messages import EngineCoreRequest
from fleetllm.lora.request import LoRARequest
from tests.helpers import greedy

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_SEVEN = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
# (rank, lora_alpha, target modules, use_rslora): the three adapters.
ADAPTER_SPECS = ((4, 8, ATTENTION, False), (8, 16, ALL_SEVEN, False),
                 (16, 8, ("q_proj", "v_proj", "up_proj", "down_proj"), True))


def make_adapter(base: Path, out: Path, r: int, alpha: int, targets: tuple[str, ...],
                 rslora: bool = False, seed: int = 0) -> Path:
    """A PEFT adapter whose A and B are both random (non-zero B), saved as peft does."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                          use_rslora=rslora, init_lora_weights=False, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    wrapped.save_pretrained(out)
    return out


def make_adapters(base: Path, root: Path, specs: tuple = ADAPTER_SPECS,
                  first_id: int = 1) -> list[LoRARequest]:
    requests = []
    for k, (r, alpha, targets, rslora) in enumerate(specs):
        path = make_adapter(base, root / f"adapter{k}", r, alpha, targets, rslora, seed=k + 1)
        requests.append(LoRARequest(f"adapter{k}", first_id + k, str(path)))
    return requests


def peft_greedy(base: Path, adapter: LoRARequest | None, prompts: list[list[int]],
                max_new_tokens: int) -> list[list[int]]:
    """transformers (+ peft for an adapter) greedy continuations, one prompt at a time."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter.lora_path)
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(input_ids=torch.tensor([p]), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=None,
                                 pad_token_id=0)
            out.append(seq[0, len(p):].tolist())
    return out


def references(base: Path, prompts: list[list[int]], loras: list[LoRARequest | None],
               max_new_tokens: int) -> list[list[int]]:
    """Each prompt's reference under its own adapter (or none)."""
    want: list[list[int] | None] = [None] * len(prompts)
    for lora in dict.fromkeys(loras):
        idx = [i for i, x in enumerate(loras) if x == lora]
        for i, ids in zip(idx, peft_greedy(base, lora, [prompts[i] for i in idx],
                                           max_new_tokens)):
            want[i] = ids
    return want  # type: ignore[return-value]


def make_core(model: Path, **kwargs: Any) -> EngineCore:
    args = dict(enable_lora=True, max_loras=4, max_lora_rank=16, max_num_seqs=16,
                kv_cache_memory_bytes=8 * 2**20)
    args.update(kwargs)
    core = EngineCore(EngineArgs(model=str(model), **args).create_engine_config())
    torch.set_num_threads(1)
    return core


def run(core: EngineCore, prompts: list[list[int]], loras: list[LoRARequest | None],
        max_tokens: int = 16, on_step: Any = None) -> list[list[int]]:
    """Adds every request, steps until all finish; each one's output token ids."""
    for i, (p, lora) in enumerate(zip(prompts, loras)):
        core.add_request(EngineCoreRequest(f"r{i}", p, greedy(max_tokens), [],
                                           lora_request=lora))
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for o in core.step():
            assert o.error is None, o.error
            outs[o.request_id].extend(o.new_token_ids)
        if on_step is not None:
            on_step()
    return [outs[f"r{i}"] for i in range(len(prompts))]
