"""Tools in /v1/chat/completions (tool_choice none, auto, required and a named function,
tool calls streamed and whole, tool messages through the chat template), streamed echo with
logprobs, and the cap on prompts per request: on a random model, where only the tool-call
schema's token masks make the calls valid."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from fleetllm.entrypoints.openai.defaults import TOOL_CALL_PARSERS
from fleetllm.entrypoints.openai.protocol import ChatCompletionTool
from fleetllm.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    NamedToolParser,
    RequiredToolParser,
    ToolParser,
    ToolParserManager,
)
from fleetllm.entrypoints.openai.tools import EMPTY_PARAMETERS, tool_call_schema
from tests.helpers import copy_checkpoint, edit_json
from tests.test_openai_server import API_KEY, AUTH, ERROR_KEYS, MODEL, Server, _post, serve


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


def _tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"the {name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


_POINT = _obj({"x": {"type": "integer", "minimum": 0, "maximum": 9},
               "y": {"type": "integer", "minimum": 0, "maximum": 9}})
TOOLS = [
    _tool("get_weather", _obj({"city": {"enum": ["Paris", "Tokyo", "Lima"]},
                               "unit": {"enum": ["c", "f"]}})),
    _tool("search", _obj({"query": {"type": "string", "maxLength": 6},
                          "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                         required=["query"])),
    _tool("now"),  # no parameters: {} is its only arguments
    _tool("move", {"$defs": {"pt": _POINT}, **_obj({"to": {"$ref": "#/$defs/pt"},
                                                    "fast": {"type": "boolean"}})}),
]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", EMPTY_PARAMETERS)
              for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# What a Hermes / Qwen model writes when it calls a tool.
HERMES_OUT = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", '
              '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n'
              '</tool_call>')
# A chat template that shows the tools, the assistant's calls and the tools' results.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'tool' %}<tool_response id={{ m.tool_call_id }}>{{ m.content }}"
    "</tool_response>{% else %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---- parsers, without a server ----------------------------------------------------------

def _streamed(parser: ToolParser, pieces: list[str]) -> tuple[str | None, list[tuple]]:
    """(content, [(id, name, arguments)]) that a client reassembles from the deltas."""
    content, calls, text = "", {}, ""
    for i, piece in enumerate(pieces):
        delta = parser.extract_tool_calls_streaming(text, text + piece, piece,
                                                    i == len(pieces) - 1)
        text += piece
        if delta is None:
            continue
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            if tc.index not in calls:
                assert tc.id and tc.id.startswith("chatcmpl-tool-") and tc.type == "function"
                assert tc.function.name and tc.index == len(calls)
                calls[tc.index] = [tc.id, tc.function.name, ""]
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index][2] += tc.function.arguments or ""
    return content or None, [tuple(calls[i][1:]) for i in sorted(calls)]


def _whole(parser: ToolParser, text: str) -> tuple[str | None, list[tuple]]:
    found = parser.extract_tool_calls(text)
    assert found.tools_called == bool(found.tool_calls)
    return found.content, [(c.function.name, c.function.arguments) for c in found.tool_calls]


def _splits(text: str) -> Iterator[list[str]]:
    """Every character boundary: one character at a time, and each cut in two."""
    yield list(text)
    for k in range(len(text) + 1):
        yield [text[:k], text[k:]]


HERMES_CASES = {
    "plain": ("Hello there, no tools.  ", "Hello there, no tools.  ", []),
    "two_calls": (HERMES_OUT, "Checking.",
                  [("get_weather", '{"city": "Tokyo", "unit": "c"}'), ("now", "{}")]),
    "text_after": ('a <tool_call>{"name": "f", "arguments": {"x": [1, "<"]}}</tool_call>\n b',
                   "a\nb", [("f", '{"x": [1, "<"]}')]),
    "not_json": ("x <tool_call>not json</tool_call> y", "x <tool_call>not json</tool_call> y",
                 []),
    "unclosed_at_end": ('<tool_call>{"name": "f", "parameters": {"q": "é"}}', None,
                        [("f", '{"q": "é"}')]),
    "arguments_as_text": ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
                          None, [("f", '{"a": 1}')]),
    "partial_tag_is_text": ("a <tool", "a <tool", []),
}


@pytest.mark.parametrize("case", list(HERMES_CASES))
def test_hermes_parser_whole_and_streamed_at_every_boundary(case: str) -> None:
    text, content, calls = HERMES_CASES[case]
    assert _whole(HermesToolParser(), text) == (content, calls)
    for pieces in _splits(text):
        assert _streamed(HermesToolParser(), pieces) == (content, calls), pieces


def test_hermes_parser_holds_back_what_may_become_a_call() -> None:
    parser = HermesToolParser()
    assert parser.extract_tool_calls_streaming("", "Sure <tool_", "Sure <tool_").content == "Sure"
    assert parser.extract_tool_calls_streaming("Sure <tool_", "Sure <tool_call>{", "call>{") is None
    assert HermesToolParser(max_calls=1).extract_tool_calls(HERMES_OUT).tool_calls[0] \
        .function.name == "get_weather"
    assert len(HermesToolParser(max_calls=1).extract_tool_calls(HERMES_OUT).tool_calls) == 1


REQUIRED_CASES = {
    "compact": ('[{"name":"get_weather","parameters":{"city":"Pa\\"ris]}","n":[1,{"a":2}]}},'
                '{"name":"now","parameters":{}}]',
                [("get_weather", '{"city":"Pa\\"ris]}","n":[1,{"a":2}]}'), ("now", "{}")]),
    "spaced_and_reordered": ('[ {"parameters" : {"a": 1} , "name" : "x\\u00e9"} ]',
                             [("xé", '{"a": 1}')]),
    "cut_off": ('[{"name":"g","parameters":{"a":tr', [("g", '{"a":tr')]),
}


@pytest.mark.parametrize("case", list(REQUIRED_CASES))
def test_required_parser_whole_and_streamed_at_every_boundary(case: str) -> None:
    text, calls = REQUIRED_CASES[case]
    assert _whole(RequiredToolParser(), text) == (None, calls)
    for pieces in _splits(text):
        assert _streamed(RequiredToolParser(), pieces) == (None, calls), pieces


def test_named_parser_and_registry() -> None:
    text = '{"city":"Lima"}'
    assert _whole(NamedToolParser("get_weather"), text) == (None, [("get_weather", text)])
    assert _streamed(NamedToolParser("get_weather"), list(text)) == (None,
                                                                      [("get_weather", text)])
    assert tuple(sorted(ToolParserManager.parsers)) == tuple(sorted(TOOL_CALL_PARSERS))
    with pytest.raises(ValueError, match="hermes"):
        ToolParserManager.get("wat")


def test_required_schema_takes_each_tool_and_its_defs() -> None:
    tools = [ChatCompletionTool.model_validate(t) for t in TOOLS]
    schema = tool_call_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert set(schema["$defs"]) == {"pt"}
    names = [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]]
    assert names == [[t["function"]["name"]] for t in TOOLS]
    assert "$defs" in TOOLS[3]["function"]["parameters"]  # the request is left as it was
    call = [{"name": "move", "parameters": {"to": {"x": 1, "y": 2}, "fast": True}}]
    jsonschema.validate(call, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(call * 2, schema)


# ---- through the server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("tools")
    model = copy_checkpoint(llama_dir, tmp / "ckpt")
    edit_json(model / "tokenizer_config.json", lambda c: c.update(chat_template=TEMPLATE))
    with serve(model, tmp / "server.log", "--enable-auto-tool-choice", "--tool-call-parser",
               "hermes", "--max-model-len", "512", "--max-prompts-per-request", "4",
               "--max-n", "4") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


def _token_id(server: Server, text: str) -> int:
    ids = _ok(_post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}))
    assert len(ids["tokens"]) == 1, ids
    return ids["tokens"][0]


@pytest.fixture(scope="module")
def brief(server: Server) -> dict[str, float]:
    """A bias toward closing the array and its objects, so that the random model makes a
    few calls, not as many as max_tokens allows (unbiased, 7 of 12 seeds ran out of them)."""
    return {str(_token_id(server, "]")): 5.0, str(_token_id(server, "}")): 3.0}


def _assert_valid_calls(message: Any, finish_reason: str, parallel: bool = True) -> None:
    assert finish_reason == "tool_calls", (finish_reason, message)
    assert message.tool_calls and (parallel or len(message.tool_calls) == 1)
    ids = [c.id for c in message.tool_calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("chatcmpl-tool-") for i in ids)
    for call in message.tool_calls:
        assert call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments),
                            PARAMETERS[call.function.name])


def test_required_always_returns_valid_calls(client: openai.OpenAI,
                                             brief: dict[str, float]) -> None:
    names = set()
    for seed in range(8):
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
            temperature=1.0, seed=seed, max_tokens=400, parallel_tool_calls=seed % 2 == 0,
            extra_body={"logit_bias": brief})
        choice = r.choices[0]
        _assert_valid_calls(choice.message, choice.finish_reason, seed % 2 == 0)
        names.update(c.function.name for c in choice.message.tool_calls)
    assert len(names) > 1, names  # sampled, not fixed by the schema


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_named_function_always_returns_its_valid_call(client: openai.OpenAI,
                                                      name: str) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=7, n=3,
        tool_choice={"type": "function", "function": {"name": name}}, max_tokens=300)
    for choice in r.choices:
        _assert_valid_calls(choice.message, choice.finish_reason, parallel=False)
        assert choice.message.tool_calls[0].function.name == name
        assert choice.message.content is None


def _reassembled(client: openai.OpenAI, **kw: Any) -> dict[int, dict[str, Any]]:
    """Each choice of a stream as a client puts it together: content, calls, finish."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            o = out.setdefault(c.index, {"content": None, "calls": [], "finish": None})
            if c.delta.content:
                o["content"] = (o["content"] or "") + c.delta.content
            for tc in c.delta.tool_calls or ():
                if tc.index == len(o["calls"]):
                    assert tc.id and tc.type == "function" and tc.function.name
                    o["calls"].append([tc.function.name, tc.function.arguments or ""])
                else:
                    assert tc.id is None and tc.function.name is None
                    o["calls"][tc.index][1] += tc.function.arguments or ""
            if c.finish_reason:
                o["finish"] = c.finish_reason
    return out


def _whole_choices(client: openai.OpenAI, **kw: Any) -> dict[int, dict[str, Any]]:
    r = client.chat.completions.create(**kw)
    return {c.index: {"content": c.message.content,
                      "calls": [[t.function.name, t.function.arguments]
                                for t in c.message.tool_calls or ()],
                      "finish": c.finish_reason} for c in r.choices}


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "move"}}, "auto", "none"])
def test_streamed_tool_calls_reassemble_into_the_whole_answer(
        client: openai.OpenAI, brief: dict[str, float], tool_choice: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, n=2,
                              tool_choice=tool_choice, temperature=0.8, seed=3,
                              max_tokens=300, extra_body={"logit_bias": brief})
    if tool_choice in ("auto", "none"):  # a model that writes Hermes calls
        kw["extra_body"] = {"guided_choice": [HERMES_OUT]}
    whole = _whole_choices(client, **kw)
    assert _reassembled(client, **kw) == whole
    if tool_choice == "none":
        assert whole[0] == {"content": HERMES_OUT, "calls": [], "finish": "stop"}
    else:
        assert all(w["calls"] and w["finish"] == "tool_calls" for w in whole.values()), whole


def test_auto_parses_hermes_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                       extra_body={"guided_choice": [HERMES_OUT]})
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] \
        == [("get_weather", {"city": "Tokyo", "unit": "c"}), ("now", {})]
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                         parallel_tool_calls=False,
                                         extra_body={"guided_choice": [HERMES_OUT]})
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                           extra_body={"guided_choice": ["No tool needed."]})
    assert plain.choices[0].message.content == "No tool needed."
    assert not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason == "stop"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "18 C"},
]


def test_tool_messages_and_calls_render_through_the_template(server: Server,
                                                             client: openai.OpenAI) -> None:
    body = {"model": MODEL, "messages": CONVERSATION, "tools": TOOLS}
    ids = _ok(_post(server, "/tokenize", body))
    text = _ok(_post(server, "/detokenize", {"tokens": ids["tokens"]}))["prompt"]
    assert text == (
        "system\nTools: get_weather search now move\n"
        "system\nBe brief.\nuser\nWeather in Paris?\n"
        'assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call>\ntool\n<tool_response id=call-1>18 C</tool_response>\nassistant\n")
    # The completion's prompt is the same rendering, tools and all.
    r = client.chat.completions.create(model=MODEL, messages=CONVERSATION, tools=TOOLS,
                                       tool_choice="none", max_tokens=2)
    assert r.usage.prompt_tokens == ids["count"]
    assert r.choices[0].message.tool_calls == []


_MOVE = {"type": "function", "function": {"name": "move"}}
# id -> (body changes, the field the error must name)
BAD_TOOLS: dict[str, tuple[dict[str, Any], str]] = {
    "tool_type": ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    "function_name": ({"tools": [_tool("get weather")]}, "tools.0.function.name"),
    "parameters_not_object": ({"tools": [_tool("f", {"type": "string"})]},
                              "tools[0].function.parameters"),
    "parameters_bad_schema": ({"tools": [_tool("f", {"type": "object", "properties": {
        "a": {"type": "wat"}}})]}, "tools[0].function.parameters"),
    "parameters_not_a_dict": ({"tools": [_tool("f", [1])]}, "tools.0.function.parameters"),
    "duplicate_names": ({"tools": [_tool("f"), _tool("f")]}, "tools[1].function.name"),
    "named_function_missing": ({"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "fly"}}}, "tool_choice.function.name"),
    "named_without_function": ({"tools": TOOLS, "tool_choice": {"type": "function"}},
                               "tool_choice"),
    "tool_choice_word": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    "required_without_tools": ({"tool_choice": "required"}, "tool_choice"),
    "required_and_response_format": ({"tools": TOOLS, "tool_choice": "required",
                                      "response_format": {"type": "json_object"}},
                                     "tool_choice"),
    "tool_message_without_id": ({"messages": [*MESSAGES, {"role": "tool", "content": "1"}]},
                                "messages.1.tool_call_id"),
    "tool_message_without_content": ({"messages": [
        *MESSAGES, {"role": "tool", "tool_call_id": "c"}]}, "messages.1.content"),
    "tool_call_arguments_not_json": ({"messages": [*MESSAGES, {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": "{oops"}}]}]}, "messages[1].tool_calls[0].function"),
    "tool_call_without_id": ({"messages": [*MESSAGES, {
        "role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}]}, "messages.1.tool_calls.0.id"),
    "deprecated_functions": ({"functions": [{"name": "f"}]}, "functions"),
    "deprecated_function_call": ({"function_call": "auto"}, "function_call"),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_bad_tools_get_400_naming_the_field(server: Server, case: str) -> None:
    changes, field = BAD_TOOLS[case]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **changes}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and field in (error["param"] or ""), error
    if case.startswith("deprecated"):
        assert "deprecated" in error["message"] and "tool" in error["message"], error
    ok = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    assert _post(server, "/v1/chat/completions", ok).status_code == 200


# ---- completions: streamed echo with logprobs, and the prompt cap -----------------------

def _stream_choices(server: Server, body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line)
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            o = out.setdefault(c["index"], {"text": "", "finish_reason": None,
                                            "logprobs": None})
            o["text"] += c["text"]
            if c["logprobs"] is not None:
                lp = o["logprobs"] = o["logprobs"] or {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    lp[k] += v
            o["finish_reason"] = c["finish_reason"] or o["finish_reason"]
    return out


def _assert_same_logprobs(got: dict[str, list], want: dict[str, list]) -> None:
    """Equal, but for float rounding: the stream takes the prompt's logprobs from a
    request of their own, computed in another batch."""
    assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
    for a, b in zip(got["token_logprobs"], want["token_logprobs"], strict=True):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-4)
    for a, b in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
        assert (a is None and b is None) or (a.keys() == b.keys() and all(
            a[k] == pytest.approx(b[k], abs=1e-4) for k in a))


@pytest.mark.parametrize("max_tokens", [5, 0])
def test_streamed_echo_with_logprobs_equals_the_whole_one(server: Server,
                                                          max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": ["def fibonacci(n):", "The quick brown fox"],
            "echo": True, "logprobs": 2, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "n": 2}
    whole = _ok(_post(server, "/v1/completions", body))["choices"]
    streamed = _stream_choices(server, body)
    assert sorted(streamed) == [c["index"] for c in whole] == [0, 1, 2, 3]
    for c in whole:
        s = streamed[c["index"]]
        assert s["text"] == c["text"] and s["finish_reason"] == c["finish_reason"] == "length"
        assert c["text"].startswith(body["prompt"][c["index"] // 2])
        assert c["logprobs"]["token_logprobs"][0] is None
        _assert_same_logprobs(s["logprobs"], c["logprobs"])


def test_prompts_per_request_are_capped(server: Server) -> None:
    body = {"model": MODEL, "max_tokens": 1}
    for prompt in (["a"] * 5, [[1, 2]] * 5):
        r = _post(server, "/v1/completions", {**body, "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "--max-prompts-per-request 4" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {**body, "prompt": ["a", "b"], "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert len(_ok(_post(server, "/v1/completions", {**body, "prompt": ["a"] * 4}))[
        "choices"]) == 4
    assert len(_ok(_post(server, "/v1/completions", {**body, "prompt": "a", "n": 4}))[
        "choices"]) == 4


def test_auto_tool_choice_flag_needs_a_parser(capsys: pytest.CaptureFixture[str]) -> None:
    from fleetllm.entrypoints.cli import main

    assert main(["serve", "--enable-auto-tool-choice"]) == 1
    assert "--tool-call-parser" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--tool-call-parser", "wat"])
