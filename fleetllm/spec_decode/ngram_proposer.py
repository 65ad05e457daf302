"""Prompt-lookup (n-gram) drafts: copy what followed the last earlier match of the suffix.

For each request, the longest suffix of its tokens (prompt plus output) between
prompt_lookup_min and prompt_lookup_max tokens long that occurred earlier; of its
occurrences, the most recent; the draft is the up to k tokens that followed it. When that
occurrence overlaps the suffix (a period p shorter than k, as in "a b a b a b"), the copy
goes on through the tokens it has just proposed, i.e. the draft continues the period.

The matching is vectorised over the whole batch: the contexts are right-aligned in one
[batch, length] array, and one comparison per suffix offset (at most prompt_lookup_max of
them) marks, for every position, how long a match of the suffix ends there. No Python loop
runs over tokens.
"""

from __future__ import annotations

import numpy as np

_PAD = -1  # left padding of shorter contexts; never a token id


class NgramProposer:
    def __init__(self, k: int, min_n: int, max_n: int) -> None:
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, contexts: list[np.ndarray]) -> list[list[int]]:
        """One draft (possibly empty) per context ([L] int64 token ids)."""
        if not contexts:
            return []
        lens = np.fromiter((len(c) for c in contexts), np.int64, len(contexts))
        width = int(lens.max())
        pad = self.max_n  # so a match may end at any position, however early
        tokens = np.full((len(contexts), pad + width), _PAD, dtype=np.int64)
        for row, ctx in zip(tokens, contexts):
            row[pad + width - len(ctx):] = ctx
        return self._propose(tokens, lens, pad + width)

    def _propose(self, tokens: np.ndarray, lens: np.ndarray, total: int) -> list[list[int]]:
        last = total - 1
        # suffix[:, j]: the j-th token from the end; offsets past a context's start get -2,
        # which matches nothing, so a match never runs into the padding.
        suffix = tokens[:, last - self.max_n + 1:][:, ::-1].copy()
        suffix[np.arange(self.max_n)[None, :] >= lens[:, None]] = -2
        # A candidate occurrence ends at position e in [max_n - 1, last - 1]: an earlier
        # occurrence with at least one token after it.
        lo = self.max_n - 1
        run = np.zeros((tokens.shape[0], last - lo), dtype=np.int64)
        alive = np.ones_like(run, dtype=bool)
        for j in range(self.max_n):
            alive &= tokens[:, lo - j:last - j] == suffix[:, j:j + 1]
            run += alive
        # The longest match wins; among equally long ones, the most recent.
        score = run * total + np.arange(lo, last)[None, :]
        best = score.argmax(axis=1)
        length = run[np.arange(len(run)), best]
        end = best + lo
        period = last - end  # > 0: the distance from the match to the suffix
        offsets = np.arange(self.k)[None, :] % period[:, None]
        idx = end[:, None] + 1 + offsets
        drafts = np.take_along_axis(tokens, idx, axis=1)
        ok = length >= self.min_n
        return [d.tolist() if good else [] for d, good in zip(drafts, ok)]
