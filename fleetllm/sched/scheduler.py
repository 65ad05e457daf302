"""One token budget per step: running requests first, then waiting ones (vLLM v1 style)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fleetllm.config import SchedulerConfig
from fleetllm.sched.kv_cache_manager import KVCacheBlock, KVCacheManager
from fleetllm.sched.kv_transfer import KVTransferScheduling
from fleetllm.sched.lora_admission import LoRAAdmission
from fleetllm.sched.output import (
    CachedRequestData,
    DraftTokenIds,
    EngineCoreOutput,
    LogprobsLists,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from fleetllm.sched.request import Request, RequestStatus
from fleetllm.spec_decode.metrics import SpecDecodingStats

if TYPE_CHECKING:
    from fleetllm.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int,
                 structured_outputs: StructuredOutputManager | None = None,
                 num_speculative_tokens: int = 0, max_loras: int | None = None,
                 kv_transfer: KVTransferScheduling | None = None) -> None:
        self.config = config
        # A KV connector's requests waiting for their KV or held while sent; None: off.
        self.kv_transfer = kv_transfer
        # LoRA: at most max_loras distinct adapters per step; None when LoRA is off.
        self.lora = LoRAAdmission(max_loras) if max_loras else None
        # Speculative decoding's counters; None when it is off.
        self.spec_stats = (SpecDecodingStats(num_speculative_tokens)
                           if num_speculative_tokens else None)
        # Grammars of structured-output requests; None: the engine has no tokenizer for them.
        self.structured = structured_outputs
        self.kv = KVCacheManager(num_blocks, block_size)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: list[str] = []
        self.num_preemptions = 0
        # Steps sent to the workers and not yet answered, with the blocks each one hashed.
        self.in_flight: list[tuple[SchedulerOutput, list[KVCacheBlock]]] = []
        # The limits in force: lowered after an out-of-memory step, raised again later.
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs

    def add_request(self, req: Request) -> None:
        if req.sampling_params.structured_outputs is not None:
            self._add_grammar(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> None:
        for req_id in req_ids:
            req = self.requests.pop(req_id, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.kv_transfer.abort(req, self.kv)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)

    def _free(self, req: Request) -> None:
        if self.structured is not None:
            self.structured.remove_request(req.request_id)
        if self.kv_transfer is None or not self.kv_transfer.request_finished(req, self.kv):
            self.kv.free(req)
        self.finished_req_ids.append(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or (self.kv_transfer is not None
                                       and self.kv_transfer.has_work())

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def _preempt(self, victim: Request) -> None:
        self.kv.free(victim)
        victim.num_output_placeholders = 0  # its in-flight outputs will be dropped
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        self.waiting.appendleft(victim)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        max_len = self.config.max_model_len
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData()
        spec_tokens: dict[str, list[int]] = {}
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            pending = req.num_output_placeholders
            num_new = min(req.num_tokens + pending - req.num_computed_tokens, budget,
                          max_len - req.num_computed_tokens)
            if num_new <= 0 or (pending and self._will_finish(req)):
                i += 1  # its last step is still in flight, or that step will be its last
                continue
            drafts = self._drafts(req, num_new, budget) if req.spec_token_ids else []
            num_new += len(drafts)
            while (new_block_ids := self.kv.allocate_slots(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if new_block_ids is None:
                break
            num_scheduled[req.request_id] = num_new
            if drafts:
                spec_tokens[req.request_id] = drafts
            budget -= num_new
            cached.req_ids.append(req.request_id)
            cached.new_token_ids.append(req.all_token_ids[req.num_sent_tokens:])
            cached.new_block_ids.append(new_block_ids)
            cached.num_computed_tokens.append(req.num_computed_tokens)
            req.num_sent_tokens = req.num_tokens
            i += 1

        group_running: dict[str, int] = {}
        for r in self.running:
            if r.group is not None:
                group_running[r.group] = group_running.get(r.group, 0) + 1
        if self.lora is not None:
            self.lora.start_step(self.running)
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            req = self._next_waiting(group_running)
            if req is None:
                break
            if self.kv_transfer is not None and self.kv_transfer.start_load(req, self.kv):
                self.waiting.remove(req)  # back once every worker has loaded its KV
                continue
            computed, num_hit = self.kv.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_hit, budget)
            if self.kv.allocate_slots(req, num_new, computed) is None:
                break
            self.waiting.remove(req)
            if self.lora is not None:
                self.lora.admitted(req)
            if req.group is not None:
                group_running[req.group] = group_running.get(req.group, 0) + 1
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_scheduled[req.request_id] = num_new
            budget -= num_new
            new_reqs.append(NewRequestData(
                req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                req.sampling_params, self.kv.block_ids(req), num_hit, list(req.eos_token_ids),
                req.lora_request,
            ))
            req.num_sent_tokens = req.num_tokens

        for req_id, n in num_scheduled.items():
            req = self.requests[req_id]
            req.num_computed_tokens += n
            if self.config.async_scheduling and (
                    req.num_computed_tokens == req.num_tokens + req.num_output_placeholders):
                req.num_output_placeholders += 1  # this step samples; the worker keeps it
        finished, self.finished_req_ids = self.finished_req_ids, []
        out = SchedulerOutput(new_reqs, cached, num_scheduled, sum(num_scheduled.values()),
                              finished, scheduled_spec_decode_tokens=spec_tokens)
        self._attach_grammar_bitmask(out)
        if self.kv_transfer is not None:
            out.kv_connector_metadata = self.kv_transfer.connector.build_connector_meta(out)
        if out.total_num_scheduled_tokens:  # an empty step is never sent to the workers
            self.in_flight.append((out, self.kv.take_new_hashes()))
        return out

    def _next_waiting(self, group_running: dict[str, int]) -> Request | None:
        """The first waiting request whose n > 1 group holds fewer than half the running
        slots: a request's copies (n up to --max-n) cannot keep a later request waiting
        until they all finish. None when only such copies wait and the cap is reached."""
        cap = max(1, self.max_num_seqs // 2)
        for req in self.waiting:
            if (req.group is None or group_running.get(req.group, 0) < cap) and (
                    self.lora is None or self.lora.admits(req)):
                return req
        return None

    def _will_finish(self, req: Request) -> bool:
        """Whether the outputs already in flight take the request to max_tokens or
        max_model_len, so scheduling it again would be wasted."""
        future = req.num_tokens + req.num_output_placeholders
        max_tokens = req.sampling_params.max_tokens
        return future >= self.config.max_model_len or (
            max_tokens is not None and future - req.num_prompt_tokens >= max_tokens)

    def update_from_output(self, sched_out: SchedulerOutput,
                           runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        self.in_flight = [(so, b) for so, b in self.in_flight if so is not sched_out]
        outputs: list[EngineCoreOutput] = []
        stopped: list[Request] = []
        index = runner_out.req_id_to_index
        logprobs = runner_out.logprobs
        max_len = self.config.max_model_len
        for req_id in sched_out.num_scheduled_tokens:
            req = self.requests.get(req_id)
            i = index.get(req_id)
            if req is None or i is None or req.status != RequestStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            token_ids = runner_out.sampled_token_ids[i]
            prompt_lp = runner_out.prompt_logprobs.get(req_id)
            drafts = sched_out.scheduled_spec_decode_tokens.get(req_id)
            if drafts:
                self._roll_back_rejected(req, len(drafts), len(token_ids) - 1)
            if not token_ids and prompt_lp is None:
                continue
            new_ids: list[int] = []
            for tok in token_ids:
                if self.config.async_scheduling:
                    req.num_output_placeholders -= 1
                    req.num_sent_tokens += 1  # the worker appended it itself
                req.all_token_ids.append(tok)
                new_ids.append(tok)
                if req.check_stop(tok, max_len):
                    stopped.append(req)
                    break
            if not req.is_finished and self._grammar_ended(req):
                req.status = RequestStatus.FINISHED_STOPPED
                stopped.append(req)
            if drafts and not req.is_finished:
                self.kv.trim(req)
            new_lp = None
            if logprobs is not None and req.sampling_params.logprobs is not None and new_ids:
                new_lp = _new_logprobs(logprobs, i, len(new_ids))
            outputs.append(EngineCoreOutput(
                req_id, new_ids, new_lp, prompt_lp, req.status.finish_reason, req.stop_reason,
                max(req.num_cached_tokens, 0),
            ))
        if stopped:
            done = set(stopped)
            self.running = [r for r in self.running if r not in done]
            for req in stopped:
                del self.requests[req.request_id]
                self._free(req)
        kv_out = runner_out.kv_connector_output
        if self.kv_transfer is not None and kv_out is not None:
            self.waiting.extendleft(reversed(self.kv_transfer.on_output(kv_out, self.kv)))
        return outputs

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    # ---- speculative decoding ------------------------------------------------------------
    def update_draft_token_ids(self, drafts: DraftTokenIds) -> None:
        """The workers' drafts, verified when each request is next scheduled. A grammar's
        mask covers one position at a time, so structured requests never speculate."""
        for req_id, ids in zip(drafts.req_ids, drafts.draft_token_ids):
            req = self.requests.get(req_id)
            if (req is not None and req.status == RequestStatus.RUNNING
                    and req.sampling_params.structured_outputs is None):
                req.spec_token_ids = ids

    def _drafts(self, req: Request, num_new: int, budget: int) -> list[int]:
        """The request's drafts that fit this step: only after all its known tokens, within
        the token budget, and so short that every draft plus the bonus token stays within
        max_tokens and max_model_len."""
        drafts, req.spec_token_ids = req.spec_token_ids, []
        if num_new != req.num_tokens - req.num_computed_tokens:
            return []
        room = min(budget - num_new, self.config.max_model_len - req.num_tokens - 1)
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - req.num_output_tokens - 1)
        return drafts[:max(room, 0)]

    def _roll_back_rejected(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """The rejected drafts' KV slots are not computed tokens: the next step writes
        over them (and update_from_output frees the blocks only they used)."""
        req.num_computed_tokens -= num_drafts - num_accepted
        if self.spec_stats is not None:
            self.spec_stats.observe(num_drafts, num_accepted)

    # ---- structured outputs (the grammar work is the manager's) ------------------------
    def _add_grammar(self, req: Request) -> None:
        if self.structured is None:
            raise ValueError("structured outputs are not available in this engine: its "
                             "Scheduler was built without a StructuredOutputManager")
        self.structured.add_request(req)

    def _attach_grammar_bitmask(self, out: SchedulerOutput) -> None:
        """The token mask of each structured request that samples in this step (its known
        tokens are all computed once the step runs)."""
        if self.structured is None:
            return
        reqs = [self.requests[r] for r in out.num_scheduled_tokens if r in self.structured]
        reqs = [r for r in reqs if r.num_computed_tokens >= r.num_tokens]
        if reqs:
            out.structured_output_request_ids = [r.request_id for r in reqs]
            out.grammar_bitmask = self.structured.grammar_bitmask(reqs)

    def _grammar_ended(self, req: Request) -> bool:
        """Advances the request's grammar over its new tokens; True once it has ended."""
        return (self.structured is not None and req.request_id in self.structured
                and self.structured.accept_tokens(req))

    # ---- failed steps -----------------------------------------------------------------
    def abandon_in_flight(self, kv_lost: bool = False) -> list[str]:
        """The steps in flight failed: the blocks they hashed leave the prefix cache (their
        KV was never computed), and their requests go back to waiting as preempted, keeping
        every token they produced, to be recomputed. kv_lost (the workers were replaced):
        every running request goes back, and the whole prefix cache is dropped. Returns the
        ids of the requests put back, in their running order."""
        affected: set[str] = set()
        for sched_out, blocks in self.in_flight:
            self.kv.pool.uncache(blocks)
            affected.update(sched_out.num_scheduled_tokens)
            if not kv_lost:  # the workers still hold these; tell them in the next step
                self.finished_req_ids.extend(sched_out.finished_req_ids)
        self.in_flight = []
        victims = [r for r in self.running if kv_lost or r.request_id in affected]
        self.running = [r for r in self.running if r not in victims]
        for req in reversed(victims):  # appendleft: the first running is first again
            self._preempt(req)
        if kv_lost:
            self.finished_req_ids = []
            if self.kv_transfer is not None:
                self.waiting.extendleft(reversed(self.kv_transfer.reset(self.kv)))
            self.kv.reset_prefix_cache()
        return [r.request_id for r in victims]

    def set_num_blocks(self, num_blocks: int) -> None:
        """A restarted worker group holds num_blocks KV blocks (no request holds any)."""
        if num_blocks == len(self.kv.pool.blocks):
            return
        old = self.kv
        self.kv = KVCacheManager(num_blocks, old.block_size)
        self.kv.prefix_queries, self.kv.prefix_hits = old.prefix_queries, old.prefix_hits

    def fail_request(self, req_id: str, error: str) -> EngineCoreOutput | None:
        req = self.requests.get(req_id)
        if req is None:
            return None
        self.finish_requests([req_id], RequestStatus.FINISHED_ERROR)
        return EngineCoreOutput(req_id, [], finish_reason="error", error=error)

    def shrink_limits(self) -> bool:
        """Halves the token budget and max_num_seqs, never below one sequence of
        max_model_len; False if they are already there."""
        floor = min(self.config.max_num_batched_tokens, self.config.max_model_len)
        tokens = max(self.max_num_batched_tokens // 2, floor)
        seqs = max(self.max_num_seqs // 2, 1)
        shrunk = (tokens, seqs) != (self.max_num_batched_tokens, self.max_num_seqs)
        self.max_num_batched_tokens, self.max_num_seqs = tokens, seqs
        return shrunk

    def grow_limits(self) -> bool:
        """Doubles the limits back towards the configured ones; False if already there."""
        tokens = min(self.max_num_batched_tokens * 2, self.config.max_num_batched_tokens)
        seqs = min(self.max_num_seqs * 2, self.config.max_num_seqs)
        grown = (tokens, seqs) != (self.max_num_batched_tokens, self.max_num_seqs)
        self.max_num_batched_tokens, self.max_num_seqs = tokens, seqs
        return grown

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.num_preemptions,
            **(self.spec_stats.as_dict() if self.spec_stats is not None else {}),
            **(self.kv_transfer.stats() if self.kv_transfer is not None else {}),
        }


def _new_logprobs(lp: LogprobsLists, i: int, n: int) -> list[tuple[list[int], list[float], int]]:
    """The logprobs of request i's first n new tokens (one row per request, or per emitted
    token under speculative decoding)."""
    rows = [i] if lp.cu_num_tokens is None else range(lp.cu_num_tokens[i],
                                                      lp.cu_num_tokens[i] + n)
    return [(lp.logprob_token_ids[r], lp.logprobs[r], lp.sampled_token_ranks[r]) for r in rows]
