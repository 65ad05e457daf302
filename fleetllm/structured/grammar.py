"""The xgrammar adapter: a StructuredOutputsParams as an xgrammar Grammar (checked without a
tokenizer, in the front end) or a CompiledGrammar (against the engine's vocabulary).

xgrammar is imported lazily (it brings transformers along: about half a second), so only
engines and front ends that see a structured request pay for it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fleetllm.structured.params import StructuredOutputsParams

# xgrammar (0.2.9; upstream issue 800) writes a string with minLength/maxLength as a repeat of
# this class, which lets raw control characters in, though JSON forbids them there. The
# grammar is rebuilt with the class JSON strings use elsewhere (escapes stay unreachable in
# such strings: narrower, never invalid).
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes an assertion.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _clean(error: Exception) -> str:
    return _LOCATION.sub("", str(error).strip()).strip()


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX) are also EBNF string-literal escapes.
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _json_text(spec: StructuredOutputsParams) -> str:
    return spec.json if isinstance(spec.json, str) else json.dumps(spec.json)


def _json_schema(text: str, any_whitespace: bool, strict_mode: bool = True) -> Any:
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(text, any_whitespace=any_whitespace,
                                           strict_mode=strict_mode)
    ebnf = str(grammar)
    if _BOUNDED_STRING_CHAR not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def to_grammar(spec: StructuredOutputsParams) -> Any:
    """The xgrammar Grammar of spec; ValueError naming the problem if it is invalid or
    uses something xgrammar does not support."""
    import xgrammar as xgr

    ws = not spec.disable_any_whitespace
    kind = spec.kind
    try:
        if kind == "json":
            return _json_schema(_json_text(spec), ws)
        if kind == "json_object":
            return _json_schema('{"type": "object"}', ws, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        what = {"json": "JSON schema", "json_object": "JSON object grammar",
                "regex": "regex", "choice": "choice list", "grammar": "EBNF grammar"}[kind]
        raise ValueError(f"structured_outputs.{kind}: invalid or unsupported {what}: "
                         f"{_clean(e)}") from e


def compile_grammar(compiler: Any, spec: StructuredOutputsParams) -> Any:
    """spec compiled against compiler's vocabulary (an xgrammar CompiledGrammar)."""
    return compiler.compile_grammar(to_grammar(spec))
