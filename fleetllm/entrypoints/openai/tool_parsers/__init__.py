"""Tool parsers for tool_choice "auto", chosen with `fleetllm serve --tool-call-parser NAME`.

A parser is a ToolParser subclass registered under a name; defaults.TOOL_CALL_PARSERS lists
the built-in names for the command line's help (a test holds the two lists equal)."""

from __future__ import annotations

from collections.abc import Callable

from .base import ExtractedToolCalls, ParsedOutput, PartialToolCall, ToolParser
from .constrained import NamedToolParser, RequiredToolParser
from .hermes import HermesToolParser

__all__ = ["ExtractedToolCalls", "HermesToolParser", "NamedToolParser", "ParsedOutput",
           "PartialToolCall", "RequiredToolParser", "ToolParser", "ToolParserManager"]


class ToolParserManager:
    parsers: dict[str, type[ToolParser]] = {}

    @classmethod
    def register(cls, name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
        def add(parser: type[ToolParser]) -> type[ToolParser]:
            cls.parsers[name] = parser
            return parser

        return add

    @classmethod
    def get(cls, name: str) -> type[ToolParser]:
        try:
            return cls.parsers[name]
        except KeyError:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of "
                             f"{sorted(cls.parsers)}") from None


ToolParserManager.register("hermes")(HermesToolParser)
