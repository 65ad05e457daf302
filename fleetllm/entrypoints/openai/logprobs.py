"""Logprobs in the OpenAI shapes: the legacy completions one (with echo, prompt tokens
first), and chat's."""

from __future__ import annotations

from collections.abc import Callable

from fleetllm.engine.output import Logprob

from .protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs

MIN_LOGPROB = -9999.0  # JSON has no -inf

Entry = dict[int, Logprob]


def _token_text(lp: Logprob | None, token_id: int,
                decode: Callable[[int], str | None] | None = None) -> str:
    text = lp.decoded_token if lp is not None else decode(token_id) if decode else None
    return f"token_id:{token_id}" if text is None else text


def _value(lp: Logprob) -> float:
    return max(lp.logprob, MIN_LOGPROB)


def completion_logprobs(token_ids: list[int], entries: list[Entry | None], text_offset: int,
                        out: CompletionLogprobs | None = None,
                        decode: Callable[[int], str | None] | None = None
                        ) -> CompletionLogprobs:
    """Appends one position per token to out. An entry of None (the first prompt token,
    which nothing predicts) gets a null logprob and null top_logprobs, as in OpenAI's and
    vLLM's echo, and its text from decode. text_offset is where the first token's text
    starts in the choice's text."""
    out = CompletionLogprobs() if out is None else out
    for tok, entry in zip(token_ids, entries):
        lp = None if entry is None else entry.get(tok)
        text = _token_text(lp, tok, decode)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else _value(lp))
        out.top_logprobs.append(None if entry is None else
                                {_token_text(e, t): _value(e) for t, e in entry.items()})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids: list[int], entries: list[Entry], top: int) -> ChatLogprobs:
    def item(t: int, lp: Logprob) -> ChatTopLogprob:
        text = _token_text(lp, t)
        return ChatTopLogprob(token=text, logprob=_value(lp), bytes=list(text.encode()))

    content = []
    for tok, entry in zip(token_ids, entries):
        ranked = sorted((lp.rank, t, lp) for t, lp in entry.items()
                        if lp.rank is not None and lp.rank <= top)
        sampled = item(tok, entry[tok])
        content.append(ChatTokenLogprob(**sampled.model_dump(),
                                        top_logprobs=[item(t, lp) for _, t, lp in ranked]))
    return ChatLogprobs(content=content)
