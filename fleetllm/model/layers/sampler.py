"""Batched sampling: penalties, min_tokens, temperature, min_p, top-k/top-p, seeds, logprobs.

Every operation works on the whole [batch, vocab] tensor; the only per-request loop is
drawing one random number for each request with its own seed, from a
generator seeded by (seed, output position), so its text does not depend on what else is in
the batch, nor on whether it was preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK = float("-inf")


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B]; 0 for greedy rows
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] long, vocab size when off
    top_p: torch.Tensor | None  # [B]
    min_p: torch.Tensor | None  # [B]
    seeds: dict[int, int]  # row -> per-step seed
    max_num_logprobs: int | None
    presence_penalty: torch.Tensor | None = None  # [B]; penalties set together or not at all
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    prompt_token_ids: torch.Tensor | None = None  # [B, P] padded with vocab size
    output_token_ids: torch.Tensor | None = None  # [B, O] padded with vocab size
    banned: list[tuple[int, list[int]]] | None = None  # (row, token ids) masked for min_tokens


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [B] long
    logprob_token_ids: torch.Tensor | None = None  # [B, N + 1], the sampled token first
    logprobs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None  # [B], 1 = most likely


def _counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.float32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    vocab = logits.shape[1]
    out_counts = _counts(m.output_token_ids, vocab)
    seen = (_counts(m.prompt_token_ids, vocab) + out_counts) > 0
    rep = m.repetition_penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - m.frequency_penalty.unsqueeze(1) * out_counts
    return logits - m.presence_penalty.unsqueeze(1) * (out_counts > 0)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(0, vocab - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _MASK)
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, _MASK)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.row_generator = torch.Generator()

    def __call__(self, logits: torch.Tensor, m: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = logits.log_softmax(dim=-1) if m.max_num_logprobs is not None else None
        if m.repetition_penalty is not None:
            logits = apply_penalties(logits, m)
        if m.banned:
            rows = [r for r, toks in m.banned for _ in toks]
            cols = [t for _, toks in m.banned for t in toks]
            logits = logits.index_put((torch.tensor(rows), torch.tensor(cols)),
                                      torch.tensor(_MASK))
        greedy = logits.argmax(dim=-1)
        sampled = greedy if m.all_greedy else torch.where(
            m.temperature == 0, greedy, self._random(logits, m))
        out = SamplerOutput(sampled)
        if raw_logprobs is not None:
            self._logprobs(raw_logprobs, sampled, m.max_num_logprobs, out)
        return out

    def _random(self, logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
        temp = torch.where(m.temperature == 0, torch.ones_like(m.temperature), m.temperature)
        logits = logits / temp.unsqueeze(1)
        if m.min_p is not None:
            probs = logits.softmax(dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * m.min_p.unsqueeze(1)
            logits = logits.masked_fill(probs < floor, _MASK)
        if m.top_k is not None or m.top_p is not None:
            logits = apply_top_k_top_p(logits, m.top_k, m.top_p)
        # Inverse-CDF sampling: one uniform number per row instead of noise over the vocab.
        cdf = logits.softmax(dim=-1).cumsum_(dim=-1)
        u = torch.rand(cdf.shape[0], 1, generator=self.generator)
        for row, seed in m.seeds.items():
            self.row_generator.manual_seed(seed)
            u[row] = torch.rand(1, generator=self.row_generator)
        u = u.to(cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, sampled: torch.Tensor, n: int, out: SamplerOutput) -> None:
        chosen = raw.gather(1, sampled.unsqueeze(1))
        out.ranks = (raw > chosen).sum(dim=-1) + 1
        if n > 0:
            top_lp, top_ids = raw.topk(n, dim=-1)
            out.logprob_token_ids = torch.cat([sampled.unsqueeze(1), top_ids], dim=1)
            out.logprobs = torch.cat([chosen, top_lp], dim=1)
        else:
            out.logprob_token_ids = sampled.unsqueeze(1)
            out.logprobs = chosen
