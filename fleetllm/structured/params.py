"""StructuredOutputsParams with vLLM's names: what a request's output must match.

Plain data (a msgspec Struct, sent to engine processes and workers with SamplingParams); the
grammar behind it is built and checked by fleetllm.structured.grammar, in the engine.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Exactly one of:

    - json: a JSON schema (a dict, or its JSON text); the output is JSON valid under it;
    - regex: the whole output matches this regular expression;
    - choice: the output is one of these strings;
    - grammar: an EBNF grammar (GBNF-style rules, the start rule named ``root``);
    - json_object: True; the output is some JSON object.

    disable_any_whitespace: JSON output without free whitespace between tokens (json and
    json_object only), as in vLLM.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object), "
                                 f"got {type(parsed).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, "
                             f"got {self.regex!r}")
        if self.choice is not None and (
                not self.choice or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty "
                             f"strings, got {self.choice!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str)
                                         or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty EBNF string")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, "
                             f"got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """A hashable identity of the grammar, the same for equal specs (dict key order and
        JSON formatting aside): what compiled grammars are cached under."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json":
            value = json.loads(value) if isinstance(value, str) else value
            spec = json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            spec = json.dumps(value)
        else:
            spec = str(value)
        return kind, spec, self.disable_any_whitespace
