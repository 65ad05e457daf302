"""Hermes / Qwen tool calls: each a JSON object {"name": ..., "arguments": {...}} between
<tool_call> and </tool_call>, as Hermes 2 Pro, Qwen 2.5 and Qwen 3 write them.

Content is the text outside the blocks: a block and the whitespace around it (a model writes
a newline on each side) become one newline between the content before and after it, or nothing
at either end. A block is a call once it is closed (or the output ends) and its JSON reads as
one; otherwise its text stays content. While streaming,
text that may still become part of a block (a partial "<tool_call>", an open block, and
trailing whitespace) is held back, and a call is sent whole once its block closes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .base import ParsedOutput, PartialToolCall, ToolParser

logger = logging.getLogger(__name__)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _partial_open(text: str) -> int:
    """How many characters at the end of text could begin OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def _call(inner: str) -> PartialToolCall | None:
    """The call a block's JSON makes; None if it makes none."""
    try:
        obj: Any = json.loads(inner)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return PartialToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesToolParser(ToolParser):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._done = ParsedOutput()  # the blocks closed so far, and the content before them
        self._pos = 0  # where the text after them starts
        self._after_block = False  # whether a call came just before _pos

    def _outside(self, text: str) -> str:
        return text.lstrip() if self._after_block else text

    def _joined(self, piece: str) -> str:
        """piece, after a newline where it follows a call and content came before it."""
        return "\n" + piece if piece and self._after_block and self._done.content else piece

    def parse(self, text: str, final: bool) -> ParsedOutput:
        while (start := text.find(OPEN, self._pos)) != -1:
            end = text.find(CLOSE, start + len(OPEN))
            if end == -1:
                break
            self._close_block(text, start, end, end + len(CLOSE))
        rest = text[self._pos:]
        start = rest.find(OPEN)
        if final and start != -1:  # a block the output left open
            self._close_block(text, self._pos + start, len(text), len(text))
            rest = ""
        if final:
            tail = self._outside(rest)
        elif start != -1:
            tail = self._outside(rest[:start]).rstrip()
        else:
            tail = self._outside(rest)
            tail = tail[:len(tail) - _partial_open(tail)].rstrip()
        return ParsedOutput(self._done.content + self._joined(tail), list(self._done.calls))

    def _close_block(self, text: str, start: int, inner_end: int, end: int) -> None:
        call = _call(text[start + len(OPEN):inner_end])
        before = self._outside(text[self._pos:start])
        if call is None:
            logger.debug("not a tool call, kept as content: %r", text[start:end][:200])
            self._done.content += self._joined(before + text[start:end])
            self._after_block = False
        else:
            self._done.content += self._joined(before.rstrip())
            self._done.calls.append(call)
            self._after_block = True
        self._pos = end
