"""The completions and chat logic of the OpenAI server: requests in, responses or SSE out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import jinja2
from pydantic import BaseModel

from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.engine.output import CompletionOutput, Logprob, RequestOutput
from fleetllm.errors import EngineDeadError
from fleetllm.sampling_params import SamplingParams

from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    SamplingRequest,
    UsageInfo,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Stream = AsyncIterator[RequestOutput]
# Wraps a request's output stream (the server's metrics hook); called with the prompt length.
Tracker = Callable[[Stream, int], Stream]

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_LOGPROB = -9999.0  # JSON has no -inf


class OpenAIError(Exception):
    """An error the client caused (or the engine's death), with its HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=str(self), type=self.type,
                                             param=self.param, code=self.code))

    @staticmethod
    def from_exception(e: Exception) -> OpenAIError:
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, EngineDeadError):
            return OpenAIError(str(e), 503, "server_error", code="engine_dead")
        logger.error("request failed", exc_info=e)
        return OpenAIError(f"internal error: {type(e).__name__}", 500, "server_error")


def _invalid(e: Exception, default_param: str | None = None) -> OpenAIError:
    # SamplingParams and AsyncLLM name the offending field first in their messages.
    first = str(e).split(" ", 1)[0].split("=", 1)[0]
    param = first if first in SamplingParams.__struct_fields__ else default_param
    return OpenAIError(str(e), param=param)


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index, item) from several streams as items arrive; closing it closes them all."""
    loop = asyncio.get_running_loop()
    pending = {loop.create_task(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[loop.create_task(anext(streams[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events; an error mid-stream becomes an error event, then [DONE]."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception as e:
        yield f"data: {OpenAIError.from_exception(e).body().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


@dataclass
class _Delta:
    """What one choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int
    finish_reason: str | None
    stop_reason: int | str | None


class _DeltaTracker:
    """Turns cumulative outputs into deltas, holding back text a stop string may still
    remove, and counts usage."""

    def __init__(self, params: SamplingParams) -> None:
        self.n = params.n
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.done: set[int] = set()
        self.usage = UsageInfo()

    def deltas(self, prompt_index: int, ro: RequestOutput) -> list[_Delta]:
        result = []
        for o in ro.outputs:
            index = prompt_index * self.n + o.index
            if index in self.done:
                continue
            finished = o.finish_reason is not None
            start, tok_start = self.sent_text.get(index, 0), self.sent_tokens.get(index, 0)
            end = len(o.text) if finished else max(start, len(o.text) - self.hold)
            # New tokens make a chunk even when their text is held back (half a UTF-8
            # character, or a possible stop string): clients see progress and logprobs.
            if end == start and len(o.token_ids) == tok_start and not finished:
                continue
            self.sent_text[index], self.sent_tokens[index] = end, len(o.token_ids)
            lps = None if o.logprobs is None else o.logprobs[tok_start:]
            result.append(_Delta(index, o.text[start:end], o.token_ids[tok_start:], lps, start,
                                 o.finish_reason, o.stop_reason))
            if finished:
                self.done.add(index)
                self.usage.completion_tokens += len(o.token_ids)
        if ro.finished:
            self.usage.prompt_tokens += len(ro.prompt_token_ids)
        self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens
        return result


async def final_outputs(streams: list[Stream]) -> list[RequestOutput]:
    """The finished output of each stream, in order."""
    finals: dict[int, RequestOutput] = {}
    async with aclosing(merge_streams(streams)) as merged:
        async for i, ro in merged:
            finals[i] = ro
    return [finals[i] for i in range(len(streams))]


def usage_of(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(ro.prompt_token_ids) for ro in finals)
    completion = sum(len(o.token_ids) for ro in finals for o in ro.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def _whole(index: int, o: CompletionOutput) -> _Delta:
    return _Delta(index, o.text, o.token_ids, o.logprobs, 0, o.finish_reason, o.stop_reason)


def _token_text(lp: Logprob, token_id: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                        text_offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for tok, entry in zip(token_ids, entries):
        text = _token_text(entry[tok], tok)
        out.tokens.append(text)
        out.token_logprobs.append(max(entry[tok].logprob, MIN_LOGPROB))
        out.top_logprobs.append({_token_text(lp, t): max(lp.logprob, MIN_LOGPROB)
                                 for t, lp in entry.items()})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                  top: int) -> ChatLogprobs:
    def item(t: int, lp: Logprob) -> ChatTopLogprob:
        text = _token_text(lp, t)
        return ChatTopLogprob(token=text, logprob=max(lp.logprob, MIN_LOGPROB),
                              bytes=list(text.encode()))

    content = []
    for tok, entry in zip(token_ids, entries):
        ranked = sorted((lp.rank, t, lp) for t, lp in entry.items()
                        if lp.rank is not None and lp.rank <= top)
        sampled = item(tok, entry[tok])
        content.append(ChatTokenLogprob(**sampled.model_dump(),
                                        top_logprobs=[item(t, lp) for _, t, lp in ranked]))
    return ChatLogprobs(content=content)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str],
                 track: Tracker) -> None:
        self.engine = engine
        self.model_names = served_model_names
        self.track = track

    def check_model(self, name: str | None) -> str:
        """The served name to answer with; 404 for a model this server does not have."""
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise OpenAIError(f"the model {name!r} does not exist; this server serves "
                          f"{self.model_names}", 404, param="model", code="model_not_found")

    # ---- inputs -----------------------------------------------------------------------
    def sampling_params(self, req: SamplingRequest, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
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
                **{k: v for k, v in overrides.items() if v is not None})
        except (ValueError, TypeError) as e:
            raise _invalid(e) from e

    def completion_prompts(self, prompt: Any) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            try:
                return [(t, self.engine.encode(t)) for t in texts]
            except ValueError as e:
                raise _invalid(e, "prompt") from e
        if prompt and isinstance(prompt[0], list):
            return [(None, ids) for ids in prompt]
        return [(None, prompt)]

    def chat_prompt(self, messages: list[ChatMessage],
                    add_generation_prompt: bool) -> tuple[str, list[int]]:
        convo = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" or p.text is None for p in content):
                    raise OpenAIError(f"messages[{i}]: only text content parts are supported",
                                      param="messages")
                content = "".join(p.text for p in content)
            convo.append({"role": m.role, "content": content or ""})
        try:
            text = self.engine.apply_chat_template(convo, add_generation_prompt)
        except (ValueError, jinja2.TemplateError) as e:
            raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from e
        return text, self.engine.encode(text, add_special_tokens=False)

    def _check(self, ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.engine.check_request(ids, params)
        except ValueError as e:
            raise _invalid(e, param) from e

    def _start(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
               request_id: str) -> list[Stream]:
        self.engine.check_health()  # before a stream starts with 200
        return [self.track(self.engine.generate(ids, params, f"{request_id}-{i}", text),
                           len(ids)) for i, (text, ids) in enumerate(prompts)]

    # ---- completions ------------------------------------------------------------------
    async def create_completion(self, req: CompletionRequest
                                ) -> CompletionResponse | AsyncIterator[str]:
        model = self.check_model(req.model)
        if req.echo or req.suffix or req.logit_bias or req.best_of not in (None, req.n):
            raise OpenAIError("echo, suffix, logit_bias and best_of are not supported")
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        params = self.sampling_params(req, max_tokens, req.logprobs)
        prompts = self.completion_prompts(req.prompt)
        for _, ids in prompts:
            self._check(ids, params, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._start(prompts, params, request_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(self._completion_chunks(streams, _DeltaTracker(params), request_id, model,
                                               include_usage))
        finals = await final_outputs(streams)
        choices = [self._completion_choice(_whole(i * params.n + o.index, o))
                   for i, ro in enumerate(finals) for o in ro.outputs]
        return CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage_of(finals))

    @staticmethod
    def _completion_choice(d: _Delta) -> CompletionChoice:
        lps = None if d.logprobs is None else completion_logprobs(d.token_ids, d.logprobs,
                                                                 d.text_offset)
        return CompletionChoice(index=d.index, text=d.text, logprobs=lps,
                                finish_reason=d.finish_reason, stop_reason=d.stop_reason)

    async def _completion_chunks(self, streams: list[Stream], tracker: _DeltaTracker,
                                 request_id: str, model: str, include_usage: bool
                                 ) -> AsyncIterator[CompletionResponse]:
        async with aclosing(merge_streams(streams)) as merged:
            async for i, ro in merged:
                for d in tracker.deltas(i, ro):
                    yield CompletionResponse(id=request_id, model=model,
                                             choices=[self._completion_choice(d)])
        if include_usage:
            yield CompletionResponse(id=request_id, model=model, choices=[],
                                     usage=tracker.usage)

    # ---- chat -------------------------------------------------------------------------
    async def create_chat_completion(self, req: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        model = self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        text, ids = self.chat_prompt(req.messages, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        if max_tokens is None:  # OpenAI's default: whatever room the context leaves
            max_tokens = max(1, self.engine.max_model_len - len(ids))
        top = req.top_logprobs or 0
        params = self.sampling_params(req, max_tokens, top if req.logprobs else None)
        self._check(ids, params, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._start([(text, ids)], params, request_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(self._chat_chunks(streams[0], _DeltaTracker(params), request_id, model, top,
                                         include_usage))
        ro = (await final_outputs(streams))[0]
        choices = []
        for o in ro.outputs:
            lps = None if o.logprobs is None else chat_logprobs(o.token_ids, o.logprobs, top)
            choices.append(ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                                      logprobs=lps, finish_reason=o.finish_reason,
                                      stop_reason=o.stop_reason))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage_of([ro]))

    async def _chat_chunks(self, stream: Stream, tracker: _DeltaTracker, request_id: str,
                           model: str, top: int, include_usage: bool
                           ) -> AsyncIterator[ChatCompletionChunk]:
        for index in range(tracker.n):
            yield ChatCompletionChunk(id=request_id, model=model, choices=[ChatStreamChoice(
                index=index, delta=DeltaMessage(role="assistant", content=""))])
        async with aclosing(stream):
            async for ro in stream:
                for d in tracker.deltas(0, ro):
                    lps = None if d.logprobs is None else chat_logprobs(d.token_ids,
                                                                        d.logprobs, top)
                    yield ChatCompletionChunk(id=request_id, model=model, choices=[
                        ChatStreamChoice(index=d.index, delta=DeltaMessage(content=d.text),
                                         logprobs=lps, finish_reason=d.finish_reason)])
        if include_usage:
            yield ChatCompletionChunk(id=request_id, model=model, choices=[],
                                      usage=tracker.usage)
