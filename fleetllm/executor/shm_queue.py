"""A shared-memory broadcast ring buffer: the mp executor's driver -> workers transport.

One writer (the process that creates the MessageQueue) sends bytes messages that each of
n_reader readers receives, in order. With n_reader=1 the same class carries a worker's
replies back. Callers serialize (msgspec / cloudpickle) themselves.

Layout: one SharedMemory segment of max_chunks equal chunks. Each chunk is

    [written: 1 byte][read flag: 1 byte per reader][pad to 64] [length: u64][payload]

with the payload area max_chunk_bytes long. No locks: the writer only touches a chunk that
was never written or that every reader has marked read, stores the payload and the length,
clears the read flags and sets ``written`` last; reader i only reads a chunk that is written
and whose own read flag is 0, copies the payload out, then sets its read flag. That is
correct because x86 keeps stores in order (and loads in order), and a CPython byte store to
a memoryview is a single byte store: data before flags on the writer side, flag before
data on the reader side.

Messages longer than max_chunk_bytes go over a local ZMQ socket; their chunk carries the
length OVERFLOW, meaning "the payload is the next message on the overflow socket".
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import secrets
import select
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory, util
from typing import Any

import msgspec
import zmq

from fleetllm.errors import CommunicationTimeoutError

logger = logging.getLogger(__name__)

SHM_PREFIX = "fleetllm_"

# Waiting: a back-to-back call (the next step's RPC, a reply that is a few microseconds
# away) should be picked up within microseconds, so waiters first spin, yielding the CPU
# each turn so a spinning process does not starve its peer on a shared core. A waiter that
# is still waiting after SPIN_S is probably idle (the worker is running a model step), so
# it backs off with sleeps growing to MAX_SLEEP_S: at most ~1 ms of added latency, and an
# idle process costs ~0.1% of a core instead of a whole one.
SPIN_S = 50e-6
FIRST_SLEEP_S = 10e-6
MAX_SLEEP_S = 1e-3
# should_abort usually checks worker liveness (a syscall); every 10 ms is prompt enough.
ABORT_POLL_S = 10e-3
# A reader asleep on a bell checks should_abort (its parent's liveness) less often.
BELL_ABORT_POLL_S = 0.1

_ALIGN = 64  # a cache line, so one chunk's flags do not share a line with another's data
_LEN = struct.Struct("<Q")
_OVERFLOW = (1 << 64) - 1
# Each reader subscribes to everything (b"") and then to this topic + its rank. ZMQ keeps
# one pipe's subscriptions in order, so once the writer has seen a reader's rank topic, that
# reader's b"" subscription is in force and it will get every later overflow message.
_READY_TOPIC = b"\xfffleetllm-overflow-ready-"
_IPC_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class QueueAbortedError(RuntimeError):
    """should_abort returned True while enqueue/dequeue was waiting."""


class Handle(msgspec.Struct, frozen=True):
    """What a reader needs to attach; picklable and msgspec-encodable."""

    shm_name: str
    n_reader: int
    max_chunk_bytes: int
    max_chunks: int
    overflow_addr: str


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _bind_overflow(ctx: zmq.Context) -> tuple[zmq.Socket, str, str | None]:
    """The writer's overflow socket, its address, and the temp dir holding it (if ipc).

    XPUB rather than one PUSH per reader: a message is handed to ZMQ once and fanned out by
    reference, whatever n_reader is. PUB's slow-joiner loss is handled by the subscription
    handshake (see _READY_TOPIC and wait_until_ready); after it, delivery is reliable because
    the send HWM is unlimited (the ring already bounds how far the writer runs ahead).
    """
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    ipc_dir = tempfile.mkdtemp(prefix=SHM_PREFIX)
    path = os.path.join(ipc_dir, "overflow.sock")
    if len(path) <= _IPC_PATH_MAX:
        sock.bind(f"ipc://{path}")
        return sock, f"ipc://{path}", ipc_dir
    shutil.rmtree(ipc_dir, ignore_errors=True)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}", None


def _connect_overflow(ctx: zmq.Context, addr: str, rank: int) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.SUBSCRIBE, _READY_TOPIC + str(rank).encode())
    return sock


def _attach_shm(name: str, size: int) -> mmap.mmap:
    """Map an existing segment without registering it with the resource tracker.

    SharedMemory(name) registers it on Python < 3.13: the reader's tracker then warns that
    it "leaked" and unlinks it again; and spawned children share the creator's tracker, so
    unregistering afterwards would drop the creator's own registration instead.
    """
    import _posixshmem  # the module SharedMemory itself uses; POSIX only, like ipc://

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _release_writer(shm: shared_memory.SharedMemory, ctx: zmq.Context, sock: zmq.Socket,
                    ipc_dir: str | None) -> None:
    sock.close(linger=0)
    ctx.term()
    shm.close()
    try:
        shm.unlink()  # also unregisters it from the resource tracker
    except FileNotFoundError:
        # Someone else unlinked it (e.g. another process's resource tracker); unlink()
        # failed before unregistering, so do it here or our tracker warns at exit.
        logger.warning("shared memory %s was already unlinked", shm.name)
        resource_tracker.unregister("/" + shm.name, "shared_memory")
    if ipc_dir is not None:
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _release_reader(mm: mmap.mmap, buf: memoryview, ctx: zmq.Context,
                    sock: zmq.Socket) -> None:
    sock.close(linger=0)
    ctx.term()
    buf.release()
    mm.close()


class MessageQueue:
    """A lock-free broadcast ring in shared memory; see the module docstring."""

    def __init__(self, n_reader: int, max_chunk_bytes: int = 1 << 20,
                 max_chunks: int = 16) -> None:
        if n_reader < 1 or max_chunk_bytes < 1 or max_chunks < 1:
            raise ValueError(f"need n_reader, max_chunk_bytes, max_chunks >= 1, got "
                             f"{n_reader}, {max_chunk_bytes}, {max_chunks}")
        name = SHM_PREFIX + secrets.token_hex(8)  # short: macOS caps names at 31 chars
        size = max_chunks * _chunk_stride(n_reader, max_chunk_bytes)
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        ctx = zmq.Context(io_threads=1)
        try:
            sock, addr, ipc_dir = _bind_overflow(ctx)
        except Exception:
            ctx.term()
            shm.close()
            shm.unlink()
            raise
        self._setup(Handle(name, n_reader, max_chunk_bytes, max_chunks, addr), None,
                    shm.buf, ctx, sock)
        self._subscribed: set[int] = set()
        self._ready = False
        self._ipc_dir = ipc_dir
        # multiprocessing's Finalize rather than weakref.finalize: it also runs when a
        # spawned worker returns (multiprocessing skips atexit there), and never in a
        # forked child, which must not unlink its parent's segment.
        self._finalizer = util.Finalize(self, _release_writer, (shm, ctx, sock, ipc_dir),
                                        exitpriority=10)
        logger.debug("created %s: %d readers, %d chunks of %d bytes, overflow %s",
                     name, n_reader, max_chunks, max_chunk_bytes, addr)

    @classmethod
    def create_from_handle(cls, handle: Handle, reader_rank: int) -> MessageQueue:
        """Attach as reader reader_rank (0 <= reader_rank < n_reader; one process each)."""
        if not 0 <= reader_rank < handle.n_reader:
            raise ValueError(f"reader_rank {reader_rank} out of range for "
                             f"{handle.n_reader} readers")
        stride = _chunk_stride(handle.n_reader, handle.max_chunk_bytes)
        mm = _attach_shm(handle.shm_name, handle.max_chunks * stride)
        buf = memoryview(mm)
        ctx = zmq.Context(io_threads=1)
        sock = _connect_overflow(ctx, handle.overflow_addr, reader_rank)
        self = cls.__new__(cls)
        self._setup(handle, reader_rank, buf, ctx, sock)
        self._finalizer = util.Finalize(self, _release_reader, (mm, buf, ctx, sock),
                                        exitpriority=10)
        return self

    def _setup(self, handle: Handle, rank: int | None, buf: memoryview, ctx: zmq.Context,
               sock: zmq.Socket) -> None:
        self.handle = handle
        self.rank = rank
        self._buf = buf
        self._ctx = ctx
        self._sock = sock
        self._stride = _chunk_stride(handle.n_reader, handle.max_chunk_bytes)
        self._data_off = _align(1 + handle.n_reader)
        self._all_read = b"\x01" * handle.n_reader
        self._none_read = bytes(handle.n_reader)
        self._idx = 0
        self._closed = False

    @property
    def is_writer(self) -> bool:
        return self.rank is None

    def export_handle(self) -> Handle:
        return self.handle

    def __reduce__(self) -> Any:
        raise TypeError("a MessageQueue cannot be pickled; send export_handle() instead")

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "writer" if self.is_writer else f"reader {self.rank}"
        return f"MessageQueue({self.handle.shm_name}, {role}, closed={self._closed})"

    # ---- writer side ----------------------------------------------------------------

    def wait_until_ready(self, timeout: float | None = None,
                         should_abort: Callable[[], bool] | None = None) -> None:
        """Writer: wait until every reader is subscribed to the overflow channel.

        enqueue does this itself before the first overflow message. Calling it at startup
        fails early instead, and removes the ipc socket file once every reader is connected,
        so a writer that is killed later leaves nothing in /tmp. On a reader it returns at
        once (the reader's subscription is sent when it attaches).
        """
        self._check_open()
        if self.is_writer and not self._ready:
            self._wait_subscriptions(_deadline(timeout), should_abort)

    def enqueue(self, data: bytes | memoryview, timeout: float | None = None,
                should_abort: Callable[[], bool] | None = None) -> None:
        """Send data to every reader; waits while the next chunk is still being read."""
        self._check_open(writer=True)
        deadline = _deadline(timeout)
        payload = memoryview(data).cast("B")
        overflow = payload.nbytes > self.handle.max_chunk_bytes
        if overflow and not self._ready:
            self._wait_subscriptions(deadline, should_abort)
        off = self._idx * self._stride
        self._wait(self._chunk_free, off, deadline, should_abort, "for readers to free a chunk")
        buf = self._buf
        buf[off] = 0
        start = off + self._data_off
        if overflow:
            # bytes cannot change under ZMQ, so it may send them without a copy.
            self._sock.send(data, copy=not isinstance(data, bytes))
            _LEN.pack_into(buf, start, _OVERFLOW)
        else:
            _LEN.pack_into(buf, start, payload.nbytes)
            buf[start + _LEN.size:start + _LEN.size + payload.nbytes] = payload
        buf[off + 1:off + 1 + self.handle.n_reader] = self._none_read
        buf[off] = 1  # last: publishes the chunk
        self._idx = (self._idx + 1) % self.handle.max_chunks

    def drop_reader(self, reader_rank: int) -> None:
        """Writer: a reader that died never reads again, so its flag counts as read, in the
        chunks already written and in every later one; the others go on receiving."""
        self._check_open(writer=True)
        flags = bytearray(self._none_read)
        flags[reader_rank] = 1
        self._none_read = bytes(flags)
        for i in range(self.handle.max_chunks):
            self._buf[i * self._stride + 1 + reader_rank] = 1

    def _chunk_free(self, off: int) -> bool:
        buf = self._buf
        return buf[off] == 0 or buf[off + 1:off + 1 + self.handle.n_reader] == self._all_read

    def _wait_subscriptions(self, deadline: float | None,
                            should_abort: Callable[[], bool] | None) -> None:
        n = self.handle.n_reader
        while len(self._subscribed) < n:
            if self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
                self._note_subscription(self._sock.recv())
                continue
            _check_waiting(deadline, should_abort,
                           f"for {n - len(self._subscribed)} readers to attach")
        self._ready = True
        if self._ipc_dir is not None:
            # Every reader is connected and none will reconnect, so the file is not needed;
            # removing it now keeps a killed writer from leaving it behind.
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _note_subscription(self, msg: bytes) -> None:
        # Byte 0 is 1 for subscribe, 0 for unsubscribe (a reader closing); only the rank
        # topics count.
        topic = msg[1:]
        if msg[:1] == b"\x01" and topic.startswith(_READY_TOPIC):
            self._subscribed.add(int(topic[len(_READY_TOPIC):]))

    # ---- reader side ----------------------------------------------------------------

    def dequeue(self, timeout: float | None = None,
                should_abort: Callable[[], bool] | None = None,
                bell: int | None = None) -> bytes:
        """The next message; on TimeoutError or QueueAbortedError nothing is consumed.

        bell: a non-blocking pipe the writer writes a byte to after each enqueue. A reader
        that has spun without luck then sleeps on it (select) instead of polling."""
        self._check_open(writer=False)
        deadline = _deadline(timeout)
        off = self._idx * self._stride
        self._wait(self._chunk_ready, off, deadline, should_abort, "for a message", bell)
        buf = self._buf
        start = off + self._data_off
        (n,) = _LEN.unpack_from(buf, start)
        if n == _OVERFLOW:
            msg = self._recv_overflow(deadline, should_abort)
        else:
            msg = bytes(buf[start + _LEN.size:start + _LEN.size + n])
        buf[off + 1 + self.rank] = 1  # after the copy: the writer may now reuse the chunk
        self._idx = (self._idx + 1) % self.handle.max_chunks
        return msg

    def poll(self) -> bool:
        """Whether dequeue would return at once (reader side, never blocks)."""
        return not self._closed and self._chunk_ready(self._idx * self._stride)

    def _chunk_ready(self, off: int) -> bool:
        buf = self._buf
        return buf[off] == 1 and buf[off + 1 + self.rank] == 0

    def _recv_overflow(self, deadline: float | None,
                       should_abort: Callable[[], bool] | None) -> bytes:
        # The writer sends before publishing the chunk, so this is normally immediate.
        while not self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
            _check_waiting(deadline, should_abort, "for an overflow message")
        return self._sock.recv()

    # ---- both -----------------------------------------------------------------------

    def _wait(self, ready: Callable[[int], bool], off: int, deadline: float | None,
              should_abort: Callable[[], bool] | None, what: str,
              bell: int | None = None) -> None:
        if ready(off):
            return
        start = time.monotonic()
        # Asleep on a bell, the process wakes only for messages and these checks.
        abort_poll_s = ABORT_POLL_S if bell is None else BELL_ABORT_POLL_S
        next_abort_check = start + abort_poll_s
        sleep_s = FIRST_SLEEP_S
        while not ready(off):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise CommunicationTimeoutError(f"{self!r}: timed out waiting {what}")
            if now >= next_abort_check:
                if should_abort is not None:
                    _check_waiting(None, should_abort, what)
                next_abort_check = now + abort_poll_s
            if now - start < SPIN_S:
                os.sched_yield()
            elif bell is not None:
                wake_by = next_abort_check if deadline is None else min(next_abort_check,
                                                                         deadline)
                if select.select([bell], [], [], max(0.0, wake_by - now))[0]:
                    try:
                        os.read(bell, 1 << 16)
                    except BlockingIOError:
                        pass
            else:
                time.sleep(sleep_s)
                sleep_s = min(sleep_s * 2, MAX_SLEEP_S)

    def _check_open(self, writer: bool | None = None) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if writer is not None and writer != self.is_writer:
            op = "enqueue" if writer else "dequeue"
            raise RuntimeError(f"{self!r} cannot {op}")

    def close(self) -> None:
        """Idempotent. The writer unlinks the segment; a reader only unmaps it."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        logger.debug("closed %r", self)


def _chunk_stride(n_reader: int, max_chunk_bytes: int) -> int:
    return _align(1 + n_reader) + _align(_LEN.size + max_chunk_bytes)


def _poll_ms(deadline: float | None) -> int:
    """A ZMQ poll slice: short enough to notice should_abort and the deadline in time."""
    wait = ABORT_POLL_S if deadline is None else min(ABORT_POLL_S, deadline - time.monotonic())
    return max(0, math.ceil(wait * 1000))


def _check_waiting(deadline: float | None, should_abort: Callable[[], bool] | None,
                   what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise CommunicationTimeoutError(f"timed out waiting {what}")
    if should_abort is not None and should_abort():
        raise QueueAbortedError(f"aborted while waiting {what}")


def reclaim_orphan(handle: Handle) -> bool:
    """Unlinks the segment of a writer that died without closing (e.g. a SIGKILLed worker),
    and drops it from the resource tracker spawned children share with us, which would
    otherwise warn about it and unlink it at exit. Returns True if something was reclaimed."""
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + handle.shm_name)
    except FileNotFoundError:
        return False
    resource_tracker.unregister("/" + handle.shm_name, "shared_memory")
    if handle.overflow_addr.startswith("ipc://"):
        shutil.rmtree(os.path.dirname(handle.overflow_addr[len("ipc://"):]), ignore_errors=True)
    return True
