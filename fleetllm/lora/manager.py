"""A worker's adapters: a host-memory LRU (max_cpu_loras, pins exempt) and the max_loras
slots next to the weights that a step's adapters are copied into.

A request carries its LoRARequest, so an adapter evicted from host memory (or never added
to a restarted worker) is read again from its lora_path when a step needs it; the engine
core checked it with add_lora before the request was queued.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fleetllm.config import LoRAConfig, ModelConfig
from fleetllm.errors import LoRAAdapterError
from fleetllm.lora.layers import LoRALinear, attach_lora
from fleetllm.lora.models import LoRAModel, load_lora_model
from fleetllm.lora.ops import LoRAMapping
from fleetllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, config: LoRAConfig, model_config: ModelConfig, dtype: torch.dtype) -> None:
        self.config = config
        self.model_config = model_config
        self.dtype = dtype
        self.cache: OrderedDict[int, LoRAModel] = OrderedDict()  # least recently used first
        self.pinned: set[int] = set()
        self.mapping = LoRAMapping()
        self.layers: dict[int, list[LoRALinear]] = {}
        self.layer_range = range(0)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first

    def attach(self, model: nn.Module) -> None:
        """Hooks the (re)loaded model's layers; the slots start empty."""
        cfg = self.config
        self.layers = attach_lora(model, cfg.max_loras, cfg.max_lora_rank, self.mapping)
        self.layer_range = range(model.start_layer, model.end_layer)
        self.slot_of.clear()
        self.mapping.clear()

    # ---- the host-memory cache (the add/remove/pin/list of the worker) ---------------
    def add(self, request: LoRARequest) -> bool:
        """Loads and checks the adapter; False if it is already loaded."""
        if request.lora_int_id in self.cache:
            self.cache.move_to_end(request.lora_int_id)
            return False
        self._load(request, keep=())
        return True

    def remove(self, lora_id: int) -> bool:
        self.pinned.discard(lora_id)
        self.slot_of.pop(lora_id, None)  # its slot is overwritten when next given out
        return self.cache.pop(lora_id, None) is not None

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.cache:
            raise LoRAAdapterError(f"LoRA adapter id {lora_id} is not loaded; add_lora it "
                                   "before pinning it")
        if lora_id not in self.pinned and len(self.pinned) + 1 >= self.config.max_cpu_loras:
            raise LoRAAdapterError(
                f"pinning adapter {lora_id} would leave no room in host memory for any "
                f"other adapter (max_cpu_loras={self.config.max_cpu_loras}, pinned: "
                f"{sorted(self.pinned)}); raise max_cpu_loras or unpin one (remove_lora)")
        self.pinned.add(lora_id)
        return True

    def list(self) -> set[int]:
        return set(self.cache)

    def _load(self, request: LoRARequest, keep: Sequence[int]) -> LoRAModel:
        """Reads the adapter into the cache, evicting the least recently used adapter that
        is neither pinned nor in `keep` when the cache is full."""
        lora = load_lora_model(request, self.model_config, self.config.max_lora_rank,
                               self.dtype, self.layer_range)
        self.cache.pop(request.lora_int_id, None)  # an older adapter under the same id
        while len(self.cache) >= self.config.max_cpu_loras:
            victim = next((i for i in self.cache if i not in self.pinned and i not in keep),
                          None)
            if victim is None:
                raise LoRAAdapterError(
                    f"cannot load LoRA adapter {request.lora_name!r}: all "
                    f"max_cpu_loras={self.config.max_cpu_loras} adapters in host memory are "
                    "pinned or in use; raise max_cpu_loras")
            logger.info("evicting LoRA adapter %d from host memory (max_cpu_loras=%d)",
                        victim, self.config.max_cpu_loras)
            del self.cache[victim]
        self.cache[request.lora_int_id] = lora
        return lora

    # ---- one step -----------------------------------------------------------------------
    def prepare(self, requests: Sequence[LoRARequest | None], counts: Sequence[int],
                device: torch.device) -> None:
        """Puts this step's adapters in slots and gives each token its slot."""
        wanted = list(dict.fromkeys(r for r in requests if r is not None))
        if not wanted:
            self.mapping.clear()
            return
        if len(wanted) > self.config.max_loras:
            raise RuntimeError(f"a step has {len(wanted)} adapters but max_loras="
                               f"{self.config.max_loras}: the scheduler must hold some back")
        ids = [r.lora_int_id for r in wanted]
        slot_of_request = {r: self._slot(r, ids) for r in wanted}
        per_request = np.fromiter((-1 if r is None else slot_of_request[r] for r in requests),
                                  np.int64, len(requests))
        token_slots = np.repeat(per_request, np.asarray(counts, dtype=np.int64))
        self.mapping.prepare(token_slots, self.dtype, device, self.config.max_lora_rank)

    def _slot(self, request: LoRARequest, step_ids: list[int]) -> int:
        lora_id = request.lora_int_id
        slot = self.slot_of.get(lora_id)
        if slot is not None:
            self.slot_of.move_to_end(lora_id)
            return slot
        lora = self.cache.get(lora_id)
        if lora is None or lora.request != request:
            logger.info("loading LoRA adapter %r (id %d) from %s", request.lora_name, lora_id,
                        request.lora_path)
            lora = self._load(request, keep=step_ids)
        else:
            self.cache.move_to_end(lora_id)
        taken = set(self.slot_of.values())
        free = [s for s in range(self.config.max_loras) if s not in taken]
        if free:
            slot = free[0]  # the lowest: the dense strategy spans slots 0..highest used
        else:
            victim = next(i for i in self.slot_of if i not in step_ids)
            slot = self.slot_of.pop(victim)
        for index, linears in self.layers.items():
            for linear in linears:
                linear.set_slot(slot, [lora.weights.get((index, sub)) for sub in linear.subs])
        self.slot_of[lora_id] = slot
        return slot
