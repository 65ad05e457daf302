"""Speculative decoding counters: drafts verified, draft tokens, accepted tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric


class SpecDecodingStats:
    """Counts only drafts that were proposed and verified: a request that proposed nothing
    in a step (no match, or the adaptive back-off) adds nothing, so a workload with few
    drafts does not read as 0% acceptance."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * num_speculative_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    def as_dict(self) -> dict[str, float]:
        """get_stats() keys; the acceptance rate is accepted / drafted tokens, and the mean
        acceptance length counts the bonus token (1 + accepted per draft), as vLLM's."""
        out: dict[str, float] = {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_acceptance_rate": (self.num_accepted_tokens / self.num_draft_tokens
                                            if self.num_draft_tokens else 0.0),
            "spec_decode_mean_acceptance_length": (1 + self.num_accepted_tokens / self.num_drafts
                                                   if self.num_drafts else 0.0),
        }
        for pos, n in enumerate(self.accepted_per_pos):
            out[f"spec_decode_num_accepted_tokens_pos_{pos}"] = n
        return out


PROMETHEUS_COUNTERS = (
    ("fleetllm:spec_decode_num_drafts", "Drafts proposed and verified.",
     "spec_decode_num_drafts"),
    ("fleetllm:spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
     "spec_decode_num_draft_tokens"),
    ("fleetllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
     "spec_decode_num_accepted_tokens"),
)
_POS_PREFIX = "spec_decode_num_accepted_tokens_pos_"


def prometheus_families(per_engine: list[dict[str, float]]) -> Iterator[Metric]:
    """The speculative-decoding counters of the engines' stats (exposed with a _total
    suffix), and the accepted tokens per draft position; nothing when it is off."""
    if not any("spec_decode_num_drafts" in s for s in per_engine):
        return
    from prometheus_client.core import CounterMetricFamily

    for name, doc, key in PROMETHEUS_COUNTERS:
        metric = CounterMetricFamily(name, doc, labels=["engine"])
        for i, stats in enumerate(per_engine):
            metric.add_metric([str(i)], stats.get(key, 0.0))
        yield metric
    per_pos = CounterMetricFamily("fleetllm:spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted at each draft position (0 = first).",
                                  labels=["engine", "position"])
    for i, stats in enumerate(per_engine):
        for key, value in stats.items():
            if key.startswith(_POS_PREFIX):
                per_pos.add_metric([str(i), key.removeprefix(_POS_PREFIX)], value)
    yield per_pos
