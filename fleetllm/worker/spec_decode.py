"""The model runner's speculative-decoding seam: drafts into the step, k + 1 logits rows
per speculating request, verification, and the next step's n-gram proposals.

Drafts live in a request's token_ids only while the step's inputs are built (so the
input, position and slot code is the one used for chunked prefill); then they are
removed, and the sampling metadata is built for one "row state" per scored position whose
token_ids end with the drafts before that position, so penalties, min_tokens bans and
seeds see exactly what they would see without speculation.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from fleetllm.config import SpeculativeConfig
from fleetllm.sched.output import DraftTokenIds, LogprobsLists, ModelRunnerOutput, SchedulerOutput
from fleetllm.spec_decode.ngram_proposer import NgramProposer
from fleetllm.spec_decode.rejection_sampler import emitted_tokens

if TYPE_CHECKING:
    from fleetllm.worker.model_runner import CachedRequestState, ModelRunner

# Adaptive back-off: after a draft with nothing accepted, a request skips proposing for
# 2**misses - 1 steps (at most MAX_SKIP), so low-acceptance text costs (almost) nothing.
MAX_SKIP = 31


@dataclasses.dataclass
class _Context:
    state: CachedRequestState
    tokens: np.ndarray
    synced: int = 0
    misses: int = 0
    skip: int = 0


class SpecDecodeRunner:
    def __init__(self, config: SpeculativeConfig, block_size: int) -> None:
        self.k = config.num_speculative_tokens
        self.proposer = NgramProposer(self.k, config.prompt_lookup_min,
                                      config.prompt_lookup_max)
        self.block_size = block_size
        self.drafts: dict[str, list[int]] = {}  # this step's drafts
        self.pending: DraftTokenIds | None = None
        self.contexts: dict[str, _Context] = {}

    # ---- building the step ----------------------------------------------------------------
    def trim_blocks(self, state: CachedRequestState) -> None:
        """The scheduler frees the blocks that only rejected drafts used (it keeps those
        of the known tokens); the worker drops the same ones before adding new blocks."""
        del state.block_ids[-(-len(state.token_ids) // self.block_size):]

    def add_drafts(self, requests: dict[str, CachedRequestState], so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.contexts.pop(req_id, None)
        self.drafts = so.scheduled_spec_decode_tokens
        for req_id, draft in self.drafts.items():
            requests[req_id].token_ids.extend(draft)

    def remove_drafts(self, requests: dict[str, CachedRequestState]) -> None:
        for req_id, draft in self.drafts.items():
            del requests[req_id].token_ids[-len(draft):]

    def logits_indices(self, states: list[CachedRequestState], counts: list[int],
                       sample_rows: list[int], device: torch.device) -> torch.Tensor:
        """The last 1 + k token positions of each sampling request (k its drafts)."""
        ends = np.cumsum(np.asarray(counts, dtype=np.int64))
        n = [len(self.drafts.get(states[i].req_id, ())) for i in sample_rows]
        idx = [np.arange(ends[i] - 1 - k, ends[i]) for i, k in zip(sample_rows, n)]
        flat = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(flat).to(device)

    def _row_states(self, states: list[CachedRequestState]) -> list[CachedRequestState]:
        rows = []
        for s in states:
            draft = self.drafts.get(s.req_id, ())
            rows.append(s)
            for j in range(1, len(draft) + 1):
                rows.append(dataclasses.replace(s, token_ids=s.token_ids + list(draft[:j])))
        return rows

    # ---- verifying and proposing ------------------------------------------------------------
    def finish_step(self, runner: ModelRunner, order: list[str], sample_rows: list[int],
                    states: list[CachedRequestState], logits: torch.Tensor | None,
                    so: SchedulerOutput, prompt_lp: dict) -> ModelRunnerOutput:
        sampled: list[list[int]] = [[] for _ in order]
        logprobs = None
        if states:
            rows = self._row_states(states)
            out = runner.sampler(logits, runner._sampling_metadata(rows, so))
            drafts = [self.drafts.get(s.req_id, []) for s in states]
            emitted = emitted_tokens(out.sampled.tolist(), drafts)
            for row, toks in zip(sample_rows, emitted):
                sampled[row] = toks
            if out.logprobs is not None:
                logprobs = self._logprobs(out, order, sample_rows, states, drafts, emitted)
            self._observe(states, drafts, emitted)
            self._propose(states, emitted)
        return ModelRunnerOutput(order, {r: i for i, r in enumerate(order)}, sampled, logprobs,
                                 prompt_lp)

    @staticmethod
    def _logprobs(out, order: list[str], sample_rows: list[int],
                  states: list[CachedRequestState], drafts: list[list[int]],
                  emitted: list[list[int]]) -> LogprobsLists:
        """One row per emitted token: the scored position that emitted it."""
        lp_ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        per_row: list[list[int]] = [[] for _ in order]
        start = 0
        for row, d, e in zip(sample_rows, drafts, emitted):
            per_row[row] = list(range(start, start + len(e)))
            start += len(d) + 1
        ids: list[list[int]] = []
        vals: list[list[float]] = []
        rk: list[int] = []
        cu = [0]
        state_of = dict(zip(sample_rows, states))
        for row, positions in enumerate(per_row):
            keep = 1 + (state_of[row].params.logprobs or 0) if positions else 0
            for p in positions:
                ids.append(lp_ids[p][:keep])
                vals.append(lps[p][:keep])
                rk.append(ranks[p])
            cu.append(cu[-1] + len(positions))
        return LogprobsLists(ids, vals, rk, cu)

    def _observe(self, states: list[CachedRequestState], drafts: list[list[int]],
                 emitted: list[list[int]]) -> None:
        for s, d, e in zip(states, drafts, emitted):
            ctx = self.contexts.get(s.req_id)
            if not d or ctx is None:
                continue
            if len(e) > 1:
                ctx.misses = 0
            else:
                ctx.misses += 1
                ctx.skip = min(2 ** ctx.misses - 1, MAX_SKIP)

    def _propose(self, states: list[CachedRequestState], emitted: list[list[int]]) -> None:
        req_ids: list[str] = []
        contexts: list[np.ndarray] = []
        for s, e in zip(states, emitted):
            if s.params.structured_outputs is not None:
                continue  # a grammar's mask is known for one position at a time
            ctx = self._context(s, e)
            if ctx.skip:
                ctx.skip -= 1
                continue
            req_ids.append(s.req_id)
            contexts.append(ctx.tokens[:ctx.synced + len(e)])
        drafts = self.proposer.propose(contexts)
        keep = [(r, d) for r, d in zip(req_ids, drafts) if d]
        self.pending = DraftTokenIds([r for r, _ in keep], [d for _, d in keep]) if keep else None

    def _context(self, s: CachedRequestState, emitted: list[int]) -> _Context:
        """The request's tokens plus this step's emitted ones as one numpy array, kept
        from step to step (only new tokens are copied in)."""
        ctx = self.contexts.get(s.req_id)
        need = len(s.token_ids) + len(emitted)
        if ctx is None or ctx.state is not s:
            ctx = self.contexts[s.req_id] = _Context(s, np.empty(max(2 * need, 64), np.int64))
        if need > len(ctx.tokens):
            grown = np.empty(2 * need, np.int64)
            grown[:ctx.synced] = ctx.tokens[:ctx.synced]
            ctx.tokens = grown
        n = len(s.token_ids)
        ctx.tokens[ctx.synced:n] = s.token_ids[ctx.synced:n]
        ctx.synced = n
        ctx.tokens[n:need] = emitted
        return ctx

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        drafts, self.pending = self.pending, None
        return drafts
