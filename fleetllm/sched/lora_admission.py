"""At most max_loras distinct adapters per step, without starving anyone.

Every running request is scheduled each step, so bounding the adapters of the running
requests bounds each step's. A waiting request whose adapter would be one too many is held
back; from then on, in this step, only base-model requests may pass it (they take no slot).
Requests for the adapters already running no longer join, so those adapters drain as their
requests finish, and the held-back request gets its slot: first come, first served.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetllm.sched.request import Request


class LoRAAdmission:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.active: set[int] = set()
        self.held_back = False

    def start_step(self, running: Iterable[Request]) -> None:
        self.active = {r.lora_int_id for r in running if r.lora_int_id}
        self.held_back = False

    def admits(self, req: Request) -> bool:
        """Whether req may start now; call in waiting order."""
        lora_id = req.lora_int_id
        if not lora_id:
            return True
        if self.held_back:
            return False
        if lora_id in self.active or len(self.active) < self.max_loras:
            return True
        self.held_back = True
        return False

    def admitted(self, req: Request) -> None:
        if req.lora_int_id:
            self.active.add(req.lora_int_id)
