"""What can be soundly said about a tokenizer before (or instead of) encoding a whole text.

Two facts, each only where it provably holds:

- **A lower bound on the token count.** For a byte-level BPE without a normalizer or
  truncation (GPT-2, Llama 3, the built-in model), every token stands for a piece of the
  text's UTF-8 bytes no longer than the longest token in the vocabulary (B bytes): a text of
  N bytes has at least ceil(N / B) tokens. Elsewhere a normalizer can shrink the text, and an
  unknown-token can swallow a whole word, so no such bound holds.
- **Safe split points.** With GPT-2's pre-tokenizer regex (ByteLevel with use_regex, no
  prefix space), no pre-token crosses a lone newline's end or a lone space's start between
  printable characters, and the pieces on either side split into the same pre-tokens;
  BPE merges stay inside pre-tokens, so pieces split there encode to the same ids as the
  whole, as long as no added (special) token is near the split and the post-processor only
  prepends tokens (checked on sample texts). Encoding in pieces keeps each GIL hold and
  each batch of `Encoding` objects small (one 10 MB text encoded whole holds the GIL for
  the conversion of all its ids, and its Encoding took 2.4 GB here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

# After a lone newline between printable ASCII characters (a longer run of whitespace splits
# differently at the end of a piece than before a printable character), or at a space
# between two of them.
_SPLIT = re.compile(r"(?<=[!-~]\n)(?=[!-~])|(?<=[!-~]) (?=[!-~])")
_SAMPLES = ("def f(x):\n    return x", "Héllo wörld ✓ 日本語")


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {chr(b) for b in printable} | {chr(256 + i) for i in range(len(extra))}


def _has_type(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


@dataclass(frozen=True)
class TokenizerFacts:
    bytes_per_token: int | None = None  # B above; None where no bound holds
    splittable: bool = False  # pieces at safe split points encode to the same ids
    prefix_ids: tuple[int, ...] = ()  # what add_special_tokens prepends (splittable only)
    added: tuple[str, ...] = ()  # the added tokens' texts, kept away from split points

    @staticmethod
    def of(tok: HFTokenizer) -> TokenizerFacts:
        spec = json.loads(tok.to_str())
        model = spec.get("model") or {}
        if (spec.get("normalizer") is not None or spec.get("truncation") is not None
                or model.get("type") != "BPE" or model.get("dropout")
                or not _has_type(spec.get("pre_tokenizer"), "ByteLevel")):
            return TokenizerFacts()
        vocab = tok.get_vocab(with_added_tokens=True)
        if not _byte_level_alphabet() <= vocab.keys():
            return TokenizerFacts()  # a byte missing from the vocabulary is dropped
        # A byte-level token's characters are one byte each; UTF-8 length bounds them.
        bound = max(len(t.encode("utf-8")) for t in vocab)
        added = tuple(a["content"] for a in spec.get("added_tokens", ()) if a.get("content"))
        pre = spec.get("pre_tokenizer") or {}
        gpt2 = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space", False))
        prefix = _prefix_ids(tok) if gpt2 else None
        return TokenizerFacts(bound, prefix is not None, prefix or (), added)

    def split(self, text: str, piece_chars: int) -> list[str]:
        """text cut at safe split points into pieces of about piece_chars (one piece if it
        has none, or the tokenizer is not splittable)."""
        if not self.splittable or len(text) <= piece_chars:
            return [text]
        longest = max((len(a) for a in self.added), default=0)
        pieces, start = [], 0
        while len(text) - start > piece_chars:
            at = self._split_point(text, start + piece_chars, longest)
            if at is None:
                break
            pieces.append(text[start:at])
            start = at
        pieces.append(text[start:])
        return pieces

    def _split_point(self, text: str, after: int, longest: int) -> int | None:
        for m in _SPLIT.finditer(text, after):
            at = m.start()
            near = text[max(0, at - longest):at + longest]
            if not any(a in near for a in self.added):
                return at
        return None


def _prefix_ids(tok: HFTokenizer) -> tuple[int, ...] | None:
    """The tokens add_special_tokens puts in front; None if it adds anything else."""
    counts = set()
    for sample in _SAMPLES:
        plain = tok.encode(sample, add_special_tokens=False).ids
        full = tok.encode(sample, add_special_tokens=True).ids
        extra = len(full) - len(plain)
        if extra < 0 or full[extra:] != plain:
            return None
        counts.add(tuple(full[:extra]))
    return counts.pop() if len(counts) == 1 else None
