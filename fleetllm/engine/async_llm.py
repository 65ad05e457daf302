"""AsyncLLM: an asyncio front end over engine-core processes, for the OpenAI server.

Requests go out through SyncMPClient's ROUTER socket; outputs come back on an asyncio task
that reads the PULL socket, detokenizes, and wakes each request's generator. The event loop
also watches the manager's engine events: a dead engine's requests are re-sent (their
streams pause meanwhile), and only an engine dead for good fails every waiter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from fleetllm.config import EngineArgs, EngineConfig
from fleetllm.distributed.reconfigure import ReconfigureRankType
from fleetllm.engine.client import (
    DRAIN_TIMEOUT_S,
    RETIRE_WAIT_S,
    SCALE_TIMEOUT_S,
    SyncMPClient,
    check_utility_results,
)
from fleetllm.engine.inputs import (
    check_lora,
    check_params,
    check_prompt,
    child_request_ids,
    generation_defaults,
    make_requests,
)
from fleetllm.engine.launch import EngineConnection
from fleetllm.engine.messages import EngineCoreRequestType, UtilityCall, UtilityResult
from fleetllm.engine.output import CompletionOutput, OutputProcessor, RequestOutput
from fleetllm.engine.protocol import forward_engine_methods_async
from fleetllm.engine.tokenizer import Tokenizer
from fleetllm.errors import EngineDeadError
from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.output import EngineCoreOutput

logger = logging.getLogger(__name__)

# While an engine is not live yet, how often to look for its registration.
REGISTRATION_POLL_S = 0.05
DRAIN_POLL_S = 0.05  # how often a scale-down looks whether its engines have drained


class _AsyncMPClient(SyncMPClient):
    """SyncMPClient's start-up, sends, recovery and shutdown, with outputs read by an
    asyncio task and engine events applied from the event loop.

    The sync receive paths (step, call_utility) are not used: the task owns the socket."""

    def __init__(self, config: EngineConfig, data_parallel_size: int,
                 on_outputs: Callable[[list[EngineCoreOutput]], None],
                 on_dead: Callable[[], None], data_parallel_backend: str = "mp",
                 connection: EngineConnection | None = None) -> None:
        # Set before start-up, whose failure path calls our shutdown.
        self._on_outputs = on_outputs
        self._on_dead = on_dead
        self._futures: dict[int, asyncio.Future[UtilityResult]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._events_fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        super().__init__(config, data_parallel_size, data_parallel_backend,
                         connection=connection)

    def start(self) -> None:
        """Binds to the running loop on first use; later calls do nothing."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._socket = zmq.asyncio.Socket.from_socket(self.output)
        self._events_fd = self.proc_manager.events_fd()
        if self._events_fd is not None:
            self._loop.add_reader(self._events_fd, self._on_events)
        self._task = self._loop.create_task(self._output_loop())
        self._on_events()  # whatever happened before the loop was there

    async def _output_loop(self) -> None:
        try:
            while True:
                outputs = self._receive(self.decoder.decode(await self._socket.recv()))
                if outputs:
                    self._on_outputs(outputs)
        except Exception as e:  # the front end cannot route outputs any more
            logger.exception("reading engine outputs failed")
            self._fail(f"{type(e).__name__}: {e}")

    def _on_events(self) -> None:
        """Applies engine events; while an engine is not live, looks again shortly (its
        registration arrives on a socket the loop does not watch)."""
        self._timer = None
        try:
            self._poll_events()
        except Exception as e:
            logger.exception("applying engine events failed")
            self._fail(f"{type(e).__name__}: {e}")
        if (self.dead_reason is None and self._timer is None
                and not all(e.live for e in self.engines)):
            self._timer = self._loop.call_later(REGISTRATION_POLL_S, self._on_events)

    def _utility_done(self, result: UtilityResult) -> None:
        future = self._futures.pop(result.call_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _fail_calls(self, call_id: int, error: Exception) -> None:
        future = self._futures.pop(call_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _fail(self, reason: str) -> None:
        """The engine is dead for good: fails every waiter, utility calls here, requests
        through on_dead."""
        if self.dead_reason is not None:
            return
        super()._fail(reason)
        self._stop_reading()
        for future in self._futures.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._futures.clear()
        self._pending_calls.clear()
        self._on_dead()

    def _stop_reading(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        if self._events_fd is not None:
            self._loop.remove_reader(self._events_fd)
            self._events_fd = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def call_utility_async(self, method: str, *args: Any,
                                 indexes: list[int] | None = None) -> list[Any]:
        """Calls an EngineCore method on every engine (or those of `indexes`); one result
        per engine. Fails with EngineRestartingError if an engine is down or dies meanwhile
        (no retry)."""
        self.start()
        self._poll_events()
        self._check_alive()
        self._check_all_live(method)
        engines = self._targets(indexes)
        call_ids = [next(self._call_ids) for _ in engines]
        futures = [self._loop.create_future() for _ in call_ids]
        self._futures.update(zip(call_ids, futures))
        try:
            for call_id, engine in zip(call_ids, engines):
                self._pending_calls[call_id] = engine.index
                self._send(engine.index, EngineCoreRequestType.UTILITY,
                           self.encoder.encode(UtilityCall(call_id, method, list(args))))
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for call_id in call_ids:
                self._pending_calls.pop(call_id, None)
                self._futures.pop(call_id, None)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        return check_utility_results(method, results)

    async def scale_data_parallel_async(self, new_size: int, drain_timeout: float,
                                        timeout_s: float = SCALE_TIMEOUT_S) -> None:
        """SyncMPClient.scale_data_parallel from the event loop: engines start and stop in
        a thread, while requests keep streaming."""
        self.start()
        old = self._begin_scale(new_size)
        try:
            if new_size > old:
                indexes, epoch = await asyncio.to_thread(self.proc_manager.add_engines,
                                                         new_size - old, timeout_s)
                self._add_links(indexes, epoch)
                self._on_events()  # looks for their registrations until they are live
                while not all(self.engines[i].live for i in indexes):
                    await asyncio.sleep(REGISTRATION_POLL_S)
                    self._check_alive()
            elif new_size < old:
                retiring = list(range(new_size, old))
                self._begin_drain(retiring)
                deadline = time.monotonic() + drain_timeout
                while self._on_engines(retiring) and time.monotonic() < deadline:
                    await asyncio.sleep(DRAIN_POLL_S)
                self._migrate(retiring)
                await self.call_utility_async(
                    "reinitialize_distributed", new_size,
                    ReconfigureRankType.SHUTDOWN_CURRENT_RANK, indexes=retiring)
                await asyncio.to_thread(self.proc_manager.retire_engines, retiring,
                                        RETIRE_WAIT_S)
                self._remove_links(new_size)
            await self.call_utility_async(
                "reinitialize_distributed", new_size, ReconfigureRankType.KEEP_CURRENT_RANK,
                indexes=list(range(min(old, new_size))))
        finally:
            self._end_scale()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._fail("the engine was shut down")
        if self._socket is not None and self._loop is not None and not self._loop.is_closed():
            self._socket.close(linger=0)
        super().shutdown()


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    processor: OutputProcessor
    outputs: list[CompletionOutput]
    wake: asyncio.Event
    final: RequestOutput | None = None

    def snapshot(self) -> RequestOutput:
        """A copy, so later steps do not change what the consumer holds."""
        outputs = [dataclasses.replace(o, token_ids=o.token_ids[:],
                                       logprobs=None if o.logprobs is None else o.logprobs[:])
                   for o in self.outputs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, False)


@forward_engine_methods_async
class AsyncLLM:
    """Serves many concurrent requests from one event loop (the one that first uses it)."""

    def __init__(self, config: EngineConfig, data_parallel_size: int = 1,
                 data_parallel_backend: str = "mp",
                 connection: EngineConnection | None = None) -> None:
        self.config = config
        mc = config.model_config
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer(mc.model)
        self.max_model_len = config.scheduler_config.max_model_len
        eos = mc.eos_token_ids
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = tuple(dict.fromkeys((*eos, self.tokenizer.eos_token_id)))
        self._eos_token_ids = eos
        self._requests: dict[str, _RequestState] = {}
        self._parent_of: dict[str, str] = {}  # child (engine) request id -> request id
        self._dead = asyncio.Event()
        # When the engines last showed progress (an output, or an idle moment), so a step
        # that runs past execute_model_timeout_s shows as hung on /health.
        self._progress_at = time.monotonic()
        self.engine_core = _AsyncMPClient(config, data_parallel_size, self._process,
                                          self._wake_all, data_parallel_backend, connection)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, data_parallel_size: int = 1,
                         data_parallel_backend: str = "mp") -> AsyncLLM:
        return cls(args.create_engine_config(), data_parallel_size, data_parallel_backend)

    # ---- state ------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        """True once the engine is dead for good: an engine core died and could not be
        restarted (none left within max_worker_restarts, or its restart failed). While a
        dead engine core restarts, the engine is recovering, not errored."""
        return self.engine_core.dead_reason is not None

    @property
    def is_dead(self) -> bool:
        return self.errored

    def check_health(self) -> None:
        """Raises EngineDeadError once the engine is dead."""
        if self.errored:
            raise EngineDeadError(f"the engine is dead ({self.engine_core.dead_reason}); "
                                  "restart the server")

    @property
    def num_engine_restarts(self) -> int:
        """Engine cores that died and were restarted (each one once it was ready again)."""
        return self.engine_core.num_engine_restarts

    def on_requests_recovered(self, callback: Callable[[int], None]) -> None:
        """callback(n) runs each time n unfinished requests were re-sent to a live engine
        after their engine core died."""
        self.engine_core.on_requests_recovered = callback

    def generation_defaults(self) -> dict[str, Any]:
        return generation_defaults(self.config)

    # ---- tokenizer --------------------------------------------------------------------
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("the engine runs without a tokenizer (skip_tokenizer_init); "
                             "send token ids")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require_tokenizer().encode(text, add_special_tokens) if text else []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._require_tokenizer().decode(token_ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt)

    # ---- requests ---------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams,
                      lora_request: LoRARequest | None = None) -> None:
        """Raises ValueError saying what to change, before anything reaches the engine."""
        check_prompt(self.config, prompt_token_ids)
        check_params(self.config, params)
        check_lora(self.config, lora_request)

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       request_id: str, prompt_text: str | None = None,
                       lora_request: LoRARequest | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs so far (cumulative) as they grow, the finished one
        last. Closing or cancelling the generator early aborts the request in the engine."""
        self.check_request(prompt_token_ids, sampling_params, lora_request)
        self.engine_core.start()
        self.check_health()
        state = self._add_request(request_id, prompt_text, list(prompt_token_ids),
                                  sampling_params, lora_request)
        try:
            while True:
                await state.wake.wait()
                state.wake.clear()
                if state.final is not None:
                    yield state.final
                    return
                self.check_health()
                yield state.snapshot()
        finally:
            self._remove(state)

    def _add_request(self, request_id: str, prompt: str | None, ids: list[int],
                     params: SamplingParams, lora_request: LoRARequest | None = None
                     ) -> _RequestState:
        child_ids = child_request_ids(request_id, params.n)
        if request_id in self._requests or any(c in self._parent_of for c in child_ids):
            raise ValueError(f"request id {request_id!r} is already in use")
        processor = OutputProcessor(self.tokenizer)
        processor.add_request(request_id, child_ids, prompt, ids, params)
        state = _RequestState(request_id, prompt, ids, child_ids, processor,
                              [processor.children[c].output for c in child_ids], asyncio.Event())
        if not self._requests:  # idle until now: the clock starts with this request
            self._progress_at = time.monotonic()
        self._requests[request_id] = state
        self._parent_of.update(dict.fromkeys(child_ids, request_id))
        try:
            for req in make_requests(self.config, request_id, ids, params, self._eos_token_ids,
                                     lora_request):
                self.engine_core.add_request(req)
        except BaseException:
            self._remove(state)
            raise
        return state

    async def abort(self, request_id: str) -> None:
        """Stops a request; its generator then yields a final output with reason 'abort'."""
        state = self._requests.get(request_id)
        if state is None or state.final is not None:
            return
        self._abort_in_engine(state)
        for out in state.outputs:
            if out.finish_reason is None:
                out.finish_reason = "abort"
        state.final = RequestOutput(request_id, state.prompt, state.prompt_token_ids,
                                    state.outputs, True)
        state.wake.set()

    def _abort_in_engine(self, state: _RequestState) -> None:
        pending = [c for c in state.child_ids if c in state.processor.children]
        state.processor.abort(pending)
        if not pending or self.errored:
            return
        try:
            self.engine_core.abort_requests(pending)
        except (EngineDeadError, zmq.ZMQError) as e:  # the engine is going away anyway
            logger.debug("could not abort %s: %s", pending, e)

    def _remove(self, state: _RequestState) -> None:
        if state.final is None:
            self._abort_in_engine(state)
        self._requests.pop(state.request_id, None)
        for child_id in state.child_ids:
            self._parent_of.pop(child_id, None)

    def hung_reason(self) -> str | None:
        """Why the engine counts as hung: requests are in flight and no output came for
        longer than execute_model_timeout_s (an executor that restarts hung workers clears
        this by itself; a uni engine cannot)."""
        limit = self.config.parallel_config.execute_model_timeout_s
        quiet = time.monotonic() - self._progress_at
        if self._requests and quiet > limit:
            return (f"no engine output for {quiet:.0f} s with {len(self._requests)} requests "
                    f"in flight (execute_model_timeout_s={limit:g})")
        return None

    def _process(self, outputs: list[EngineCoreOutput]) -> None:
        self._progress_at = time.monotonic()
        by_request: dict[str, list[EngineCoreOutput]] = {}
        for eo in outputs:
            request_id = self._parent_of.get(eo.request_id)
            if request_id is not None:
                by_request.setdefault(request_id, []).append(eo)
        for request_id, eos in by_request.items():
            state = self._requests[request_id]
            finished, to_abort = state.processor.process_outputs(eos)
            if to_abort:  # stopped by a stop string, which only the front end sees
                self.engine_core.abort_requests(to_abort)
            if finished:
                state.final = finished[0]
            state.wake.set()

    def _wake_all(self) -> None:
        self._dead.set()
        for state in self._requests.values():
            state.wake.set()

    async def wait_until_dead(self) -> str:
        """Returns (with the reason) once the engine is dead or shut down; starts watching
        the engines from the running loop if no request did yet."""
        self.engine_core.start()
        await self._dead.wait()
        return self.engine_core.dead_reason or "the engine is dead"

    # ---- elastic data parallel --------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return len(self.engine_core.engines)

    @property
    def is_scaling(self) -> bool:
        return self.engine_core.scaling

    async def scale_elastic_ep(self, new_data_parallel_size: int,
                               drain_timeout: float = DRAIN_TIMEOUT_S,
                               startup_timeout: float = SCALE_TIMEOUT_S) -> None:
        """Grows or shrinks the fleet while it serves (vLLM's scale_elastic_ep); raises
        ScaleInProgressError during another scale, ScaleError if it failed (the fleet is
        then as it was), ValueError for a bad size."""
        self.check_health()
        await self.engine_core.scale_data_parallel_async(new_data_parallel_size, drain_timeout,
                                                         startup_timeout)

    def engine_loads(self) -> list[tuple[int, int | None, int]]:
        """Per engine: (index, load score as the coordinator last published it plus this
        server's sends since, or None without a coordinator; this server's own unfinished
        requests on it)."""
        client = self.engine_core
        client.loads._refresh()
        return [(e.index, client.loads.score(e.index), client.load[e.index])
                for e in client.engines]

    # ---- engine-wide ------------------------------------------------------------------
    async def get_stats(self) -> list[dict[str, float]]:
        """The scheduler's counts, one dict per engine."""
        self.check_health()
        return await self.engine_core.call_utility_async("stats")

    def shutdown(self) -> None:
        self.engine_core.shutdown()
