"""Tools in chat completions: what a request's tools and tool_choice ask of decoding and of
the output, and the conversation (tool calls and results) as the chat template sees it.

- "none": the tools are shown to the template; the output is content.
- "auto": the output is read by the server's tool parser (--tool-call-parser, enabled by
  --enable-auto-tool-choice, as in vLLM).
- "required": decoding is constrained (the structured-output path) to a JSON array of calls,
  {"name": ..., "parameters": {...}}, an anyOf over the tools (as vLLM does), at least one,
  at most one with parallel_tool_calls false.
- a named function: decoding is constrained to that function's parameters, and the output
  becomes its one call.
Tool-call JSON is constrained without free whitespace: it carries nothing there, and a small
model could spend its tokens on it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetllm.structured.params import StructuredOutputsParams

from .errors import OpenAIError
from .protocol import ChatCompletionRequest, ChatCompletionTool, Message, NamedToolChoice
from .tool_parsers import NamedToolParser, RequiredToolParser, ToolParser, ToolParserManager

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolOptions:
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    @staticmethod
    def from_args(args: argparse.Namespace) -> ToolOptions:
        options = ToolOptions(args.enable_auto_tool_choice, args.tool_call_parser)
        if options.enable_auto_tool_choice and options.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser, the format "
                             "the model writes tool calls in")
        if options.tool_call_parser is not None:
            ToolParserManager.get(options.tool_call_parser)
        return options


@dataclass(frozen=True)
class ToolPlan:
    """What one request's tools ask for."""

    tools: list[dict[str, Any]] | None  # for the chat template's `tools`
    constraint: StructuredOutputsParams | None  # for decoding
    parser: Callable[[], ToolParser] | None  # reads each choice's output


def _parameters(tool: ChatCompletionTool) -> dict[str, Any]:
    """The schema a call's arguments follow: always an object's."""
    params = tool.function.parameters or EMPTY_PARAMETERS
    return params if "type" in params else {"type": "object", **params}


CACHED_SCHEMA_CHARS = 1 << 16  # larger schemas are checked each time, not kept


def _schema_problem(schema_text: str) -> str | None:
    """Why xgrammar cannot follow the schema; None if it can."""
    if len(schema_text) > CACHED_SCHEMA_CHARS:
        return _check_schema(schema_text)
    return _cached_check_schema(schema_text)


def _check_schema(schema_text: str) -> str | None:
    from fleetllm.structured.grammar import to_grammar

    try:
        to_grammar(StructuredOutputsParams(json=schema_text, disable_any_whitespace=True))
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    return None


_cached_check_schema = functools.lru_cache(maxsize=256)(_check_schema)


def _check_tools(tools: list[ChatCompletionTool]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function"
        name = tool.function.name
        if name in seen:
            raise OpenAIError(f"{where}.name: two tools are named {name!r}; give each "
                              "function its own name", param=f"{where}.name")
        seen.add(name)
        params = tool.function.parameters
        if params is None:
            continue
        if params.get("type", "object") != "object":
            raise OpenAIError(f"{where}.parameters must be the JSON Schema of an object (the "
                              f"arguments), not of type {params.get('type')!r}",
                              param=f"{where}.parameters")
        problem = _schema_problem(json.dumps(params, sort_keys=True))
        if problem is not None:
            raise OpenAIError(f"{where}.parameters is not a JSON Schema this server can "
                              f"follow: {problem}", param=f"{where}.parameters")


def template_tools(tools: list[ChatCompletionTool] | None) -> list[dict[str, Any]] | None:
    """The tools as the chat template's `tools` (None without any), checked."""
    if not tools:
        return None
    _check_tools(tools)
    return [t.model_dump(exclude_none=True) for t in tools]


def tool_call_schema(tools: list[ChatCompletionTool], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of "required" output. Each function's $defs (or draft-7 definitions)
    move to the root, where its "#/$defs/..." references then point."""
    shared: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    variants = []
    for i, tool in enumerate(tools):
        params = copy.deepcopy(_parameters(tool))
        where = f"tools[{i}].function.parameters"
        for key, defs in shared.items():
            own = params.pop(key, {})
            if not isinstance(own, dict):
                raise OpenAIError(f"{where}: {key} must be an object of schemas", param=where)
            for name, sub in own.items():
                if name in defs and defs[name] != sub:
                    raise OpenAIError(
                        f"{where}: {key} {name!r} differs from another tool's; with "
                        'tool_choice "required" the tools share one schema, so rename one',
                        param=where)
                defs[name] = sub
        variants.append({"properties": {"name": {"type": "string",
                                                 "enum": [tool.function.name]},
                                        "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update({key: defs for key, defs in shared.items() if defs})
    return schema


def _constrained(schema: dict[str, Any]) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def plan_tools(req: ChatCompletionRequest, options: ToolOptions) -> ToolPlan:
    tools = req.tools or []
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise OpenAIError(f"tool_choice {_describe(choice)} needs tools; send tools or "
                              "leave tool_choice out", param="tool_choice")
        return ToolPlan(None, None, None)
    shown = template_tools(tools)
    max_calls = None if req.parallel_tool_calls else 1
    if choice == "none":
        return ToolPlan(shown, None, None)
    if choice == "auto":
        if not options.enable_auto_tool_choice or options.tool_call_parser is None:
            raise OpenAIError(
                'tool_choice "auto" (the default with tools) needs the server started with '
                "--enable-auto-tool-choice and --tool-call-parser; or send tool_choice "
                '"required", "none" or a named function', param="tool_choice")
        parser_cls = ToolParserManager.get(options.tool_call_parser)
        return ToolPlan(shown, None, functools.partial(parser_cls, max_calls))
    if choice == "required":
        return ToolPlan(shown, _constrained(tool_call_schema(tools, req.parallel_tool_calls)),
                        functools.partial(RequiredToolParser, max_calls))
    assert isinstance(choice, NamedToolChoice)
    name = choice.function.name
    named = next((t for t in tools if t.function.name == name), None)
    if named is None:
        raise OpenAIError(f"tool_choice names the function {name!r}, which is not in tools "
                          f"{[t.function.name for t in tools]}",
                          param="tool_choice.function.name")
    return ToolPlan(shown, _constrained(_parameters(named)),
                    functools.partial(NamedToolParser, name))


def _describe(choice: Any) -> str:
    if isinstance(choice, NamedToolChoice):
        return f"naming {choice.function.name!r}"
    return json.dumps(choice)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.text for p in content)
    return content or ""


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The conversation as chat templates read it (as transformers' apply_chat_template
    gets it): a tool result carries its tool_call_id, and an assistant's tool_calls their
    arguments as objects, not JSON text (templates write them with tojson)."""
    convo = []
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {"role": m.role, "content": _text(m.content)}
        if m.name is not None:
            entry["name"] = m.name
        if m.role == "tool":
            entry["tool_call_id"] = m.tool_call_id
        calls = getattr(m, "tool_calls", None)
        if calls:
            entry["tool_calls"] = [_template_call(i, j, c) for j, c in enumerate(calls)]
        convo.append(entry)
    return convo


def _template_call(i: int, j: int, call: Any) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError as e:
        raise OpenAIError(f"{where} is not valid JSON ({e}); send the arguments the model "
                          "gave, a JSON object as text", param=where) from e
    if not isinstance(arguments, dict):
        raise OpenAIError(f"{where} must be a JSON object, got {type(arguments).__name__}",
                          param=where)
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": arguments}}
