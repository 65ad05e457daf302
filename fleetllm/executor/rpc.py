"""Typed RPC messages between the executor and worker processes.

Arguments and results are msgpack-encoded with msgspec and decoded with the types the
worker method declares (so a SchedulerOutput arrives as a SchedulerOutput, not a dict).
cloudpickle is used only for a callable passed to collective_rpc (and what it returns),
and these messages only travel over local shared memory / IPC.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import traceback
import typing
from collections.abc import Callable
from typing import Any

import cloudpickle
import msgspec

import fleetllm.errors as fleet_errors


class RemoteError(msgspec.Struct, array_like=True):
    type_name: str
    module: str
    message: str
    traceback: str


class RpcRequest(msgspec.Struct, array_like=True):
    call_id: int
    method: str  # a worker method name; "" when `pickled` carries a callable
    args: list[msgspec.Raw]
    kwargs: dict[str, msgspec.Raw]
    pickled: bytes = b""  # cloudpickle of (callable, args, kwargs)
    reply_rank: int = -1  # -1: every rank replies; else only it (and any rank that fails)


class RpcResponse(msgspec.Struct, array_like=True):
    call_id: int
    rank: int
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    pickled: bool = False
    error: RemoteError | None = None


def _enc_hook(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to a worker process")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
encode = _encoder.encode
_request_decoder = msgspec.msgpack.Decoder(RpcRequest)
_response_decoder = msgspec.msgpack.Decoder(RpcResponse)
decode_request = _request_decoder.decode
decode_response = _response_decoder.decode


@functools.lru_cache(maxsize=512)
def _decoder(tp: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(tp)


@functools.lru_cache(maxsize=512)
def method_types(cls: type, method: str) -> tuple[dict[str, Any], list[str], Any]:
    """(parameter types by name, positional parameter names, return type) of cls.method."""
    fn = getattr(cls, method, None)
    if fn is None:
        return {}, [], Any
    try:
        hints = typing.get_type_hints(fn)
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
    except (NameError, TypeError, ValueError):
        return {}, [], Any
    ret = hints.pop("return", Any)
    return hints, params, Any if ret is None else ret


def make_request(call_id: int, method: str | Callable[..., Any], args: tuple,
                 kwargs: dict[str, Any], reply_rank: int) -> bytes:
    if callable(method):
        blob = cloudpickle.dumps((method, args, kwargs))
        return encode(RpcRequest(call_id, "", [], {}, blob, reply_rank))
    raw_args = [msgspec.Raw(encode(a)) for a in args]
    raw_kwargs = {k: msgspec.Raw(encode(v)) for k, v in kwargs.items()}
    return encode(RpcRequest(call_id, method, raw_args, raw_kwargs, b"", reply_rank))


def unpack_request(req: RpcRequest, worker_cls: type) -> tuple[Any, tuple, dict[str, Any]]:
    """Returns (method name or callable, args, kwargs), decoded with the method's types."""
    if req.pickled:
        fn, args, kwargs = cloudpickle.loads(req.pickled)
        return fn, args, kwargs
    hints, params, _ = method_types(worker_cls, req.method)
    args = tuple(
        _decoder(hints.get(params[i], Any) if i < len(params) else Any).decode(raw)
        for i, raw in enumerate(req.args)
    )
    kwargs = {k: _decoder(hints.get(k, Any)).decode(raw) for k, raw in req.kwargs.items()}
    return req.method, args, kwargs


def make_response(call_id: int, rank: int, result: Any, pickled: bool) -> bytes:
    payload = encode(cloudpickle.dumps(result) if pickled else result)
    return encode(RpcResponse(call_id, rank, msgspec.Raw(payload), pickled))


def make_error(call_id: int, rank: int, exc: BaseException) -> bytes:
    err = RemoteError(type(exc).__name__, type(exc).__module__, str(exc),
                      "".join(traceback.format_exception(exc)))
    return encode(RpcResponse(call_id, rank, error=err))


def unpack_result(resp: RpcResponse, worker_cls: type, method: str | Callable[..., Any]) -> Any:
    if resp.pickled:
        return cloudpickle.loads(_decoder(bytes).decode(resp.result))
    ret = method_types(worker_cls, method)[2] if isinstance(method, str) else Any
    return _decoder(ret).decode(resp.result)


def rebuild_error(err: RemoteError, rank: int) -> BaseException:
    """The worker's exception as a local one of the same type where it is a builtin or
    fleetllm error (so callers can catch it), else a RuntimeError carrying its text."""
    source = {"builtins": builtins, "fleetllm.errors": fleet_errors}.get(err.module)
    cls = getattr(source, err.type_name, None) if source else None
    note = f"(raised on worker rank {rank})"
    if isinstance(cls, type) and issubclass(cls, BaseException):
        if issubclass(cls, fleet_errors.FleetLLMError):
            text = err.message.split("] ", 1)[-1]
            exc = cls(f"{text} {note}")
        else:
            try:
                exc = cls(f"{err.message} {note}")
            except TypeError:
                exc = RuntimeError(f"{err.type_name}: {err.message} {note}")
    else:
        exc = RuntimeError(f"{err.type_name}: {err.message} {note}")
    exc.__notes__ = [f"remote traceback:\n{err.traceback}"]
    return exc
