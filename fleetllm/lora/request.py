"""LoRARequest: which adapter a request runs under (vLLM's names and import path)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True):
    """An adapter, by a name for people, an id for the engine (> 0; 0 is the base model)
    and the PEFT directory it loads from (adapter_config.json, adapter_model.safetensors).

    Plain msgspec data: it travels inside typed engine and worker messages."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if (not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool)
                or self.lora_int_id < 1):
            raise ValueError(f"lora_int_id={self.lora_int_id!r} must be an integer >= 1 "
                             "(0 stands for the base model)")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
