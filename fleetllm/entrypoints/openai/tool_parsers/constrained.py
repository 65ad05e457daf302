"""Parsers for outputs constrained to a tool-call schema (tool_choice "required" or a named
function), read incrementally so that streaming sends argument fragments as they come.

"required": the output is a JSON array of {"name": ..., "parameters": {...}} objects (the
schema of tool_call_schema). A call's arguments are the text of its "parameters" value as the
model wrote it, so the streamed fragments are pieces of the output itself.
A named function: the whole output is the function's arguments.
"""

from __future__ import annotations

import json
import logging

from .base import ParsedOutput, PartialToolCall, ToolParser

logger = logging.getLogger(__name__)

ARGUMENT_KEYS = ("parameters", "arguments")
_OPENERS = {"{": "}", "[": "]"}


class _Call:
    def __init__(self) -> None:
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None

    def partial(self, text: str) -> PartialToolCall:
        if self.args_start is None:
            return PartialToolCall(self.name)
        end = len(text) if self.args_end is None else self.args_end
        return PartialToolCall(self.name, text[self.args_start:end])


class RequiredToolParser(ToolParser):
    """A character-level scanner of the array: the nesting of objects, arrays and strings,
    and, in each element, its keys and the spans of their values. It resumes where the last
    text ended, so a stream costs one pass over the output."""

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._pos = 0
        self._stack: list[str] = []
        self._in_string = self._escape = False
        self._calls: list[_Call] = []
        self._key: str | None = None  # the element's key whose value comes (or runs) now
        self._token_start: int | None = None  # a string or value starting at depth 2
        self._expect_key = False
        self._broken = False  # not the array the schema describes: stop reading

    def parse(self, text: str, final: bool) -> ParsedOutput:
        while self._pos < len(text) and not self._broken:
            self._step(text, self._pos)
            self._pos += 1
        return ParsedOutput("", [c.partial(text) for c in self._calls])

    def _fail(self, text: str, i: int) -> None:
        logger.warning("tool-call output is not the expected array at %d: %r", i,
                       text[max(0, i - 20):i + 20])
        self._broken = True

    def _step(self, text: str, i: int) -> None:
        c = text[i]
        depth = len(self._stack)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if depth == 2:
                    self._end_string(text, i)
            return
        if c in " \t\r\n":
            self._end_primitive(i)
            return
        if depth == 0:
            if c != "[":
                self._fail(text, i)
                return
            self._stack.append("]")
            return
        if depth == 2 and c in ",}":
            self._end_primitive(i)
        if c == '"':
            self._in_string = True
            if depth == 2:
                self._token_start = i
            return
        if c in _OPENERS:
            if depth == 1:
                if c != "{":
                    self._fail(text, i)
                    return
                self._calls.append(_Call())
                self._expect_key = True
            elif depth == 2:
                self._start_value(i)
            self._stack.append(_OPENERS[c])
            return
        if c in "}]":
            if not self._stack or self._stack[-1] != c:
                self._fail(text, i)
                return
            self._stack.pop()
            if len(self._stack) == 2:  # a container value of the element ended
                self._end_value(i + 1)
            return
        if depth == 2:
            if c == ":":
                return
            if c == ",":
                self._expect_key = True
                return
            if self._token_start is None:  # a number, true, false or null begins
                self._start_value(i)
                self._token_start = i

    def _start_value(self, i: int) -> None:
        call = self._calls[-1]
        if self._key in ARGUMENT_KEYS and call.args_start is None:
            call.args_start = i

    def _end_value(self, end: int) -> None:
        call = self._calls[-1]
        if self._key in ARGUMENT_KEYS and call.args_start is not None and call.args_end is None:
            call.args_end = end
        self._key = None

    def _end_string(self, text: str, i: int) -> None:
        start, self._token_start = self._token_start, None
        assert start is not None
        try:
            value = json.loads(text[start:i + 1])
        except ValueError:  # a bad escape: not what the schema lets through
            self._fail(text, i)
            return
        if self._expect_key:
            self._key, self._expect_key = value, False
            return
        call = self._calls[-1]
        if self._key == "name" and call.name is None:
            call.name = value
        self._start_value(start)
        self._end_value(i + 1)

    def _end_primitive(self, i: int) -> None:
        if len(self._stack) == 2 and self._token_start is not None and not self._in_string:
            self._token_start = None
            self._end_value(i)


class NamedToolParser(ToolParser):
    """The output is the arguments of the one function tool_choice names."""

    def __init__(self, name: str) -> None:
        super().__init__(1)
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [PartialToolCall(self.name, text)])
