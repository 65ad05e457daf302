"""StructuredOutputManager: structured outputs on the engine-core side (held by the Scheduler).

It owns the vocabulary as xgrammar sees it, an LRU of compiled grammars (one compile per
distinct spec), one matcher per structured request, and the step's token bitmask: one row of
ceil(vocab_size / 32) int32 words per structured request that samples this step (bit t % 32 of
word t // 32 set: token t allowed), sent to the workers as bytes inside SchedulerOutput.

A matcher has accepted exactly the request's output tokens that the scheduler has appended:
preemption and recompute keep those tokens, so the matcher is left as it is; tokens of an
abandoned step were never appended, so they were never accepted either.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetllm.structured.grammar import compile_grammar

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig
    from fleetllm.sched.request import Request

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept; each holds per-token tables of the vocab


def check_engine_supports(config: EngineConfig) -> None:
    """Raises ValueError if this engine cannot run structured outputs at all."""
    if config.model_config.skip_tokenizer_init:
        raise ValueError("structured outputs need the model's tokenizer; create the engine "
                         "without skip_tokenizer_init=True")
    if config.scheduler_config.async_scheduling:
        raise ValueError("structured outputs are not supported with async_scheduling=True "
                         "(the next step's token mask needs the token still in flight); "
                         "create the engine without async_scheduling")


@dataclass
class RequestGrammar:
    matcher: Any  # xgrammar.GrammarMatcher
    num_accepted: int = 0  # output tokens the matcher has accepted


class StructuredOutputManager:
    def __init__(self, config: EngineConfig, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.config = config
        self.vocab_size = config.model_config.vocab_size
        self.cache_size = cache_size
        self.num_compiled = 0
        self._compiler: Any = None  # built with the first structured request
        self._batch: Any = None
        self._compiled: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self._grammars: dict[str, RequestGrammar] = {}
        self._bitmask = np.zeros((0, -(-self.vocab_size // 32)), dtype=np.int32)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._grammars

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            mc = self.config.model_config
            tok_file = Path(mc.model) / "tokenizer.json"
            if not tok_file.is_file():
                raise ValueError(f"structured outputs need the model's tokenizer, and "
                                 f"{tok_file} is missing")
            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_file)))
            # The mask is as wide as the logits: tokens past the tokenizer's are never allowed.
            info = xgr.TokenizerInfo.from_huggingface(
                tok, vocab_size=self.vocab_size, stop_token_ids=list(mc.eos_token_ids) or None)
            # The LRU below is the cache; xgrammar's own would keep a second copy.
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            self._batch = xgr.BatchGrammarMatcher()
        return self._compiler

    def _compile(self, req: Request) -> Any:
        spec = req.sampling_params.structured_outputs
        key = spec.key()
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
            return compiled
        compiled = compile_grammar(self._get_compiler(), spec)
        self.num_compiled += 1
        self._compiled[key] = compiled
        if len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return compiled

    def add_request(self, req: Request) -> None:
        """Compiles (or finds) the request's grammar and gives it a matcher, which accepts the
        output tokens the request already has (one resumed on another engine)."""
        import xgrammar as xgr

        check_engine_supports(self.config)
        params = req.sampling_params
        # The grammar may end on EOS even with ignore_eos (the request then stops, as its
        # output is complete), or on one of the request's stop tokens.
        stop = list(dict.fromkeys([*req.eos_token_ids, *params.stop_token_ids]))
        matcher = xgr.GrammarMatcher(self._compile(req), override_stop_tokens=stop or None)
        self._grammars[req.request_id] = RequestGrammar(matcher)
        self.accept_tokens(req)

    def remove_request(self, req_id: str) -> None:
        self._grammars.pop(req_id, None)

    def accept_tokens(self, req: Request) -> bool:
        """Advances the matcher over the output tokens it has not seen; True if the grammar
        has ended (it accepted a stop token), so the request is complete."""
        g = self._grammars[req.request_id]
        start = req.num_prompt_tokens + g.num_accepted
        for tok in req.all_token_ids[start:]:
            g.num_accepted += 1
            if not g.matcher.accept_token(tok):
                # The mask allowed only what the grammar accepts, so this is a bug; end the
                # request rather than let it go on outside its grammar.
                logger.error("request %s: token %d is not allowed by its grammar; stopping it",
                             req.request_id, tok)
                return True
        return g.matcher.is_terminated()

    def grammar_bitmask(self, reqs: list[Request]) -> bytes:
        """The allowed-token bitmask of each request's next token, rows in reqs' order."""
        n = len(reqs)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.zeros((max(n, 2 * self._bitmask.shape[0]),
                                      self._bitmask.shape[1]), dtype=np.int32)
        rows = self._bitmask[:n]
        self._batch.batch_fill_next_token_bitmask(
            [self._grammars[r.request_id].matcher for r in reqs], rows)
        return rows.astype("<i4", copy=False).tobytes()
