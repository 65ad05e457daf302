"""Prompts to token ids off the event loop, refusing early what cannot fit.

`tokenizers`' single `encode` holds the GIL for the whole call (7 s for 10 MB of text here,
and /health with it); `encode_batch` releases it, so large texts are encoded with it in a
thread pool, in pieces where that is exact (tokenizer_facts.py), and the loop keeps
answering. Chat templates are rendered there too. A prompt is refused unread when the
tokenizer's bytes-per-token bound proves it too long, and otherwise as soon as the pieces
encoded so far are."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fleetllm.engine.async_llm import AsyncLLM

from .errors import OpenAIError
from .tokenizer_facts import TokenizerFacts

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Below this many characters, encoding inline (well under a millisecond) beats a thread hop.
INLINE_CHARS = 4096
# Pieces of a long text, and how many go to encode_batch at once: each GIL hold (turning a
# batch's ids into Python ints) stays around a millisecond, and the Encodings small.
PIECE_CHARS = 1 << 16
PIECES_PER_BATCH = 8


def _too_long(param: str, least: int, max_model_len: int, why: str) -> OpenAIError:
    what = "chat prompt the messages make" if param == "messages" else param
    return OpenAIError(
        f"the {what} has at least {least} tokens{why}, which leaves no room to generate "
        f"within max_model_len={max_model_len}; shorten it", param=param,
        code="context_length_exceeded")


class _Trimmer:
    """glibc's malloc_trim, which hands freed heap pages back to the OS: after a large
    request, the API server's RSS falls back instead of staying at its peak."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self.trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)

    def __call__(self) -> None:
        if self.trim is not None:
            self.trim(0)


class PromptProcessor:
    """Encodes and renders prompts for one engine, in a pool of worker threads."""

    def __init__(self, engine: AsyncLLM, workers: int | None = None) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.hf = engine.tokenizer.tokenizer if engine.tokenizer is not None else None
        self.facts = TokenizerFacts.of(self.hf) if self.hf is not None else TokenizerFacts()
        logger.debug("tokenizer facts: bound %s bytes per token, splittable %s",
                     self.facts.bytes_per_token, self.facts.splittable)
        workers = workers or min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fleetllm-prompts")
        self.trimmer = _Trimmer()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def release_memory(self) -> None:
        await self.run(self.trimmer)

    def refuse_early(self, text: str, param: str) -> None:
        """400 for a text that surely has max_model_len tokens or more (see above)."""
        bound = self.facts.bytes_per_token
        if bound is None or len(text) * 4 < bound * (self.max_model_len - 1):
            return  # cannot be too long: 4 bytes per character at most
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        least = math.ceil(size / bound)
        if least >= self.max_model_len:
            raise _too_long(param, least, self.max_model_len,
                            f" ({size} bytes, at most {bound} bytes per token)")

    async def encode(self, text: str, add_special_tokens: bool, param: str,
                     bounded: bool = True) -> list[int]:
        """Token ids of text; bounded: refuse a text that cannot fit, early where possible."""
        if self.hf is None:
            raise OpenAIError("this server runs without a tokenizer (--skip-tokenizer-init); "
                              "send the prompt as token ids", param=param)
        if bounded:
            self.refuse_early(text, param)
        if len(text) < INLINE_CHARS:
            return self.engine.encode(text, add_special_tokens)
        limit = self.max_model_len if bounded else None
        return await self.run(self._encode_pieces, text, add_special_tokens, param, limit)

    def _encode_pieces(self, text: str, add_special_tokens: bool, param: str,
                       limit: int | None) -> list[int]:
        pieces = self.facts.split(text, PIECE_CHARS)
        if len(pieces) == 1:
            return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        ids = list(self.facts.prefix_ids) if add_special_tokens else []
        for i in range(0, len(pieces), PIECES_PER_BATCH):
            batch = pieces[i:i + PIECES_PER_BATCH]
            for encoding in self.hf.encode_batch(batch, add_special_tokens=False):
                ids.extend(encoding.ids)
            if limit is not None and len(ids) >= limit:
                raise _too_long(param, len(ids), limit, "")
        return ids

    async def render_chat(self, convo: list[dict[str, Any]], add_generation_prompt: bool,
                          tools: list[dict[str, Any]] | None = None) -> str:
        size = sum(len(m["content"]) for m in convo) + (len(json.dumps(tools)) if tools else 0)
        if size < INLINE_CHARS:
            return self._render(convo, add_generation_prompt, tools)
        return await self.run(self._render, convo, add_generation_prompt, tools)

    def _render(self, convo: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None) -> str:
        if tools is None:
            return self.engine.apply_chat_template(convo, add_generation_prompt)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this server runs without a tokenizer (--skip-tokenizer-init), "
                             "so it has no chat template")
        # The template's `tools`, as transformers' apply_chat_template passes them.
        return tokenizer.apply_chat_template(convo, add_generation_prompt, tools=tools)
