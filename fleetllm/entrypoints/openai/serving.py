"""The completions and chat logic of the OpenAI server: requests in, responses or SSE out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import jinja2

from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.engine.output import RequestOutput
from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams
from fleetllm.structured.params import StructuredOutputsParams

from .defaults import DEFAULT_MAX_N, DEFAULT_MAX_PROMPTS_PER_REQUEST
from .errors import OpenAIError
from .logprobs import chat_logprobs, completion_logprobs
from .prompts import PromptProcessor
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    Message,
    SamplingRequest,
)
from .streaming import (
    Delta,
    DeltaTracker,
    Stream,
    Tracker,
    check_outputs,
    final_outputs,
    merge_streams,
    sse,
    usage_of,
    whole,
)
from .tool_parsers import ToolParser
from .tools import ToolOptions, plan_tools, template_messages

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

Prompt = tuple[str | None, list[int]]


@dataclass
class _Echo:
    """A stream's echoed prompts: each prompt's text comes first in its choices, with its
    logprobs where asked (scores: one prompt-logprobs request per prompt, since a stream's
    outputs carry the prompt's logprobs only at its end)."""

    texts: list[str]
    logprobs: bool
    scores: list[Stream] | None = None


def _invalid(e: Exception, default_param: str | None = None) -> OpenAIError:
    # SamplingParams and AsyncLLM name the offending field first in their messages.
    first = str(e).split(" ", 1)[0].split("=", 1)[0]
    param = first if first in SamplingParams.__struct_fields__ else default_param
    return OpenAIError(str(e), param=param)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], track: Tracker,
                 prompts: PromptProcessor, max_n: int = DEFAULT_MAX_N,
                 cut: asyncio.Event | None = None, tool_options: ToolOptions | None = None,
                 max_prompts: int = DEFAULT_MAX_PROMPTS_PER_REQUEST) -> None:
        self.engine = engine
        self.model_names = served_model_names
        self.track = track
        self.prompts = prompts
        self.max_n = max_n
        self.max_prompts = max_prompts
        self.tool_options = tool_options or ToolOptions()
        self.cut = cut  # set when the server's shutdown ends the requests still running
        self.vocab_size = engine.config.model_config.vocab_size

    async def resolve_model(self, name: str | None) -> tuple[str, LoRARequest | None]:
        """The served name to answer with, and the LoRA adapter it names (None: the base
        model); 404 for a model this server does not have. Adapters are looked up in the
        engines, the one registry every API server shares, so a load or unload made through
        any server counts at once everywhere."""
        if name is None or name in self.model_names:
            return name or self.model_names[0], None
        adapters = []
        if self.engine.config.lora_config is not None:
            adapters = await self.engine.get_lora_requests()
            for lora in adapters:
                if lora.lora_name == name:
                    return name, lora
        known = self.model_names + [lora.lora_name for lora in adapters]
        raise OpenAIError(f"the model {name!r} does not exist; this server serves {known}",
                          404, param="model", code="model_not_found")

    # ---- inputs -----------------------------------------------------------------------
    def _check_limits(self, req: SamplingRequest) -> None:
        if req.n > self.max_n:
            raise OpenAIError(f"n={req.n} is more than this server allows (--max-n "
                              f"{self.max_n}); ask for fewer", param="n")
        bad = [t for t in req.stop_token_ids or () if t >= self.vocab_size]
        if bad:
            raise OpenAIError(f"stop_token_ids has token ids outside the vocabulary "
                              f"[0, {self.vocab_size}): {bad[:5]}", param="stop_token_ids")

    def _check_prompt_count(self, req: CompletionRequest) -> None:
        prompt = req.prompt
        count = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) \
            else 1
        if count > self.max_prompts:
            raise OpenAIError(f"the request has {count} prompts, more than this server takes "
                              f"in one request (--max-prompts-per-request {self.max_prompts}); "
                              "send them in several requests", param="prompt")
        most = max(self.max_prompts, self.max_n)
        if count * req.n > most:
            raise OpenAIError(f"n={req.n} completions of each of {count} prompts make "
                              f"{count * req.n}, more than this server runs for one request "
                              f"({most}: --max-prompts-per-request {self.max_prompts}, --max-n "
                              f"{self.max_n}); ask for fewer", param="n")

    def sampling_params(self, req: SamplingRequest, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None = None,
                        constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        try:
            structured = _structured(req)
        except (ValueError, TypeError) as e:
            raise _invalid(e) from e
        if constraint is not None:  # the tool-call schema
            if structured is not None:
                raise OpenAIError("tool_choice \"required\" or a named function constrains "
                                  "the output to tool calls; drop the other output constraint "
                                  "(response_format, structured_outputs, guided_*)",
                                  param="tool_choice")
            structured = constraint
        defaults = self.engine.generation_defaults()
        chosen = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                  "min_p": req.min_p, "repetition_penalty": req.repetition_penalty}
        overrides = {k: v if v is not None else defaults.get(k) for k, v in chosen.items()}
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, seed=req.seed,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                min_tokens=req.min_tokens, skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, logit_bias=req.logit_bias,
                structured_outputs=structured,
                extra_args=({"kv_transfer_params": req.kv_transfer_params.model_dump(
                    exclude_none=True)} if req.kv_transfer_params else None),
                **{k: v for k, v in overrides.items() if v is not None})
        except (ValueError, TypeError) as e:
            raise _invalid(e) from e

    async def completion_prompts(self, prompt: Any, add_special_tokens: bool
                                 ) -> list[Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("the prompt is empty; give at least one token", param="prompt")
        if isinstance(prompt[0], str):
            return [(t, await self.prompts.encode(t, add_special_tokens, "prompt"))
                    for t in prompt]
        if isinstance(prompt[0], list):
            return [(None, ids) for ids in prompt]
        return [(None, prompt)]

    async def chat_prompt(self, messages: list[Message], add_generation_prompt: bool,
                          add_special_tokens: bool = False, bounded: bool = True,
                          tools: list[dict[str, Any]] | None = None) -> Prompt:
        convo = template_messages(messages)
        try:
            text = await self.prompts.render_chat(convo, add_generation_prompt, tools)
        except (ValueError, jinja2.TemplateError) as e:
            raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from e
        return text, await self.prompts.encode(text, add_special_tokens, "messages", bounded)

    def _check(self, ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.engine.check_request(ids, params)
        except ValueError as e:
            raise _invalid(e, param) from e

    def _start(self, prompts: list[Prompt], params: SamplingParams, request_id: str,
               lora: LoRARequest | None = None) -> list[Stream]:
        self.engine.check_health()  # before a stream starts with 200
        return [self.track(self.engine.generate(ids, params, f"{request_id}-{i}", text, lora),
                           len(ids)) for i, (text, ids) in enumerate(prompts)]

    def _sse(self, chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
        return sse(chunks, self.cut)

    # ---- completions ------------------------------------------------------------------
    def _completion_options(self, req: CompletionRequest) -> tuple[int, bool]:
        """(max_tokens for the engine, whether to drop the generated tokens)."""
        if req.suffix:
            raise OpenAIError("suffix (insertion) is not supported by this server",
                              param="suffix")
        if req.best_of not in (None, req.n):
            raise OpenAIError("best_of other than n is not supported by this server",
                              param="best_of")
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens > 0:
            return max_tokens, False
        if not req.echo:
            raise OpenAIError("max_tokens=0 generates nothing; use it with echo=true to score "
                              "the prompt", param="max_tokens")
        if req.min_tokens:
            raise OpenAIError("min_tokens must be 0 with max_tokens=0", param="min_tokens")
        # Scoring: the engine needs at least one step, whose token is then dropped.
        return 1, True

    async def create_completion(self, req: CompletionRequest
                                ) -> CompletionResponse | AsyncIterator[str]:
        model, lora = await self.resolve_model(req.model)
        self._check_limits(req)
        self._check_prompt_count(req)
        max_tokens, drop_generated = self._completion_options(req)
        # A stream that generates gets its prompt's logprobs from a request of their own.
        scored_apart = req.stream and req.echo and req.logprobs is not None and not drop_generated
        prompt_lp = req.logprobs if req.echo and not scored_apart else None
        params = self.sampling_params(req, max_tokens, req.logprobs, prompt_lp)
        prompts = await self.completion_prompts(req.prompt, req.add_special_tokens)
        for _, ids in prompts:
            self._check(ids, params, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._start(prompts, params, request_id, lora)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            echo = None
            if req.echo:
                echo = _Echo([self._echo_text(p) for p in prompts], req.logprobs is not None)
            if scored_apart:
                assert echo is not None and req.logprobs is not None
                echo.scores = self._score(prompts, req.logprobs, request_id, lora)
            return self._sse(self._completion_chunks(streams, DeltaTracker(params), request_id,
                                                     model, include_usage, echo,
                                                     drop_generated))
        finals = await final_outputs(streams)
        choices = [self._completion_choice(ro, whole(i * params.n + o.index, o), req.echo,
                                           drop_generated)
                   for i, ro in enumerate(finals) for o in ro.outputs]
        return CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage_of(finals, generated=not drop_generated))

    def _echo_text(self, prompt: Prompt) -> str:
        text, ids = prompt
        if text is not None or self.engine.tokenizer is None:
            return text or ""
        return self.engine.decode(ids, skip_special_tokens=False)

    def _completion_choice(self, ro: RequestOutput, d: Delta, echo: bool,
                           drop_generated: bool) -> CompletionChoice:
        """One whole choice; with echo, the prompt's text and logprobs come first."""
        if drop_generated:
            d.text, d.token_ids, d.logprobs = "", [], None if d.logprobs is None else []
        if not echo:
            return self._chunk_choice(d)
        prefix = self._echo_text((ro.prompt, ro.prompt_token_ids))
        lps = None
        if d.logprobs is not None:
            lps = completion_logprobs(ro.prompt_token_ids, ro.prompt_logprobs or [], 0,
                                      decode=self._decode_token)
            completion_logprobs(d.token_ids, d.logprobs, len(prefix), lps)
        return CompletionChoice(index=d.index, text=prefix + d.text, logprobs=lps,
                                finish_reason=d.finish_reason, stop_reason=d.stop_reason)

    def _decode_token(self, token_id: int) -> str | None:
        if self.engine.tokenizer is None:
            return None
        return self.engine.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def _chunk_choice(d: Delta, text_offset: int = 0) -> CompletionChoice:
        lps: CompletionLogprobs | None = None
        if d.logprobs is not None:
            lps = completion_logprobs(d.token_ids, d.logprobs, text_offset)
        return CompletionChoice(index=d.index, text=d.text, logprobs=lps,
                                finish_reason=d.finish_reason, stop_reason=d.stop_reason)

    def _score(self, prompts: list[Prompt], logprobs: int, request_id: str,
               lora: LoRARequest | None) -> list[Stream]:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=logprobs)
        return [self.engine.generate(ids, params, f"{request_id}-score-{i}", text, lora)
                for i, (text, ids) in enumerate(prompts)]

    def _echo_logprobs(self, ro: RequestOutput) -> CompletionLogprobs:
        return completion_logprobs(ro.prompt_token_ids, ro.prompt_logprobs or [], 0,
                                   decode=self._decode_token)

    async def _completion_chunks(self, streams: list[Stream], tracker: DeltaTracker,
                                 request_id: str, model: str, include_usage: bool,
                                 echo: _Echo | None, drop_generated: bool
                                 ) -> AsyncIterator[CompletionResponse]:
        """Each choice's chunks; with echo, its prompt's text (and logprobs) first. Chunks of
        a prompt whose logprobs are still to come wait for them (echo.scores). Text offsets
        run on over the tokens' texts, as in the whole answer (a token that ends half a
        UTF-8 character adds none to the text, but its own text, U+FFFD, counts)."""
        def chunk(choice: CompletionChoice) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=model, choices=[choice])

        def choice_of(d: Delta, prefix: str) -> CompletionChoice:
            choice = self._chunk_choice(d, offsets.get(d.index, len(prefix)))
            if choice.logprobs is not None:
                offsets[d.index] = (offsets.get(d.index, len(prefix))
                                    + sum(len(t) for t in choice.logprobs.tokens))
            return choice

        n, first = tracker.n, len(streams)
        waiting: dict[int, list[CompletionResponse]] = {}
        echoed: set[int] = set()
        offsets: dict[int, int] = {}  # where each choice's next token's text starts
        if echo is not None and not echo.logprobs and not drop_generated:
            for i, text in enumerate(echo.texts):
                for k in range(n):
                    yield chunk(CompletionChoice(index=i * n + k, text=text))
            echoed.update(range(first))
        async with aclosing(merge_streams([*streams, *(echo.scores or [])] if echo else streams)
                            ) as merged:
            async for i, ro in merged:
                if i >= first:  # the prompt logprobs of prompt i - first
                    if ro.finished:
                        check_outputs(ro)
                        assert echo is not None
                        lps = self._echo_logprobs(ro)
                        for k in range(n):
                            yield chunk(CompletionChoice(index=(i - first) * n + k,
                                                         text=echo.texts[i - first],
                                                         logprobs=lps.model_copy(deep=True)))
                        echoed.add(i - first)
                        for c in waiting.pop(i - first, []):
                            yield c
                    continue
                deltas = tracker.deltas(i, ro)
                if drop_generated:  # scoring: the prompt alone, with the logprobs at the end
                    assert echo is not None
                    if ro.finished:
                        for o in ro.outputs:
                            lps = self._echo_logprobs(ro) if echo.logprobs else None
                            yield chunk(CompletionChoice(
                                index=i * n + o.index, text=echo.texts[i], logprobs=lps,
                                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
                    continue
                prefix = echo.texts[i] if echo else ""
                out = [chunk(choice_of(d, prefix)) for d in deltas]
                if echo is None or i in echoed:
                    for c in out:
                        yield c
                else:
                    waiting.setdefault(i, []).extend(out)
        if drop_generated:
            tracker.usage.completion_tokens = 0
            tracker.usage.total_tokens = tracker.usage.prompt_tokens
        if include_usage:
            yield CompletionResponse(id=request_id, model=model, choices=[],
                                     usage=tracker.usage)

    # ---- chat -------------------------------------------------------------------------
    async def create_chat_completion(self, req: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        model, lora = await self.resolve_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        self._check_limits(req)  # before the (possibly long) template and tokenization
        plan = plan_tools(req, self.tool_options)
        text, ids = await self.chat_prompt(req.messages, req.add_generation_prompt,
                                           req.add_special_tokens, tools=plan.tools)
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        if max_tokens is None:  # OpenAI's default: whatever room the context leaves
            max_tokens = max(1, self.engine.max_model_len - len(ids))
        top = req.top_logprobs or 0
        params = self.sampling_params(req, max_tokens, top if req.logprobs else None,
                                      constraint=plan.constraint)
        self._check(ids, params, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._start([(text, ids)], params, request_id, lora)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(self._chat_chunks(streams[0], DeltaTracker(params), request_id,
                                               model, top, include_usage, plan.parser))
        ro = (await final_outputs(streams))[0]
        choices = []
        for o in ro.outputs:
            lps = None if o.logprobs is None else chat_logprobs(o.token_ids, o.logprobs, top)
            message, finish = ChatResponseMessage(content=o.text), o.finish_reason
            if plan.parser is not None:
                found = plan.parser().extract_tool_calls(o.text)
                message = ChatResponseMessage(content=found.content, tool_calls=found.tool_calls)
                finish = _tool_finish(finish, found.tools_called)
            choices.append(ChatChoice(index=o.index, message=message, logprobs=lps,
                                      finish_reason=finish, stop_reason=o.stop_reason))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage_of([ro]))

    async def _chat_chunks(self, stream: Stream, tracker: DeltaTracker, request_id: str,
                           model: str, top: int, include_usage: bool,
                           parser: Callable[[], ToolParser] | None
                           ) -> AsyncIterator[ChatCompletionChunk]:
        """With a tool parser, each choice's text goes through its own parser: a chunk
        carries what the parser lets out (content, tool-call pieces), or nothing new but
        logprobs or the finish."""
        parsers: dict[int, ToolParser] = {}
        texts: dict[int, str] = {}
        for index in range(tracker.n):
            yield ChatCompletionChunk(id=request_id, model=model, choices=[ChatStreamChoice(
                index=index, delta=DeltaMessage(role="assistant", content=""))])
        async with aclosing(stream):
            async for ro in stream:
                for d in tracker.deltas(0, ro):
                    lps = None if d.logprobs is None else chat_logprobs(d.token_ids,
                                                                        d.logprobs, top)
                    delta, finish = DeltaMessage(content=d.text), d.finish_reason
                    if parser is not None:
                        if d.index not in parsers:
                            parsers[d.index] = parser()
                        previous = texts.get(d.index, "")
                        texts[d.index] = previous + d.text
                        delta = parsers[d.index].extract_tool_calls_streaming(
                            previous, texts[d.index], d.text, finish is not None
                        ) or DeltaMessage()
                        finish = _tool_finish(finish, parsers[d.index].tools_called)
                        if delta == DeltaMessage() and lps is None and finish is None:
                            continue
                    yield ChatCompletionChunk(id=request_id, model=model, choices=[
                        ChatStreamChoice(index=d.index, delta=delta, logprobs=lps,
                                         finish_reason=finish)])
        if include_usage:
            yield ChatCompletionChunk(id=request_id, model=model, choices=[],
                                      usage=tracker.usage)


def _tool_finish(finish_reason: str | None, tools_called: bool) -> str | None:
    """An output that ended by itself with tool calls ends with "tool_calls"."""
    return "tool_calls" if tools_called and finish_reason == "stop" else finish_reason


def _structured(req: SamplingRequest) -> StructuredOutputsParams | None:
    """The one constraint a request asks for (response_format, structured_outputs or a
    guided_* field), as StructuredOutputsParams; two of them are a 400."""
    asked: dict[str, StructuredOutputsParams] = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        asked["response_format"] = StructuredOutputsParams(json_object=True)
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise OpenAIError("response_format of type json_schema needs a json_schema",
                              param="response_format")
        asked["response_format"] = StructuredOutputsParams(json=fmt.json_schema.schema_)
    if req.structured_outputs is not None:
        so = req.structured_outputs
        asked["structured_outputs"] = StructuredOutputsParams(
            json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
            json_object=so.json_object, disable_any_whitespace=so.disable_any_whitespace)
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            asked[name] = StructuredOutputsParams(**{kind: value})
    if len(asked) > 1:
        raise OpenAIError(f"ask for one output constraint, not {sorted(asked)}",
                          param=sorted(asked)[1])
    return next(iter(asked.values()), None)

