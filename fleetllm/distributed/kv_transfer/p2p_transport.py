"""The wire of P2PZmqConnector: a typed msgspec header, then raw tensor bytes (no pickle).

A prefill rank r PUSHes each finished prompt's KV to decode rank r, which PULLs it into a
mailbox until its request asks (or the entry expires). Both ends run one thread each; the
sockets live and die in those threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import msgspec
import torch
import zmq

from fleetllm.distributed.kv_transfer.identity import KVLayout

logger = logging.getLogger(__name__)
_POLL_MS = 100


class KVPushHeader(msgspec.Struct, array_like=True):
    transfer_id: str
    rank: int
    num_tokens: int
    token_hash: str
    layout: KVLayout
    # then 2 frames per layer of layout.layers, K then V: [num_tokens, kv_heads, head_dim]


_header_decoder = msgspec.msgpack.Decoder(KVPushHeader)
_encoder = msgspec.msgpack.Encoder()


def encode_frames(header: KVPushHeader, tensors: list[torch.Tensor]) -> list[object]:
    return [_encoder.encode(header)] + [t.contiguous().view(torch.uint8).numpy()
                                        for t in tensors]


def decode_frames(frames: list[bytes | memoryview], dtype: torch.dtype
                  ) -> tuple[KVPushHeader, list[torch.Tensor]]:
    """Raises ValueError (or msgspec.DecodeError) on anything malformed."""
    header = _header_decoder.decode(frames[0])
    lay = header.layout
    if len(frames) != 1 + 2 * len(lay.layers):
        raise ValueError(f"{len(frames) - 1} tensor frames for {len(lay.layers)} layers")
    shape = (header.num_tokens, lay.num_kv_heads, lay.head_dim)
    out = []
    for f in frames[1:]:
        buf = bytearray(f)
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        out.append(t.view(dtype).view(shape))
    return header, out


@dataclass
class _Job:
    req_id: str
    address: str
    frames: list[object]


class KVSender:
    """One thread sending queued jobs; a job that cannot go within send_timeout_s (the
    peer is down or refuses) is dropped with a warning. Either way the request's blocks
    are free: the job holds its own copy of the KV."""

    def __init__(self, send_timeout_s: float) -> None:
        self.timeout_ms = int(send_timeout_s * 1000)
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.in_flight = 0  # jobs queued or being sent
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="fleetllm-kv-send")
        self.thread.start()

    def send(self, req_id: str, address: str, frames: list[object]) -> None:
        with self.lock:
            self.in_flight += 1
        self.jobs.put(_Job(req_id, address, frames))

    def mark_done(self, req_id: str) -> None:
        with self.lock:
            self.done.add(req_id)

    def take_done(self) -> set[str]:
        with self.lock:
            done, self.done = self.done, set()
        return done

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sockets: dict[str, zmq.Socket] = {}
        try:
            while (job := self.jobs.get()) is not None:
                sock = sockets.get(job.address)
                if sock is None:
                    sock = sockets[job.address] = ctx.socket(zmq.PUSH)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection
                    sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
                    sock.connect(job.address)
                try:
                    sock.send_multipart(job.frames, copy=False)
                except zmq.ZMQError as e:
                    logger.warning("could not send the KV of request %s to %s within %.1f s "
                                   "(%s); the decode side will recompute it", job.req_id,
                                   job.address, self.timeout_ms / 1000, e)
                    with self.lock:
                        self.failed.add(job.req_id)
                    sock.close(0)
                    del sockets[job.address]
                with self.lock:
                    self.done.add(job.req_id)
                    self.in_flight -= 1
        finally:
            for sock in sockets.values():
                sock.close(0)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(5.0)


class KVReceiver:
    """A PULL socket bound to address, filling a mailbox of transfer id -> frames; entries
    nobody claims within ttl_s are dropped (a decode request that never came)."""

    def __init__(self, address: str, ttl_s: float) -> None:
        self.address = address
        self.ttl_s = ttl_s
        self.mailbox: dict[str, tuple[float, list[bytes | memoryview]]] = {}
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="fleetllm-kv-recv")
        self.thread.start()
        self._bound.wait(10.0)
        if self._error is not None:
            self.thread.join(1.0)
            raise self._error

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            try:
                sock.bind(self.address)
            except zmq.ZMQError as e:
                self._error = OSError(f"cannot listen for KV on {self.address}: {e}")
                return
            finally:
                self._bound.set()
            while not self._stop.is_set():
                if sock.poll(_POLL_MS):
                    frames = sock.recv_multipart(copy=False)
                    self._deliver([f.buffer for f in frames])
                self._expire()
        finally:
            sock.close(0)

    def _deliver(self, frames: list[memoryview]) -> None:
        try:
            transfer_id = _header_decoder.decode(frames[0]).transfer_id
        except (msgspec.DecodeError, IndexError) as e:
            logger.warning("dropped a malformed KV message on %s: %s", self.address, e)
            return
        with self.arrived:
            self.mailbox[transfer_id] = (time.monotonic(), frames)
            self.arrived.notify_all()

    def _expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            old = [t for t, (at, _) in self.mailbox.items() if now - at > self.ttl_s]
            for t in old:
                del self.mailbox[t]
        if old:
            logger.warning("dropped the KV of %d transfer(s) no request claimed within %.0f s",
                           len(old), self.ttl_s)

    def take(self, transfer_id: str) -> list[bytes | memoryview] | None:
        with self.lock:
            entry = self.mailbox.pop(transfer_id, None)
        return None if entry is None else entry[1]

    def wait(self, timeout: float) -> None:
        with self.arrived:
            self.arrived.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5.0)
