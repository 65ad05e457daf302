"""The engine-client interface: every engine method declared once.

`EngineCore` implements each method of `EngineClientInterface`. The clients get theirs from
the declaration: `forward_engine_methods` gives a process client (SyncMPClient) a method
that calls every engine and combines the per-engine results, `forward_engine_methods_async`
gives AsyncLLM the awaitable form, and `delegate_engine_methods` gives LLM a pass-through to
whichever engine client it holds. A new engine method is therefore one declaration here plus
its implementation in EngineCore; the engine process accepts exactly the declared names.

Arguments travel positionally in a typed UtilityCall, so each call is bound against the
declared signature first: keywords work, defaults are filled in, and a wrong argument is a
TypeError at the caller, not an error inside the engine.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from fleetllm.lora.request import LoRARequest

T = TypeVar("T")


def _all(results: list[Any]) -> bool:
    return all(results)


def _any(results: list[Any]) -> bool:
    return any(results)


def _first(results: list[Any]) -> Any:
    return results[0] if results else None


def _none(results: list[Any]) -> None:
    return None


def _each(results: list[Any]) -> list[Any]:
    return results


def _flatten(results: list[Any]) -> list[Any]:
    return [r for per_engine in results for r in per_engine]


def _sum(results: list[dict[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for s in results:
        for k, v in s.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def _union(results: list[Any]) -> set[Any]:
    return set().union(*(set(r) for r in results))


def _sum_lists(results: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    merged: dict[str, list[int]] = {}
    for per_engine in results:
        for key, counts in per_engine.items():
            merged[key] = [a + b for a, b in zip(merged.get(key, [0] * len(counts)), counts)]
    return merged


def _by_lora_id(results: list[list[Any]]) -> list[Any]:
    """Every engine's adapters, once each (by lora_int_id), in id order."""
    merged = {lora.lora_int_id: lora for per_engine in results for lora in per_engine}
    return [merged[k] for k in sorted(merged)]


@dataclass(frozen=True)
class EngineMethod:
    """One declared engine method: its signature, and how per-engine results combine (every
    data-parallel engine runs the call)."""

    name: str
    signature: inspect.Signature
    combine: Callable[[list[Any]], Any]
    doc: str
    arg_types: tuple[Any, ...]  # each parameter's annotation, as declared
    return_type: Any = Any

    def results(self, per_engine: list[Any]) -> Any:
        """The engines' results (plain msgpack data from engine processes) as the declared
        type, combined: a list of LoRARequests arrives as maps and leaves as LoRARequests."""
        if self.return_type not in (Any, type(None)):
            per_engine = [msgspec.convert(r, self.return_type) for r in per_engine]
        return self.combine(per_engine)

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        """The call's arguments as the positional list a UtilityCall carries."""
        bound = self.signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        return list(bound.args[1:])

    def convert(self, args: list[Any]) -> list[Any]:
        """A UtilityCall's arguments (plain msgpack data) as the declared types, in the
        engine process: a LoRARequest arrives as a map and leaves as a LoRARequest; a wrong
        type is a ValueError naming the parameter."""
        params = list(self.signature.parameters)[1:]
        if len(args) > len(params):
            raise ValueError(f"{self.name} takes {len(params)} arguments, got {len(args)}")
        out = []
        for name, arg, kind in zip(params, args, self.arg_types):
            try:
                out.append(arg if kind is Any else msgspec.convert(arg, kind))
            except msgspec.ValidationError as e:
                raise ValueError(f"{self.name}: argument {name}: {e}") from e
        return out


def engine_method(combine: Callable[[list[Any]], Any]) -> Callable[[T], T]:
    def mark(fn: T) -> T:
        fn.__engine_combine__ = combine  # type: ignore[attr-defined]
        return fn
    return mark


class EngineClientInterface:
    """What every engine client offers, beyond adding, aborting and stepping requests."""

    @engine_method(_flatten)
    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Runs a worker method on every worker; one result per worker."""
        raise NotImplementedError

    @engine_method(_all)
    def reset_prefix_cache(self) -> bool:
        """Drops every cached prefix block; False if some were in use."""
        raise NotImplementedError

    @engine_method(_none)
    def sleep(self, level: int = 1) -> None:
        """Frees the KV cache (level 1) and the weights too (level 2) until wake_up()."""
        raise NotImplementedError

    @engine_method(_none)
    def wake_up(self, tags: list[str] | None = None) -> None:
        """Brings back what sleep() released (all of it, or only the tags given)."""
        raise NotImplementedError

    @engine_method(_any)
    def is_sleeping(self) -> bool:
        raise NotImplementedError

    @engine_method(_sum)
    def stats(self) -> dict[str, float]:
        """The scheduler's and the engine's counters (summed over engines)."""
        raise NotImplementedError

    @engine_method(_each)
    def get_performance_metrics(self) -> Any:
        """The executor's metrics (one per engine, with engine processes)."""
        raise NotImplementedError

    @engine_method(_none)
    def save_sharded_state(self, path: str, pattern: str | None = None,
                           max_size: int | None = None) -> None:
        """Each worker writes its own shard; load them with load_format='sharded_state'."""
        raise NotImplementedError

    @engine_method(_all)
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads and checks an adapter on every worker (False: it was loaded already); a bad
        one raises LoRAAdapterError naming the file, field or tensor, and nothing changes."""
        raise NotImplementedError

    @engine_method(_all)
    def pin_lora(self, lora_id: int) -> bool:
        """Exempts an adapter from eviction from the workers' host memory."""
        raise NotImplementedError

    @engine_method(_union)
    def list_loras(self) -> set[int]:
        """The ids of the adapters loaded in the workers' host memory."""
        raise NotImplementedError

    @engine_method(_by_lora_id)
    def get_lora_requests(self) -> list[LoRARequest]:
        """The adapters add_lora accepted (and not removed since): what a request's model
        name may pick. The engines are the one registry every API server reads."""
        raise NotImplementedError

    @engine_method(_sum_lists)
    def lora_load(self) -> dict[str, list[int]]:
        """Per adapter name: [running, waiting] requests (summed over engines)."""
        raise NotImplementedError

    @engine_method(_all)
    def remove_lora(self, lora_id: int) -> bool:
        """Forgets an adapter; requests already running with it finish."""
        raise NotImplementedError

    @engine_method(_none)
    def reinitialize_distributed(self, new_data_parallel_size: int,
                                 new_data_parallel_rank: int = -1) -> None:
        """Elastic data parallel: the fleet now has new_data_parallel_size engines; this one
        keeps its rank (-1, KEEP_CURRENT_RANK) or ends (-2, SHUTDOWN_CURRENT_RANK). Scaling
        calls it per engine (LLM.scale_data_parallel); called on every engine, -2 ends all."""
        raise NotImplementedError


def _collect(cls: type) -> dict[str, EngineMethod]:
    methods = {}
    for name, fn in vars(cls).items():
        combine = getattr(fn, "__engine_combine__", None)
        if combine is not None:
            signature = inspect.signature(fn)
            hints = typing.get_type_hints(fn)
            types = tuple(hints.get(p, Any) for p in list(signature.parameters)[1:])
            methods[name] = EngineMethod(name, signature, combine, fn.__doc__ or "", types,
                                         hints.get("return", Any))
    return methods


ENGINE_METHODS: dict[str, EngineMethod] = _collect(EngineClientInterface)


def _install(cls: type, name: str, fn: Callable[..., Any], spec: EngineMethod) -> None:
    if name in vars(cls):  # the class says how it does this one itself
        return
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = spec.doc
    fn.__signature__ = spec.signature  # type: ignore[attr-defined]
    setattr(cls, name, fn)


def forward_engine_methods(cls: type[T]) -> type[T]:
    """Gives a process client each declared method, through `self.call_utility(name, *args)`
    (one result per engine), combined as declared."""
    for name, spec in ENGINE_METHODS.items():
        def call(self: Any, *args: Any, _spec: EngineMethod = spec, **kwargs: Any) -> Any:
            return _spec.results(self.call_utility(_spec.name, *_spec.bind(args, kwargs)))
        _install(cls, name, call, spec)
    return cls


def forward_engine_methods_async(cls: type[T]) -> type[T]:
    """Gives an asyncio client each declared method as a coroutine, through
    `self.engine_core.call_utility_async(name, *args)`."""
    for name, spec in ENGINE_METHODS.items():
        async def call(self: Any, *args: Any, _spec: EngineMethod = spec, **kwargs: Any) -> Any:
            self.check_health()
            results = await self.engine_core.call_utility_async(
                _spec.name, *_spec.bind(args, kwargs))
            return _spec.results(results)
        _install(cls, name, call, spec)
    return cls


def delegate_engine_methods(cls: type[T]) -> type[T]:
    """Gives a front end (LLM) each declared method as a pass-through to `self.engine_core`,
    an EngineCore or a process client: both follow this interface."""
    for name, spec in ENGINE_METHODS.items():
        def call(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
            return getattr(self.engine_core, _name)(*args, **kwargs)
        _install(cls, name, call, spec)
    return cls
