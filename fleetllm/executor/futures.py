"""The Future a collective_rpc(non_block=True) returns, shared by the mp and Ray executors."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol


class _Call(Protocol):
    results: dict[int, Any]
    error: BaseException | None

    def done(self) -> bool: ...


class _Resolver(Protocol):
    def _resolve(self, call: Any, timeout: float | None, return_exceptions: bool) -> None: ...

    def _poll_call(self, call: Any) -> None: ...


class CallFuture(Future):
    """One rank's answer to a call. result(timeout) waits in the caller's thread (no hand-off
    latency) with a working timeout; polling done() also collects replies that arrived."""

    def __init__(self, executor: _Resolver, call: _Call, rank: int,
                 return_exceptions: bool) -> None:
        super().__init__()
        self._executor, self._call, self._rank = executor, call, rank
        self._return_exceptions = return_exceptions

    def result(self, timeout: float | None = None) -> Any:
        if not super().done():
            self._executor._resolve(self._call, timeout, return_exceptions=True)
            value = self._call.results.get(self._rank, self._call.error)
            if isinstance(value, BaseException) and not self._return_exceptions:
                self.set_exception(value)
            else:
                self.set_result(value)
        return super().result(0)

    def done(self) -> bool:
        if not super().done():
            self._executor._poll_call(self._call)
            if self._call.done():
                try:
                    self.result(0)
                except BaseException:  # noqa: BLE001 - now stored in the future
                    pass
        return super().done()


class _Aggregator(Protocol):
    def aggregate(self, outputs: Sequence[Any], output_rank: int = 0) -> Any: ...


class FutureWrapper(Future):
    """execute_model(non_block=True) with a KV connector: every rank's future, aggregated
    once on result() (the Ray reference's FutureWrapper(refs, aggregator)); without an
    aggregator, the first future's answer."""

    def __init__(self, futures: Sequence[Future], aggregator: _Aggregator | None = None,
                 output_rank: int = 0) -> None:
        super().__init__()
        self.futures = list(futures)
        self.aggregator = aggregator
        self.output_rank = output_rank

    def result(self, timeout: float | None = None) -> Any:
        if not super().done():
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                outputs = [f.result(None if deadline is None
                                    else max(0.0, deadline - time.monotonic()))
                           for f in self.futures]
                value = (outputs[0] if self.aggregator is None
                         else self.aggregator.aggregate(outputs, self.output_rank))
            except TimeoutError:
                raise  # not done yet: a later result() may still collect it
            except BaseException as e:  # noqa: BLE001 - stored in the future
                self.set_exception(e)
            else:
                self.set_result(value)
        return super().result(0)

    def done(self) -> bool:
        return super().done() or all(f.done() for f in self.futures)
