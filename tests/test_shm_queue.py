"""The shared-memory broadcast queue: ordering, overflow, timeouts, aborts, leaks, latency.

Readers that stand in for workers run in spawn processes, like the mp executor's; tests of
the waiting rules attach readers in this process, which is faster and exercises the same
code. Spawned children import fleetllm (and so torch): a second or two each.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import pickle
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

from fleetllm.executor.shm_queue import Handle, MessageQueue, QueueAbortedError
from tests.helpers import wakeups

STOP = b"stop"
ECHO = b"echo"  # messages starting with this come back whole, not as a digest
SPAWN = mp.get_context("spawn")


def _shm_exists(handle: Handle) -> bool:
    return os.path.exists(f"/dev/shm/{handle.shm_name}")


def _answer(rank: int, msg: bytes) -> bytes:
    return bytes([rank]) + (msg if msg.startswith(ECHO) else hashlib.sha256(msg).digest())


def _echo_worker(handle: Handle, rank: int, conn: Connection,
                 reply_kwargs: dict[str, Any]) -> None:
    """A stand-in worker: answers each broadcast message on its own n_reader=1 queue."""
    parent = os.getppid()
    orphaned = lambda: os.getppid() != parent  # noqa: E731 - stop waiting if pytest died
    mq = MessageQueue.create_from_handle(handle, rank)
    reply = MessageQueue(n_reader=1, **reply_kwargs)
    try:
        conn.send(reply.export_handle())
        reply.wait_until_ready(timeout=60, should_abort=orphaned)  # the driver attached
        while (msg := mq.dequeue(timeout=60, should_abort=orphaned)) != STOP:
            reply.enqueue(_answer(rank, msg), timeout=60, should_abort=orphaned)
    finally:
        reply.close()
        mq.close()
        conn.close()


class Workers(NamedTuple):
    replies: list[MessageQueue]  # one n_reader=1 queue per worker, this process reading
    died: Callable[[], bool]  # should_abort for the driver's waits


@contextlib.contextmanager
def _echo_workers(mq: MessageQueue, **reply_kwargs: Any) -> Iterator[Workers]:
    """One spawned _echo_worker per reader of mq.

    On success the workers are stopped with STOP and must exit cleanly; on failure they
    are terminated. Either way no child outlives the test.
    """
    procs: list[Any] = []
    replies: list[MessageQueue] = []
    conns: list[Connection] = []
    try:
        for rank in range(mq.handle.n_reader):
            conn, child_conn = SPAWN.Pipe()
            p = SPAWN.Process(target=_echo_worker, daemon=True,
                              args=(mq.export_handle(), rank, child_conn, reply_kwargs))
            p.start()
            child_conn.close()
            procs.append(p)
            conns.append(conn)
        for conn in conns:
            assert conn.poll(60), "worker did not start"
            replies.append(MessageQueue.create_from_handle(conn.recv(), 0))
        yield Workers(replies, lambda: any(not p.is_alive() for p in procs))
        mq.enqueue(STOP, timeout=10)
        for p in procs:
            p.join(timeout=20)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for q in replies:
            q.close()
        for conn in conns:
            conn.close()


@pytest.fixture
def queue() -> Iterator[Callable[..., MessageQueue]]:
    """make(n_reader, **kw) -> a writer queue, closed after the test."""
    made: list[MessageQueue] = []

    def make(n_reader: int, **kwargs: Any) -> MessageQueue:
        made.append(MessageQueue(n_reader, **kwargs))
        return made[-1]

    yield make
    for q in made:
        q.close()
        assert not _shm_exists(q.handle)


def test_two_spawned_readers_get_every_message_in_order(queue: Callable[..., MessageQueue]
                                                        ) -> None:
    chunk = 4096
    mq = queue(2, max_chunk_bytes=chunk, max_chunks=4)
    sizes = [0, 1, 100, chunk - 1, chunk, chunk + 1, 3_000_000] * 5  # 35 >> max_chunks: wraps
    msgs = [os.urandom(n) for n in sizes]
    msgs += [ECHO + b"small", ECHO + os.urandom(3_000_000)]  # replies that overflow too
    # Reply rings hold every answer, so the driver can send everything before reading.
    with _echo_workers(mq, max_chunk_bytes=chunk, max_chunks=64) as (replies, died):
        for i, m in enumerate(msgs):
            mq.enqueue(memoryview(m) if i % 2 else m, timeout=30, should_abort=died)
        for rank, reply in enumerate(replies):
            got = [reply.dequeue(timeout=30, should_abort=died) for _ in msgs]
            assert got == [_answer(rank, m) for m in msgs]


def test_dequeue_timeout_leaves_queue_usable(queue: Callable[..., MessageQueue]) -> None:
    mq = queue(1, max_chunk_bytes=64, max_chunks=2)
    with MessageQueue.create_from_handle(mq.export_handle(), 0) as reader:
        mq.wait_until_ready(timeout=5)
        assert not os.path.exists(mq.handle.overflow_addr.removeprefix("ipc://"))
        start, cpu = time.monotonic(), time.process_time()
        with pytest.raises(TimeoutError):
            reader.dequeue(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.7
        assert time.process_time() - cpu < 0.1  # backed off to sleeping, not spinning
        for msg in (b"after", b"x" * 1000, b"again"):  # ring and overflow still work
            mq.enqueue(msg, timeout=5)
            assert reader.dequeue(timeout=5) == msg


def test_reader_sleeps_on_its_bell_and_wakes_when_rung(queue: Callable[..., MessageQueue]
                                                       ) -> None:
    import threading

    mq = queue(1, max_chunk_bytes=64, max_chunks=2)
    bell_r, bell_w = os.pipe()
    os.set_blocking(bell_r, False)
    try:
        with MessageQueue.create_from_handle(mq.export_handle(), 0) as reader:
            mq.wait_until_ready(timeout=5)
            got: list[tuple[bytes, float, float, int]] = []

            def read() -> None:
                me = threading.get_native_id()
                woke, cpu = wakeups(os.getpid(), me), time.thread_time()
                msg = reader.dequeue(timeout=10, bell=bell_r)
                got.append((msg, time.monotonic(), time.thread_time() - cpu,
                            wakeups(os.getpid(), me) - woke))

            t = threading.Thread(target=read)
            t.start()
            time.sleep(0.5)  # long past the spin: the reader is asleep on the bell
            sent = time.monotonic()
            mq.enqueue(b"wake", timeout=5)
            os.write(bell_w, b"\0")
            t.join(5)
            (msg, woke, cpu, times) = got[0]
            assert msg == b"wake"
            assert woke - sent < 0.05  # the ring, not a 0.1 s liveness check, woke it
            # Half a second asleep: a few wake-ups (spin yields, 0.1 s liveness checks), not
            # the ~500 of polling every millisecond, and no spinning.
            assert times < 30, f"the reader woke {times} times in 0.5 s"
            assert cpu < 0.1
            # A timeout still ends a wait on the bell.
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout=0.2, bell=bell_r)
    finally:
        os.close(bell_r)
        os.close(bell_w)


def test_enqueue_times_out_when_a_reader_stalls(queue: Callable[..., MessageQueue]) -> None:
    mq = queue(2, max_chunk_bytes=64, max_chunks=4)
    handle = mq.export_handle()
    with (MessageQueue.create_from_handle(handle, 0) as fast,
          MessageQueue.create_from_handle(handle, 1) as stalled):
        for i in range(4):
            mq.enqueue(bytes([i]), timeout=1)
            assert fast.dequeue(timeout=1) == bytes([i])
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            mq.enqueue(b"full", timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.7
        assert stalled.dequeue(timeout=1) == b"\x00"  # frees one chunk
        mq.enqueue(b"fits", timeout=1)
        assert [stalled.dequeue(timeout=1) for _ in range(4)] == [b"\x01", b"\x02", b"\x03",
                                                                   b"fits"]
        assert fast.dequeue(timeout=1) == b"fits"


def _assert_aborts(wait: Callable[[Callable[[], bool]], object]) -> None:
    start = time.monotonic()
    with pytest.raises(QueueAbortedError):
        wait(lambda: time.monotonic() - start > 0.2)
    assert time.monotonic() - start < 0.4


def test_should_abort_ends_waits_promptly(queue: Callable[..., MessageQueue]) -> None:
    assert issubclass(QueueAbortedError, RuntimeError)
    mq = queue(1, max_chunk_bytes=64, max_chunks=1)
    with MessageQueue.create_from_handle(mq.export_handle(), 0) as reader:
        _assert_aborts(lambda abort: reader.dequeue(should_abort=abort))  # nothing sent
        mq.enqueue(b"first", timeout=1)
        _assert_aborts(lambda abort: mq.enqueue(b"ring full", should_abort=abort))
        assert reader.dequeue(timeout=1) == b"first"
        mq.enqueue(b"x" * 100, timeout=1)
        assert reader.dequeue(timeout=1) == b"x" * 100
    # No reader ever attaches: a chunk-sized message still goes (through the ring), an
    # overflow one waits in the overflow handshake.
    lonely = queue(1, max_chunk_bytes=64)
    lonely.enqueue(b"x" * 64, timeout=0.5)
    _assert_aborts(lambda abort: lonely.enqueue(b"x" * 100, should_abort=abort))


def test_handle_is_portable_and_roles_are_checked(queue: Callable[..., MessageQueue]) -> None:
    mq = queue(2, max_chunk_bytes=64)
    handle = mq.export_handle()
    assert pickle.loads(pickle.dumps(handle)) == handle
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(handle), type=Handle) == handle
    assert handle.shm_name.startswith("fleetllm_") and _shm_exists(handle)
    with pytest.raises(ValueError):
        MessageQueue.create_from_handle(handle, 2)
    with pytest.raises(TypeError):
        pickle.dumps(mq)
    with MessageQueue.create_from_handle(handle, 0) as reader:
        with pytest.raises(RuntimeError):
            reader.enqueue(b"x")
        with pytest.raises(RuntimeError):
            mq.dequeue()
    reader.close()  # idempotent
    with pytest.raises(RuntimeError):
        reader.dequeue()
    mq.close()
    mq.close()
    assert not _shm_exists(handle)
    assert not os.path.exists(handle.overflow_addr.removeprefix("ipc://"))


LEAK_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import test_shm_queue as t
    from fleetllm.executor.shm_queue import MessageQueue

    mq = MessageQueue(1, max_chunk_bytes=1024, max_chunks=4)
    with t._echo_workers(mq, max_chunk_bytes=1024) as ((reply,), _):
        for msg in (b"small", t.ECHO + b"z" * 5000):
            mq.enqueue(msg, timeout=30)
            assert reply.dequeue(timeout=30) == t._answer(0, msg)
        print(reply.handle.shm_name, reply.handle.overflow_addr)
    mq.close()
    print(mq.handle.shm_name, mq.handle.overflow_addr)
""")


def test_nothing_leaks_after_every_side_closes() -> None:
    """The resource tracker reports leaks when it exits, so the whole scenario (creator,
    spawned reader, reply queue created in the child) runs in a subprocess whose stderr,
    shared with its tracker, is read to the end."""
    tests_dir = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-c", LEAK_SCRIPT, tests_dir], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "leaked" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    lines = run.stdout.split("\n")[:2]
    assert len(lines) == 2, run.stdout
    for name, addr in (line.split() for line in lines):
        assert name.startswith("fleetllm_") and not os.path.exists(f"/dev/shm/{name}")
        assert not os.path.exists(os.path.dirname(addr.removeprefix("ipc://")))


def test_round_trip_latency(queue: Callable[..., MessageQueue],
                            capsys: pytest.CaptureFixture[str]) -> None:
    """Driver -> 2 readers -> a reply each, back to back (so everyone is spinning)."""
    mq = queue(2, max_chunk_bytes=4096)
    with _echo_workers(mq, max_chunk_bytes=4096) as (replies, _):
        samples = []
        for i in range(3000):
            start = time.perf_counter()
            mq.enqueue(ECHO, timeout=10)
            for reply in replies:
                reply.dequeue(timeout=10)
            if i >= 500:  # warm-up
                samples.append(time.perf_counter() - start)
    q = statistics.quantiles(samples, n=100)
    with capsys.disabled():  # the numbers are the point of this test
        print(f"\nshm_queue round trip, 2 readers: p50 {q[49] * 1e6:.1f} us, "  # noqa: T201
              f"p99 {q[98] * 1e6:.1f} us")
    assert q[49] < 5e-3  # generous: the machine is shared
