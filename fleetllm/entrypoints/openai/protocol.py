"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests are strict, so no input is silently changed or ignored: a field of the wrong type
(no "3" for 3, no 1.0 for an integer), a number out of range, an unknown field, or a string
that is not valid Unicode gets 400 naming the field. Limits that depend on the engine (the
vocabulary, max_model_len, --max-n) are checked by the serving layer."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Bounds as exclusive powers of two: JSON numbers are doubles to many clients, and 2**63 - 1
# is not one (it reads back as 2**63).
INT64_MIN, INT64_END = -(2**63), 2**63
INT32_MAX = 2**31 - 1

# Fields of the OpenAI and vLLM request schemas that this server does not implement yet: a
# request that sets one (to anything but null or an empty value) gets 400 naming it. Remove a
# name here when it is implemented, and declare the field on the request model.
NOT_SUPPORTED_YET: frozenset[str] = frozenset()
# OpenAI's deprecated forms of tools, refused (unless null or empty) with what to send instead;
# function_call is also the deprecated form of an assistant message's tool_calls.
DEPRECATED = {"functions": "tools", "function_call": "tool_choice"}
_DEPRECATED_IN_MESSAGES = {"function_call": "tool_calls"}


def _encodable(text: str) -> str:
    """A JSON string may hold a lone surrogate ("\\ud800"), which no tokenizer can encode."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError(
                "invalid_unicode",
                f"the string has a lone surrogate (U+{ord(text[e.start]):04X} at character "
                f"{e.start}), which is not valid Unicode; send UTF-8 text (a character "
                "outside the BMP as a surrogate pair)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenId = Annotated[int, Field(ge=0, lt=INT64_END)]  # the vocabulary is checked later
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


def _shape(value: Any) -> str:
    """Which branch of a str-or-list union a value is meant for, so that a bad value gets
    the errors of that branch only, not of every branch."""
    if isinstance(value, list) and value:
        first = value[0]
        return "list[str]" if isinstance(first, str) else (
            "list[list[int]]" if isinstance(first, list) else "list[int]")
    return "list[str]" if isinstance(value, list) else "str"


def _union(*branches: tuple[str, Any]) -> Any:
    return Annotated[Union[tuple(Annotated[t, Tag(name)] for name, t in branches)],  # noqa: UP007
                     Discriminator(_shape)]


def _nonempty(t: Any) -> Any:
    return Annotated[list[t], Field(min_length=1)]


Prompt = _union(("str", Annotated[Text, Field(min_length=1)]), ("list[str]", _nonempty(Text)), ("list[int]", _nonempty(TokenId)),
                ("list[list[int]]", _nonempty(_nonempty(TokenId))))
Stop = _union(("str", Text), ("list[str]", list[Text]))


def _drop_not_supported(data: Any, where: str = "") -> Any:
    """data without the not-yet-supported or deprecated fields that are null or empty; 400
    for the rest."""
    refused = NOT_SUPPORTED_YET | DEPRECATED.keys()
    if not isinstance(data, dict) or not refused & data.keys():
        return data
    data = dict(data)
    for name in sorted(refused & data.keys()):
        value = data.pop(name)
        if value in (None, {}, []):
            continue
        field = f"{where}{name}"
        if name in NOT_SUPPORTED_YET:
            message = f"{field} is not supported yet by this server; remove it"
        else:
            instead = (_DEPRECATED_IN_MESSAGES if where else DEPRECATED)[name]
            message = (f"{field} is OpenAI's deprecated form of {instead}, which this server "
                       f"does not take; send {instead} instead")
        raise PydanticCustomError("not_supported", message, {"field": field})
    return data


class OpenAIBaseModel(BaseModel):
    """Responses (and their parts)."""

    model_config = ConfigDict()


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _not_supported_yet(cls, data: Any) -> Any:
        return _drop_not_supported(data)


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(RequestModel):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    model_config = ConfigDict(populate_by_name=True)


class KVTransferParams(RequestModel):
    """What fleetllm's proxy tells each side of a disaggregated deployment (vLLM's keys)."""

    do_remote_decode: bool = False  # the prefill side: push this prompt's KV
    do_remote_prefill: bool = False  # the decode side: load it instead of computing it
    transfer_id: Text | None = Field(None, min_length=1, max_length=128)


class SamplingRequest(RequestModel):
    """The fields completions and chat share; ranges the engine knows are checked there."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=INT32_MAX, description="capped by the server's --max-n")
    max_tokens: Count | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop | None = None
    seed: int | None = Field(None, ge=INT64_MIN, lt=INT64_END)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: Text | None = Field(None, description="an end-user id; it does not change the output")
    # vLLM's extensions, which OpenAI clients send through extra_body
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[Text, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100], added to its logit")
    # Structured outputs: OpenAI's response_format, or vLLM's fields (at most one).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    # Disaggregated prefill (fleetllm proxy): where this request's prompt KV comes from or
    # goes to, for the server's KV connector.
    kv_transfer_params: KVTransferParams | None = None


# Examples in the schema (conformance tools send them first): streams, scoring, chat.
_COMPLETION_EXAMPLES = [
    {"prompt": "def fibonacci(n):", "max_tokens": 8, "stream": True,
     "stream_options": {"include_usage": True}},
    {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 0, "echo": True, "logprobs": 1},
    {"prompt": "x = ", "max_tokens": 4, "logprobs": 2, "n": 2, "seed": 1, "stop": ["\n"]},
]
_CHAT_EXAMPLES = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello!"}],
     "max_tokens": 8, "stream": True, "logprobs": True, "top_logprobs": 2},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
     "max_completion_tokens": 4, "n": 2},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}],
     "tools": [{"type": "function", "function": {
         "name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]}},
             "required": ["city"]}}}],
     "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 32},
]


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"examples": _COMPLETION_EXAMPLES})

    prompt: Prompt
    logprobs: Count | None = None
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=INT32_MAX)
    add_special_tokens: bool = True


class ContentPart(RequestModel):
    type: Literal["text"]
    text: Text


def _content_shape(value: Any) -> str:
    return "list[ContentPart]" if isinstance(value, list) else "str"


Content = Annotated[Union[Annotated[Text, Tag("str")],  # noqa: UP007
                          Annotated[list[ContentPart], Tag("list[ContentPart]")]],
                    Discriminator(_content_shape)]


class _Message(RequestModel):
    content: Content
    name: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_supported_yet(cls, data: Any) -> Any:
        return _drop_not_supported(data, "messages[].")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    "not_supported", f"content part type {kind!r} is not supported: this "
                    "server takes text only")
        return content


class ChatMessage(_Message):
    role: Literal["system", "developer", "user"]


class ToolCallFunction(RequestModel):
    name: Text
    arguments: Text = Field(description="the call's arguments: a JSON object, as text")


class ToolCallParam(RequestModel):
    """A call the assistant made, as a client sends it back in the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallParam] | None = None


class ToolMessage(_Message):
    """A tool's result, answering the assistant's call tool_call_id."""

    role: Literal["tool"]
    tool_call_id: Text


# Chosen by role, so that an unknown role reads as one error naming the roles.
Message = Annotated[Union[ChatMessage, AssistantMessage, ToolMessage],  # noqa: UP007
                    Field(discriminator="role")]

# OpenAI's rule for function names.
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="a JSON Schema of an object: the function's arguments")
    strict: bool | None = None


class ChatCompletionTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


def _tool_choice_shape(value: Any) -> str:
    return "named" if isinstance(value, dict) else "mode"


ToolChoice = Annotated[Union[  # noqa: UP007
    Annotated[Literal["none", "auto", "required"], Tag("mode")],
    Annotated[NamedToolChoice, Tag("named")]], Discriminator(_tool_choice_shape)]


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"examples": _CHAT_EXAMPLES})

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the chat template places the special tokens
    modalities: list[Literal["text"]] | None = None
    tools: list[ChatCompletionTool] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description='default: "auto" with tools, "none" without')
    parallel_tool_calls: bool = True


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(OpenAIBaseModel):
    """The legacy shape; with echo, the first prompt token's logprob is null."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    """A whole completion, or (with usage None or choices empty) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIBaseModel):
    """A streamed piece of tool call `index`: its id, type and name first, then fragments of
    its arguments to append."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "fleetllm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizePromptRequest(RequestModel):
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True


class TokenizeChatRequest(RequestModel):
    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[ChatCompletionTool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the chat template places the special tokens


def _tokenize_shape(value: Any) -> str:
    return "tokenize[chat]" if isinstance(value, dict) and "messages" in value else (
        "tokenize[prompt]")


TokenizeRequest = Annotated[Union[  # noqa: UP007
    Annotated[TokenizePromptRequest, Tag("tokenize[prompt]")],
    Annotated[TokenizeChatRequest, Tag("tokenize[chat]")]],
                            Discriminator(_tokenize_shape)]


class TokenizeResponse(OpenAIBaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
