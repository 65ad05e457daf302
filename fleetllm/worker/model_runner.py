"""Turns a SchedulerOutput into tensors, runs the model, samples: one step on one worker."""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch

from fleetllm.config import EngineConfig
from fleetllm.distributed.comm import recv_from_prev_stage, send_to_next_stage
from fleetllm.distributed.kv_transfer.base import KVConnectorBase_V1
from fleetllm.distributed.parallel_state import ParallelContext
from fleetllm.lora.manager import LoRAManager
from fleetllm.lora.request import LoRARequest
from fleetllm.model.layers import cpu_kernels
from fleetllm.model.layers.attention import AttentionMetadata, DecodeStaging, PrefillMetadata
from fleetllm.model.layers.cpu_kernels import (
    CpuKernels,
    decode_kernels_for,
    kernels_for,
    linear_kernels_for,
)
from fleetllm.model.layers.linear import pack_linear_weights
from fleetllm.model.layers.sampler import (
    LogitsAdjustment,
    Sampler,
    SamplerOutput,
    SamplingMetadata,
)
from fleetllm.model.loader import TORCH_DTYPES, load_model
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.output import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    KVCacheConfig,
    KVCacheSpec,
    LogprobsLists,
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobs,
    SchedulerOutput,
)
from fleetllm.worker.spec_decode import SpecDecodeRunner

logger = logging.getLogger(__name__)
_NEG_INF = float("-inf")


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: list[int]
    lora_request: LoRARequest | None = None


def lazy_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed memory; on CPU an anonymous mapping, so pages cost nothing until touched."""
    if device.type != "cpu":
        return torch.zeros(numel, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(numel * itemsize, 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # fewer first-touch page faults as blocks fill
    return torch.frombuffer(buf, dtype=dtype, count=numel)


class ModelRunner:
    def __init__(self, config: EngineConfig, pc: ParallelContext, device: torch.device) -> None:
        self.config = config
        self.pc = pc
        self.device = device
        mc = config.model_config
        self.dtype = TORCH_DTYPES[mc.dtype]
        self.block_size = config.cache_config.block_size
        self.vocab_size = mc.vocab_size
        self.sliding_window = mc.sliding_window
        self.requests: dict[str, CachedRequestState] = {}
        self.model: torch.nn.Module | None = None
        self.kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sampler = Sampler(mc.seed)
        self.staging: DecodeStaging | None = None
        self.staging_budget = 0
        # The native decode-attention kernel over the staging copy (bf16 on CPU), or None.
        self.cpu_kernels: CpuKernels | None = None
        self.spec = (SpecDecodeRunner(config.speculative_config, self.block_size)
                     if config.speculative_config is not None else None)
        self.lora = (LoRAManager(config.lora_config, mc, self.dtype)
                     if config.lora_config is not None else None)
        # The rank's KV connector (worker/kv_connector.py attaches it); None: none.
        self.kv_connector: KVConnectorBase_V1 | None = None

    # ---- set-up -----------------------------------------------------------------------
    def load_model(self) -> None:
        self.model = load_model(self.config, self.pc, self.device)
        if self.lora is not None:
            self.lora.attach(self.model)
        # The fused norms, SiLU-and-mul, rotary, K/V writes and small linear layers apply to
        # any bf16 model on CPU; decode attention also needs a head_dim it has loops for. Set
        # before packing, so the small layers' blocked copies come from the plain weights.
        self.model.use_cpu_kernels(kernels_for(self.device, self.dtype),
                                   linear_kernels_for(self.device, self.dtype))
        packed = pack_linear_weights(self.model)
        if packed:
            logger.debug("packed %d linear weights into oneDNN's layout", packed)
        self.model.use_float32_matmuls(any(getattr(m, "upcast", None) is not None
                                           for m in self.model.modules()))
        self.cpu_kernels = decode_kernels_for(self.device, self.dtype,
                                              self.config.model_config.head_dim)
        # Greedy picks from float32 logits: any model on CPU (the picks are torch's).
        self.sampler.kernels = cpu_kernels.load() if self.device.type == "cpu" else None

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        mc = self.config.model_config
        kv_heads = max(1, mc.num_key_value_heads // self.pc.tp_size)
        spec = KVCacheSpec(self.block_size, kv_heads, mc.head_dim, mc.dtype)
        return {f"layers.{i}": spec for i in range(self.model.start_layer, self.model.end_layer)}

    def initialize_kv_cache(self, kv_config: KVCacheConfig) -> None:
        specs = self.get_kv_cache_spec()
        layers = sorted(int(name.split(".")[1]) for name in specs)
        spec = next(iter(specs.values()))
        shape = (kv_config.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
        per = math.prod(shape)
        flat = lazy_zeros(2 * per * len(layers), self.dtype, self.device)
        # The decode staging copy may use up to half the KV cache's size again.
        self.staging_budget = per * len(layers) * flat.element_size()
        self.kv_caches = {
            layer: (flat[2 * j * per:(2 * j + 1) * per].view(shape),
                    flat[(2 * j + 1) * per:(2 * j + 2) * per].view(shape))
            for j, layer in enumerate(layers)
        }

    def release_kv_cache(self) -> None:
        self.kv_caches = {}
        self.staging = None
        self.requests.clear()

    # ---- one step ---------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = self._new_state(new)
        c = so.scheduled_cached_reqs
        for req_id, toks, blocks, computed in zip(c.req_ids, c.new_token_ids, c.new_block_ids,
                                                  c.num_computed_tokens):
            state = self.requests[req_id]
            state.token_ids.extend(toks)
            if self.spec is not None:
                self.spec.trim_blocks(state)
            state.block_ids.extend(blocks)
            state.num_computed_tokens = computed

    @staticmethod
    def _new_state(new: NewRequestData) -> CachedRequestState:
        return CachedRequestState(new.req_id, list(new.token_ids), new.num_prompt_tokens,
                                  new.sampling_params, list(new.block_ids),
                                  new.num_computed_tokens, new.eos_token_ids,
                                  new.lora_request)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if self.spec is not None:
            self.spec.add_drafts(self.requests, so)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        num_sched = so.num_scheduled_tokens
        # Decodes first, then prefill chunks, as the attention backend expects.
        order = sorted(num_sched, key=lambda r: num_sched[r] > 1)
        states = [self.requests[r] for r in order]
        inputs = self._prepare_inputs(states, [num_sched[r] for r in order])
        input_ids, positions, meta, logits_idx, sample_rows = inputs
        meta.kv_connector = self.kv_connector
        if self.spec is not None:  # the drafts are in the inputs now; sampling adds them
            self.spec.remove_drafts(self.requests)
            logits_idx = self.spec.logits_indices(
                states, [num_sched[r] for r in order], sample_rows, self.device)
        pc = self.pc
        hidden_in = None
        if not pc.is_first_pp_rank:
            hidden_in = recv_from_prev_stage(
                pc, (input_ids.shape[0], self.config.model_config.hidden_size), self.dtype,
                self.device)
        if self.lora is not None:  # each token's adapter slot, read by the LoRA layers
            self.lora.prepare([s.lora_request for s in states],
                              [num_sched[r] for r in order], self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, hidden_in)
        if not pc.is_last_pp_rank:
            send_to_next_stage(pc, hidden)
            return EMPTY_MODEL_RUNNER_OUTPUT
        sample_states = [states[i] for i in sample_rows]
        # Every tensor rank joins the logits all-gathers; only the output rank samples.
        logits = (self.model.compute_logits(hidden.index_select(0, logits_idx))
                  if sample_states else None)
        prompt_lp = self._prompt_logprobs(states, [num_sched[r] for r in order], hidden)
        if pc.tp_rank != 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if self.spec is not None:
            return self.spec.finish_step(self, order, sample_rows, sample_states, logits, so,
                                         prompt_lp)
        out = (self.sampler(logits, self._sampling_metadata(sample_states, so))
               if sample_states else None)
        if out is not None and self.config.scheduler_config.async_scheduling:
            for s, tok in zip(sample_states, out.sampled.tolist()):
                s.token_ids.append(tok)  # the scheduler schedules on before it sees this
        return self._make_output(order, sample_rows, out, sample_states, prompt_lp)

    def _prepare_inputs(self, states: list[CachedRequestState], counts: list[int]):
        bs = self.block_size
        n = len(states)
        starts = np.fromiter((s.num_computed_tokens for s in states), np.int64, n)
        counts_np = np.asarray(counts, dtype=np.int64)
        seq_lens = starts + counts_np
        total = int(counts_np.sum())
        token_ids = np.empty(total, dtype=np.int64)
        offset = 0
        for s, start, cnt in zip(states, starts.tolist(), counts):
            if cnt == 1:
                token_ids[offset] = s.token_ids[start]
            else:
                token_ids[offset:offset + cnt] = s.token_ids[start:start + cnt]
            offset += cnt
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts_np, out=cu[1:])
        req_of_token = np.repeat(np.arange(n), counts_np)
        positions = np.arange(total, dtype=np.int64) - cu[req_of_token] + starts[req_of_token]
        max_blocks = int(-(-seq_lens.max() // bs))
        block_table = np.zeros((n, max_blocks), dtype=np.int64)
        for i, s in enumerate(states):
            nb = min(len(s.block_ids), max_blocks)
            block_table[i, :nb] = s.block_ids[:nb]
        slots = block_table[req_of_token, positions // bs] * bs + positions % bs

        num_decodes = int(np.searchsorted(counts_np > 1, True))
        dev = self.device
        t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        positions_t = t(positions)
        decode_table = decode_bias = decode_mask = None
        staging = self._staging(states[:num_decodes], starts[:num_decodes], max_blocks * bs)
        if num_decodes:
            decode_table = t(block_table[:num_decodes])
        if num_decodes and (staging is None or staging.ranges is None):  # else: no mask needed
            lens = seq_lens[:num_decodes]
            # With a staging copy, attention spans its whole capacity (contiguous operands
            # for the matmuls); the mask hides the unused tail.
            key_pos = np.arange(staging.capacity if staging else max_blocks * bs)
            allowed = key_pos[None, :] < lens[:, None]
            if self.sliding_window:
                allowed &= key_pos[None, :] > (lens - 1 - self.sliding_window)[:, None]
            decode_bias = t(np.where(allowed, 0.0, _NEG_INF).astype(np.float32)
                            ).view(num_decodes, 1, 1, -1)
            # SDPA's additive mask, in the query's dtype, so it is not converted per layer.
            decode_mask = decode_bias.to(self.dtype)
        prefill = None
        if num_decodes < n:
            prefill = self._prefill_meta(starts[num_decodes:], counts_np[num_decodes:],
                                         block_table[num_decodes:], t)
        meta = AttentionMetadata(t(slots), num_decodes, decode_table, decode_bias, prefill,
                                 staging, decode_mask)
        # Logits only for the last token of sequences whose known tokens are all computed.
        sample_rows = [i for i, s in enumerate(states) if seq_lens[i] == len(s.token_ids)]
        logits_idx = t(cu[1:][sample_rows] - 1)
        return t(token_ids), positions_t, meta, logits_idx, sample_rows

    def _staging(self, states: list[CachedRequestState], starts: np.ndarray,
                 length: int) -> DecodeStaging | None:
        """Reuses last step's contiguous K/V copy when the decode batch is the same requests,
        each exactly one token further; otherwise marks it for a rebuild."""
        if not states or not self.kv_caches:
            self.staging = None
            return None
        req_ids = tuple(s.req_id for s in states)
        st = self.staging
        if (st is not None and st.req_ids == req_ids and np.array_equal(st.lens, starts)
                and length <= st.capacity):
            st.rebuild = False
        else:
            # Room to grow before the next rebuild: every step reads the whole capacity, so
            # slack costs each step, and a rebuild costs about one step. 1/8 of the length
            # (2 to 8 blocks) keeps both to a few percent.
            slack = min(8, max(2, -(-length // (8 * self.block_size)))) * self.block_size
            capacity = length + slack
            k, v = next(iter(self.kv_caches.values()))
            per_layer = 2 * len(states) * k.shape[2] * capacity * k.shape[3] * k.element_size()
            if per_layer * len(self.kv_caches) > self.staging_budget:
                self.staging = None
                return None
            st = DecodeStaging()
            st.req_ids, st.capacity, st.rebuild = req_ids, capacity, True
            self.staging = st
        st.lens = starts + 1
        if self.cpu_kernels is not None:
            st.kernels = self.cpu_kernels
            st.ranges = self.cpu_kernels.decode_ranges(st.lens, self.sliding_window)
        kv_heads = next(iter(self.kv_caches.values()))[0].shape[2]
        rows = np.arange(len(states) * kv_heads) * st.capacity
        st.write_index = torch.from_numpy(rows + np.repeat(starts, kv_heads)).to(self.device)
        return st

    def _prefill_meta(self, starts: np.ndarray, counts: np.ndarray, block_table: np.ndarray,
                      t) -> PrefillMetadata:
        n = len(counts)
        max_q = int(counts.max())
        window = self.sliding_window
        seq_lens = starts + counts
        if window is None or int(seq_lens.max()) <= window:  # no key ever falls outside it
            if not starts.any() and (counts == max_q).all():
                return PrefillMetadata(n, max_q, uniform=True)
            bs = self.block_size
            prefix = [t(np.ascontiguousarray(block_table[i, : -(-int(s) // bs)])) if s else None
                      for i, s in enumerate(starts)]
            return PrefillMetadata(n, max_q, False, starts.tolist(), counts.tolist(), prefix)
        bs = self.block_size
        q_off = np.arange(max_q)
        valid = q_off[None, :] < counts[:, None]
        cu = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pad_index = np.where(valid, cu[:, None] + q_off[None, :], 0).reshape(-1)
        unpad_index = (np.arange(n)[:, None] * max_q + q_off[None, :])[valid]
        max_kv = int(-(-seq_lens.max() // bs)) * bs
        key_pos = np.arange(max_kv)[None, None, :]
        q_pos = (starts[:, None] + q_off[None, :])[:, :, None]
        allowed = (key_pos <= q_pos) & (key_pos < seq_lens[:, None, None])
        allowed &= key_pos > q_pos - window
        bias = np.where(allowed, 0.0, _NEG_INF).astype(np.float32)[:, None]
        return PrefillMetadata(n, max_q, False, pad_index=t(pad_index),
                               unpad_index=t(unpad_index),
                               block_table=t(np.ascontiguousarray(block_table[:, : max_kv // bs])),
                               bias=t(bias))

    def _sampling_metadata(self, states: list[CachedRequestState],
                           so: SchedulerOutput) -> SamplingMetadata:
        params = [s.params for s in states]
        dev = self.device
        temps = torch.tensor([p.temperature if not p.greedy else 0.0 for p in params],
                             dtype=torch.float32, device=dev)
        all_greedy = all(p.greedy for p in params)
        vocab = self.vocab_size
        top_k = top_p = min_p = None
        if not all_greedy:
            if any(p.top_k > 0 for p in params):
                top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params],
                                     device=dev)
            if any(p.top_p < 1.0 for p in params):
                top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
            if any(p.min_p > 0 for p in params):
                min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        seeds = {
            i: (p.seed * 1_000_003 + len(s.token_ids) - s.num_prompt_tokens) % (2**63)
            for i, (s, p) in enumerate(zip(states, params))
            if p.seed is not None and not p.greedy
        }
        lp = [p.logprobs for p in params if p.logprobs is not None]
        m = SamplingMetadata(temps, all_greedy, top_k, top_p, min_p, seeds,
                             max(lp) if lp else None)
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               for p in params):
            m.presence_penalty = torch.tensor([p.presence_penalty for p in params], device=dev)
            m.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], device=dev)
            m.repetition_penalty = torch.tensor([p.repetition_penalty for p in params],
                                                device=dev)
            m.prompt_token_ids = self._padded([s.token_ids[: s.num_prompt_tokens] for s in states])
            m.output_token_ids = self._padded([s.token_ids[s.num_prompt_tokens:] for s in states])
        m.adjustment = self._logits_adjustment(states, so)
        return m

    def _logits_adjustment(self, states: list[CachedRequestState],
                           so: SchedulerOutput) -> LogitsAdjustment | None:
        """One batch of (row, token, value) biases, logit_bias and min_tokens bans alike, and
        the scheduler's grammar bitmask rows placed on their requests' logits rows."""
        rows: list[int] = []
        tokens: list[int] = []
        values: list[float] = []
        for i, s in enumerate(states):
            p = s.params
            if p.logit_bias:
                rows += [i] * len(p.logit_bias)
                tokens += p.logit_bias.keys()
                values += p.logit_bias.values()
            # A grammar allows EOS only where the output may end: it decides, not min_tokens
            # (banning EOS there could leave no token allowed).
            if (len(s.token_ids) - s.num_prompt_tokens < p.min_tokens
                    and p.structured_outputs is None):
                banned = list(s.eos_token_ids) * (not p.ignore_eos) + list(p.stop_token_ids)
                rows += [i] * len(banned)
                tokens += banned
                values += [_NEG_INF] * len(banned)
        req_ids = so.structured_output_request_ids
        if not rows and not req_ids:
            return None
        dev = self.device
        adj = LogitsAdjustment()
        if rows:
            adj.bias_rows = torch.tensor(rows, device=dev)
            adj.bias_tokens = torch.tensor(tokens, device=dev)
            adj.bias_values = torch.tensor(values, dtype=torch.float32, device=dev)
        if req_ids:
            row_of = {s.req_id: i for i, s in enumerate(states)}
            rows_np = np.fromiter((row_of[r] for r in req_ids), np.int64, len(req_ids))
            words = np.frombuffer(so.grammar_bitmask, dtype="<i4").reshape(len(req_ids), -1)
            # In logits-row order; when every row has a mask, the sampler fills them at once.
            by_row = np.argsort(rows_np)
            adj.allowed_bitmask = torch.from_numpy(words[by_row].astype(np.int32)).to(dev)
            if len(req_ids) < len(states):
                adj.allowed_rows = torch.from_numpy(rows_np[by_row]).to(dev)
        return adj

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        arr = np.full((len(rows), width), self.vocab_size, dtype=np.int64)
        for i, r in enumerate(rows):
            arr[i, : len(r)] = r
        return torch.from_numpy(arr).to(self.device)

    def _prompt_logprobs(self, states: list[CachedRequestState], counts: list[int],
                         hidden: torch.Tensor) -> dict[str, PromptLogprobs]:
        """Logprob of each prompt token given the ones before it, for the scheduled chunk."""
        result: dict[str, PromptLogprobs] = {}
        offset = 0
        for s, cnt in zip(states, counts):
            start = s.num_computed_tokens
            k = s.params.prompt_logprobs
            if k is not None and start < s.num_prompt_tokens:
                end = min(start + cnt, s.num_prompt_tokens - 1)
                out = PromptLogprobs(start, [], [], [], [])
                if end > start:
                    lp = self.model.compute_logits(hidden[offset:offset + end - start])
                    lp = lp.log_softmax(dim=-1)
                    targets = torch.tensor(s.token_ids[start + 1:end + 1], device=self.device)
                    chosen = lp.gather(1, targets.unsqueeze(1))
                    out.token_logprobs = chosen.squeeze(1).tolist()
                    out.ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
                    if k:
                        top_lp, top_ids = lp.topk(k, dim=-1)
                        out.top_ids, out.top_logprobs = top_ids.tolist(), top_lp.tolist()
                result[s.req_id] = out
            offset += cnt
        return result

    def _make_output(self, order: list[str], sample_rows: list[int], out: SamplerOutput | None,
                     sample_states: list[CachedRequestState],
                     prompt_lp: dict[str, PromptLogprobs]) -> ModelRunnerOutput:
        sampled: list[list[int]] = [[] for _ in order]
        logprobs = None
        if out is not None:
            ids = out.sampled.tolist()
            for row, tok in zip(sample_rows, ids):
                sampled[row] = [tok]
            if out.logprobs is not None:
                lp_ids = out.logprob_token_ids.tolist()
                lps = out.logprobs.tolist()
                ranks = out.ranks.tolist()
                full_ids: list[list[int]] = [[] for _ in order]
                full_lps: list[list[float]] = [[] for _ in order]
                full_ranks = [0] * len(order)
                for j, (row, s) in enumerate(zip(sample_rows, sample_states)):
                    keep = 1 + (s.params.logprobs or 0)
                    full_ids[row], full_lps[row] = lp_ids[j][:keep], lps[j][:keep]
                    full_ranks[row] = ranks[j]
                logprobs = LogprobsLists(full_ids, full_lps, full_ranks)
        return ModelRunnerOutput(order, {r: i for i, r in enumerate(order)}, sampled, logprobs,
                                 prompt_lp)
