"""Verifying point-mass (n-gram) drafts so that the output has the target's distribution.

The target model scores each speculating request at k + 1 positions: after its last known
token and after each of its k drafts. At every position j the target distribution p_j is
built exactly as without speculation (logit_bias, grammar masks, min_tokens bans,
penalties counting the tokens before j including the drafts accepted before it,
temperature, min-p, top-k, top-p), and the usual sampler draws y_j from it by inverse CDF
with its uniform number u_j; for a seeded request u_j is keyed by (seed, output position)
exactly as without speculation.

Draft x_j is accepted iff y_j == x_j; the first rejected position emits y_j, and when all
k drafts are accepted, y_k is the bonus token. This is the rejection rule for a point-mass
draft: P(accept) = P(y_j = x_j) = p_j(x_j), and given a rejection, y_j is distributed as
p_j with x_j removed and renormalised, so every emitted token has the non-speculative
distribution. Greedy rows are the same rule with y_j the argmax. Because the accept test
and the recovery draw share u_j, a seeded request emits exactly the tokens it would emit
without speculation, whatever was drafted and whatever else is in the batch.
"""

from __future__ import annotations

import numpy as np


def num_accepted(target: np.ndarray, drafts: list[list[int]]) -> np.ndarray:
    """[B] accepted drafts per request: the leading positions where the target's token
    equals the draft. target: [B, K + 1] (K = longest draft; a shorter draft's rows are
    padded), drafts: B lists of at most K tokens."""
    width = target.shape[1] - 1
    padded = np.full((len(drafts), width), -1, dtype=np.int64)
    for row, d in zip(padded, drafts):
        row[:len(d)] = d
    match = target[:, :width] == padded
    return np.cumprod(match, axis=1).sum(axis=1)


def emitted_tokens(sampled: list[int], drafts: list[list[int]],
                   accept=num_accepted) -> list[list[int]]:
    """The tokens each request emits in this step. sampled: the target's token at each
    scored position, request by request (len(drafts[i]) + 1 rows for request i)."""
    counts = np.fromiter((len(d) + 1 for d in drafts), np.int64, len(drafts))
    cu = np.concatenate([[0], np.cumsum(counts)])
    flat = np.asarray(sampled, dtype=np.int64)
    cols = np.arange(int(counts.max()) if len(counts) else 1)
    idx = np.minimum(cu[:-1, None] + cols[None, :], (cu[1:] - 1)[:, None])
    target = flat[idx]
    n = accept(target, drafts)
    return [target[i, :n[i] + 1].tolist() for i in range(len(drafts))]
