"""The tool-parser interface: a model's output text to tool calls, whole or as it streams.

A parser reads the text so far and says what it holds (content, and calls each with its name
and the arguments text so far), under one rule: what it says of a prefix of the output is a
prefix of what it says of the whole output. Streaming then sends the growth of each part, and
the deltas of a stream reassemble into exactly the answer `extract_tool_calls` gives for the
same text: both run the same `parse`.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class PartialToolCall:
    name: str | None  # None until the output names the function
    arguments: str = ""  # the arguments' JSON text so far


@dataclass
class ParsedOutput:
    content: str = ""
    calls: list[PartialToolCall] = field(default_factory=list)


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None


class ToolParser(ABC):
    """One parser per choice: it keeps state between the calls of one stream.

    max_calls: keep only the first max_calls calls (1 for parallel_tool_calls=false)."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self._sent_content = 0
        self._ids: list[str] = []
        self._sent_arguments: list[int] = []

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """What text (the output so far; the whole output when final) holds. Called with
        ever longer texts of one output, each extending the last."""

    def _named_calls(self, parsed: ParsedOutput) -> list[PartialToolCall]:
        named = [c for c in parsed.calls if c.name is not None]
        return named if self.max_calls is None else named[:self.max_calls]

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """The whole output's tool calls, and its content (None when empty)."""
        parsed = self.parse(text, final=True)
        calls = [ToolCall(id=make_tool_call_id(),
                          function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in self._named_calls(parsed) if c.name is not None]
        return ExtractedToolCalls(bool(calls), calls, parsed.content or None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str,
                                     delta_text: str, finished: bool = False
                                     ) -> DeltaMessage | None:
        """What current_text (previous_text + delta_text) adds to the stream: new content, a
        new call's id, type and name (with its arguments so far), or more of a call's
        arguments; None when nothing is new yet (held back until it is certain)."""
        parsed = self.parse(current_text, final=finished)
        content = parsed.content[self._sent_content:]
        self._sent_content = len(parsed.content)
        deltas = []
        for i, call in enumerate(self._named_calls(parsed)):
            if i == len(self._ids):
                self._ids.append(make_tool_call_id())
                self._sent_arguments.append(len(call.arguments))
                deltas.append(DeltaToolCall(index=i, id=self._ids[i], type="function",
                                            function=DeltaFunctionCall(
                                                name=call.name, arguments=call.arguments)))
                continue
            piece = call.arguments[self._sent_arguments[i]:]
            if piece:
                self._sent_arguments[i] = len(call.arguments)
                deltas.append(DeltaToolCall(index=i,
                                            function=DeltaFunctionCall(arguments=piece)))
        if not content and not deltas:
            return None
        return DeltaMessage(content=content or None, tool_calls=deltas or None)

    @property
    def tools_called(self) -> bool:
        """Whether the stream so far has sent a tool call."""
        return bool(self._ids)
