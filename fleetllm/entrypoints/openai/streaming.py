"""Request outputs to response pieces: merged streams, deltas, server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from fleetllm.engine.output import CompletionOutput, Logprob, RequestOutput
from fleetllm.sampling_params import SamplingParams

from .errors import OpenAIError, shutting_down
from .protocol import UsageInfo

T = TypeVar("T")
Stream = AsyncIterator[RequestOutput]
# Wraps a request's output stream (the server's metrics hook); called with the prompt length.
Tracker = Callable[[Stream, int], Stream]

E001 = "[E001]"  # out of memory even alone: the request is too large for this server


def engine_error(o: CompletionOutput) -> OpenAIError:
    """A request the engine failed alone (finish_reason "error"). Out of memory (E001) is
    400: the request is too large for this server, a retry fails the same way, and the
    client can fix it (a shorter prompt, fewer tokens, a smaller n); a 5xx would make
    clients such as openai's retry it. Anything else (a sleeping engine) is 503."""
    message = o.error or "the engine could not run this request"
    if E001 in message:
        return OpenAIError(message, 400, code="out_of_memory")
    return OpenAIError(message, 503, "server_error", code="engine_error")


def check_outputs(ro: RequestOutput) -> None:
    for o in ro.outputs:
        if o.finish_reason == "error":
            raise engine_error(o)


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


async def _until_cut(chunks: AsyncIterator[T], cut: asyncio.Event) -> AsyncIterator[T]:
    """chunks, ended early (raising the shutdown error) once cut is set."""
    loop = asyncio.get_running_loop()
    cut_task = loop.create_task(cut.wait())
    try:
        while True:
            step = loop.create_task(anext(chunks))
            await asyncio.wait({step, cut_task}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                raise shutting_down()
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        cut_task.cancel()


async def sse(chunks: AsyncIterator[BaseModel], cut: asyncio.Event | None = None
              ) -> AsyncIterator[str]:
    """Server-sent events; an error mid-stream, or the server's shutdown cutting it (cut
    set), becomes an error event, then [DONE]."""
    try:
        async with aclosing(chunks):
            source = chunks if cut is None else _until_cut(chunks, cut)
            async with aclosing(source):
                async for chunk in source:
                    yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception as e:
        yield f"data: {OpenAIError.from_exception(e).body().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


@dataclass
class Delta:
    """What one choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Turns cumulative outputs into deltas, holding back text a stop string may still
    remove, and counts usage. An output that failed in the engine raises its error."""

    def __init__(self, params: SamplingParams) -> None:
        self.n = params.n
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.done: set[int] = set()
        self.usage = UsageInfo()

    def deltas(self, prompt_index: int, ro: RequestOutput) -> list[Delta]:
        check_outputs(ro)
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
            result.append(Delta(index, o.text[start:end], o.token_ids[tok_start:], lps, start,
                                o.finish_reason, o.stop_reason))
            if finished:
                self.done.add(index)
                self.usage.completion_tokens += len(o.token_ids)
        if ro.finished:
            self.usage.prompt_tokens += len(ro.prompt_token_ids)
        self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens
        return result


async def final_outputs(streams: list[Stream]) -> list[RequestOutput]:
    """The finished output of each stream, in order; a request the engine failed raises."""
    finals: dict[int, RequestOutput] = {}
    async with aclosing(merge_streams(streams)) as merged:
        async for i, ro in merged:
            if ro.finished:
                check_outputs(ro)
            finals[i] = ro
    return [finals[i] for i in range(len(streams))]


def usage_of(finals: list[RequestOutput], generated: bool = True) -> UsageInfo:
    prompt = sum(len(ro.prompt_token_ids) for ro in finals)
    completion = sum(len(o.token_ids) for ro in finals for o in ro.outputs) if generated else 0
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def whole(index: int, o: CompletionOutput) -> Delta:
    return Delta(index, o.text, o.token_ids, o.logprobs, 0, o.finish_reason, o.stop_reason)
