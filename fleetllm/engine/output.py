"""Turns engine-core token deltas into RequestOutputs: detokenize, stop strings, n > 1."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetllm.engine.tokenizer import Tokenizer
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.output import EngineCoreOutput, PromptLogprobs


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # With finish_reason "error": why this request failed alone (the others went on).
    error: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class _Child:
    """One of the n completions of a request, as the engine core sees it."""

    parent: _Parent
    output: CompletionOutput
    params: SamplingParams
    stream: object | None
    max_stop_len: int


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_unfinished: int
    num_cached_tokens: int = 0
    # position -> {token id: Logprob}; a recomputed chunk (after preemption) overwrites
    prompt_logprobs: dict[int, dict[int, Logprob]] = field(default_factory=dict)
    want_prompt_logprobs: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.children: dict[str, _Child] = {}

    def add_request(self, request_id: str, child_ids: list[str], prompt: str | None,
                    prompt_token_ids: list[int], params: SamplingParams) -> None:
        outputs = [CompletionOutput(i, "", [], None if params.logprobs is None else 0.0,
                                    None if params.logprobs is None else [])
                   for i in range(len(child_ids))]
        parent = _Parent(request_id, prompt, prompt_token_ids, outputs, len(child_ids),
                         want_prompt_logprobs=params.prompt_logprobs is not None)
        max_stop = max((len(s) for s in params.stop), default=0)
        for child_id, out in zip(child_ids, outputs):
            stream = (self.tokenizer.decode_stream(params.skip_special_tokens)
                      if self.tokenizer is not None else None)
            self.children[child_id] = _Child(parent, out, params, stream, max_stop)

    def has_unfinished(self) -> bool:
        return bool(self.children)

    def abort(self, child_ids: list[str]) -> None:
        for child_id in child_ids:
            self.children.pop(child_id, None)

    def process_outputs(self, outputs: list[EngineCoreOutput]
                        ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the finished RequestOutputs and the child ids stopped by a stop string
        (which the engine core must abort)."""
        finished: list[RequestOutput] = []
        to_abort: list[str] = []
        for eo in outputs:
            child = self.children.get(eo.request_id)
            if child is None:
                continue
            parent = child.parent
            if eo.prompt_logprobs is not None:
                self._add_prompt_logprobs(parent, eo.prompt_logprobs)
            stopped_by_string = self._append(child, eo)
            out = child.output
            if stopped_by_string and not eo.finished:
                to_abort.append(eo.request_id)
            if eo.finished and not stopped_by_string:
                out.finish_reason, out.stop_reason = eo.finish_reason, eo.stop_reason
                out.error = eo.error
            parent.num_cached_tokens = max(parent.num_cached_tokens, eo.num_cached_tokens)
            if out.finish_reason is not None:
                del self.children[eo.request_id]
                parent.num_unfinished -= 1
                if parent.num_unfinished == 0:
                    finished.append(self._request_output(parent))
        return finished, to_abort

    def _append(self, child: _Child, eo: EngineCoreOutput) -> bool:
        out = child.output
        for j, tok in enumerate(eo.new_token_ids):
            out.token_ids.append(tok)
            if eo.new_logprobs is not None and out.logprobs is not None:
                self._add_logprobs(out, *eo.new_logprobs[j])
            if child.stream is None:
                continue
            if (j == len(eo.new_token_ids) - 1 and eo.finish_reason == "stop"
                    and not isinstance(eo.stop_reason, str)
                    and not child.params.include_stop_str_in_output):
                continue  # an eos or stop token id ends the text without adding to it
            piece = child.stream.step(self.tokenizer.tokenizer, tok)
            if not piece:
                continue
            before = len(out.text)
            out.text += piece
            if child.max_stop_len and self._check_stop_strings(child, before):
                return True
        return False

    @staticmethod
    def _check_stop_strings(child: _Child, before: int) -> bool:
        out = child.output
        search_from = max(0, before - child.max_stop_len + 1)
        for stop in child.params.stop:
            idx = out.text.find(stop, search_from)
            if idx != -1:
                end = idx + len(stop) if child.params.include_stop_str_in_output else idx
                out.text = out.text[:end]
                out.finish_reason, out.stop_reason = "stop", stop
                return True
        return False

    def _add_logprobs(self, out: CompletionOutput, ids: list[int], lps: list[float],
                      rank: int) -> None:
        decode = self._decoder()
        entry = {ids[0]: Logprob(lps[0], rank, decode(ids[0]))}
        for r, (tok, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            entry.setdefault(tok, Logprob(lp, r, decode(tok)))
        out.logprobs.append(entry)
        out.cumulative_logprob += lps[0]

    def _add_prompt_logprobs(self, parent: _Parent, plp: PromptLogprobs) -> None:
        decode = self._decoder()
        prompt = parent.prompt_token_ids
        for j, (lp, rank) in enumerate(zip(plp.token_logprobs, plp.ranks)):
            pos = plp.start + 1 + j
            entry = {prompt[pos]: Logprob(lp, rank, decode(prompt[pos]))}
            if plp.top_ids:
                for r, (tok, tlp) in enumerate(zip(plp.top_ids[j], plp.top_logprobs[j]), 1):
                    entry.setdefault(tok, Logprob(tlp, r, decode(tok)))
            parent.prompt_logprobs[pos] = entry

    def _decoder(self):
        if self.tokenizer is None:
            return lambda t: None
        return lambda t: self.tokenizer.decode([t], skip_special_tokens=False)

    def _request_output(self, parent: _Parent) -> RequestOutput:
        prompt_lp = None
        if parent.want_prompt_logprobs:
            prompt_lp = [None] + [parent.prompt_logprobs.get(i)
                                  for i in range(1, len(parent.prompt_token_ids))]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             parent.outputs, True, parent.num_cached_tokens, prompt_lp)
