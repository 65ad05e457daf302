"""Random PEFT adapters for a model config, for benchmarks (no peft needed to write them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fleetllm.config import ModelConfig
from fleetllm.lora.models import CONFIG_FILE, SUPPORTED_MODULES, WEIGHTS_FILE, module_shapes


def write_random_adapter(mc: ModelConfig, path: str | Path, rank: int, seed: int = 0,
                         targets: tuple[str, ...] = tuple(SUPPORTED_MODULES),
                         std: float = 0.01) -> Path:
    """Writes adapter_config.json and adapter_model.safetensors (A and B random, lora_alpha
    = 2 * rank) in PEFT's layout; returns the directory."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(mc)
    tensors = {}
    for layer in range(mc.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{SUPPORTED_MODULES[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "base_model_name_or_path": mc.model, "bias": "none", "use_rslora": False}, indent=2))
    return out
