from __future__ import annotations

from torch import nn

from fleetllm.model.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 differ from Llama only in flags ModelConfig already reads.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
