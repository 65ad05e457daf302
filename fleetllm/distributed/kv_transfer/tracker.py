"""The scheduler side's view of running requests, rebuilt from each SchedulerOutput (as
the model runner does), so a connector knows when a request's prompt KV is complete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetllm.distributed.kv_transfer.base import lora_tag

if TYPE_CHECKING:
    from fleetllm.sched.output import SchedulerOutput


@dataclass
class TrackedRequest:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: list[int]
    lora_tag: str = ""
    num_computed_tokens: int = 0  # after the step being built
    saved: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class RequestTracker:
    def __init__(self) -> None:
        self.requests: dict[str, TrackedRequest] = {}

    def update(self, so: SchedulerOutput) -> list[TrackedRequest]:
        """Applies one step; returns the requests it schedules."""
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        stepped = []
        for new in so.scheduled_new_reqs:
            old = self.requests.get(new.req_id)
            t = TrackedRequest(new.req_id, list(new.token_ids[:new.num_prompt_tokens]),
                               list(new.block_ids), lora_tag(new),
                               new.num_computed_tokens + so.num_scheduled_tokens[new.req_id])
            if old is not None:  # preempted and back: what it saved stays saved
                t.saved, t.extra = old.saved, old.extra
            self.requests[new.req_id] = t
            stepped.append(t)
        c = so.scheduled_cached_reqs
        for req_id, blocks, computed in zip(c.req_ids, c.new_block_ids, c.num_computed_tokens):
            t = self.requests.get(req_id)
            if t is None:
                continue
            t.block_ids.extend(blocks)
            t.num_computed_tokens = computed + so.num_scheduled_tokens[req_id]
            stepped.append(t)
        return stepped

    def pop(self, req_id: str) -> TrackedRequest | None:
        return self.requests.pop(req_id, None)
