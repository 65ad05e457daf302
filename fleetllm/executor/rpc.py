"""Typed RPC messages between the executor and worker processes.

Arguments and results are msgpack-encoded with msgspec and decoded with the types the
worker method declares (so a SchedulerOutput arrives as a SchedulerOutput, not a dict).
cloudpickle is used only for a callable passed to collective_rpc (and what it returns),
and these messages only travel over local shared memory / IPC.

Pickling a lambda costs tens of microseconds, several times a no-op call by name, so a
callable whose pickle cannot change between calls (it captures only immutable values and
importable names) is pickled once per function object, and each worker loads each such
blob once; its arguments still travel per call.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import sys
import traceback
import types
import typing
import weakref
from collections import OrderedDict
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
    # A callable's call: cloudpickle of (callable, args, kwargs), or of (args, kwargs) when
    # `fn` carries the callable. Never empty for a callable (replies are pickled then too).
    pickled: bytes = b""
    reply_rank: int = -1  # -1: every rank replies; else only it (and any rank that fails)
    fn: bytes = b""  # cloudpickle of a callable that _fn_blob may reuse from call to call


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


# ---- callables, pickled once -------------------------------------------------------------
# Values whose pickle is fixed by their identity: immutable, or sent as a name to import.
_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes)
_MAX_REUSED_BLOB = 1 << 16  # bigger blobs carry data: their copying, not pickling, dominates
_MISSING = object()


class _FnBlob:
    """A callable's pickle and what it was made from: the function's code, defaults, cell
    contents and the globals its code reads (names None: a function sent by name, whose
    pickle depends on none of them), compared by identity at each reuse."""

    __slots__ = ("blob", "names", "state")

    def __init__(self, blob: bytes, names: tuple[str, ...] | None,
                 state: tuple[Any, ...]) -> None:
        self.blob, self.names, self.state = blob, names, state


_fn_blobs: weakref.WeakKeyDictionary[types.FunctionType, _FnBlob] = weakref.WeakKeyDictionary()
_loaded_fns: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
_MAX_LOADED_FNS = 64
_NO_ARGS = cloudpickle.dumps(((), {}))


def _by_reference(obj: Any) -> bool:
    """Whether cloudpickle sends obj (a function, class or module) as a name to import, so
    its pickle cannot change while it is the same object."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__ in sys.modules
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None or module.__name__ == "__main__" or (
            module.__name__ in cloudpickle.list_registry_pickle_by_value()):
        return False
    found: Any = module
    for part in getattr(obj, "__qualname__", "<").split("."):
        found = getattr(found, part, _MISSING)
    return found is obj


def _is_fixed(value: Any) -> bool:
    if isinstance(value, _LEAF_TYPES):
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_is_fixed(v) for v in value)
    if isinstance(value, types.BuiltinFunctionType):  # a module's, not a bound method of a list
        return isinstance(value.__self__, (types.ModuleType, type(None)))
    return isinstance(value, (types.FunctionType, type, types.ModuleType)) and (
        _by_reference(value))


@functools.lru_cache(maxsize=256)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The names a code object (and the code nested in it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not assigned yet
        return _MISSING


def _state(fn: types.FunctionType, names: tuple[str, ...]) -> tuple[Any, ...]:
    cells = tuple(_cell_value(c) for c in fn.__closure__ or ())
    glb = fn.__globals__
    return (fn.__code__, fn.__defaults__, *cells, *(glb.get(n, _MISSING) for n in names))


def _fn_blob(fn: Callable[..., Any]) -> bytes:
    """fn's pickle, reused while nothing it captures can have changed; b"" for a callable
    that must be pickled at every call (it captures something mutable, a list or an
    object, or is not a plain function)."""
    if not isinstance(fn, types.FunctionType) or fn.__kwdefaults__ or fn.__dict__:
        return b""
    cached = _fn_blobs.get(fn)
    if cached is not None:
        state = () if cached.names is None else _state(fn, cached.names)
        if len(state) == len(cached.state) and all(
                a is b for a, b in zip(state, cached.state)):
            return cached.blob
        _fn_blobs.pop(fn, None)
    names: tuple[str, ...] | None = None
    state = ()  # sent as its module and name: nothing else of it is pickled
    if not _by_reference(fn):
        names = _global_names(fn.__code__)
        state = _state(fn, names)
        if not all(_is_fixed(v) for v in state[1:] if v is not _MISSING):
            return b""
    blob = cloudpickle.dumps(fn)
    if len(blob) > _MAX_REUSED_BLOB:
        return b""
    _fn_blobs[fn] = _FnBlob(blob, names, state)
    return blob


def _load_fn(blob: bytes) -> Callable[..., Any]:
    fn = _loaded_fns.get(blob)
    if fn is None:
        fn = _loaded_fns[blob] = cloudpickle.loads(blob)
        if len(_loaded_fns) > _MAX_LOADED_FNS:
            _loaded_fns.popitem(last=False)
    else:
        _loaded_fns.move_to_end(blob)
    return fn


def make_request(call_id: int, method: str | Callable[..., Any], args: tuple,
                 kwargs: dict[str, Any], reply_rank: int) -> bytes:
    if callable(method):
        fn = _fn_blob(method)
        if not fn:
            blob = cloudpickle.dumps((method, args, kwargs))
            return encode(RpcRequest(call_id, "", [], {}, blob, reply_rank))
        call = cloudpickle.dumps((args, kwargs)) if args or kwargs else _NO_ARGS
        return encode(RpcRequest(call_id, "", [], {}, call, reply_rank, fn))
    raw_args = [msgspec.Raw(encode(a)) for a in args]
    raw_kwargs = {k: msgspec.Raw(encode(v)) for k, v in kwargs.items()}
    return encode(RpcRequest(call_id, method, raw_args, raw_kwargs, b"", reply_rank))


def unpack_request(req: RpcRequest, worker_cls: type) -> tuple[Any, tuple, dict[str, Any]]:
    """Returns (method name or callable, args, kwargs), decoded with the method's types."""
    if req.fn:
        args, kwargs = cloudpickle.loads(req.pickled)
        return _load_fn(req.fn), args, kwargs
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
