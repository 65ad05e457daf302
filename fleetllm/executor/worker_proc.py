"""The main loop of one worker process of the MultiprocExecutor."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any

from fleetllm.executor import rpc
from fleetllm.executor.shm_queue import Handle, MessageQueue, QueueAbortedError, reclaim_orphan
from fleetllm.worker.worker_base import WorkerWrapperBase, resolve_obj_by_qualname

logger = logging.getLogger(__name__)

SHUTDOWN = b"__fleetllm_shutdown__"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    # PDEATHSIG fires when the creating thread exits, so it is only used when the parent
    # created us from its main thread; the parent-pid check in the wait loop covers the rest.
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_main(config: Any, rank: int, local_rank: int, init_method: str, handle: Handle,
                ready_pipe: Any, parent_pid: int, use_pdeathsig: bool, worker_cls: str,
                doorbell: Any = None, wakeup: Any = None) -> None:
    # SIGTERM (from shutdown, or from PDEATHSIG) unwinds through the finally below, so the
    # worker still removes what it created.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid, use_pdeathsig)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    broadcast = responses = None
    wrapper = WorkerWrapperBase(rpc_rank=rank, worker_cls=worker_cls)
    try:
        wrapper.init_worker(config, local_rank=local_rank, rank=rank,
                            distributed_init_method=init_method,
                            is_driver_worker=rank == 0)
        broadcast = MessageQueue.create_from_handle(handle, rank)
        responses = MessageQueue(1, max_chunk_bytes=1 << 22, max_chunks=8)
        ready_pipe.send({"handle": responses.export_handle()})
        ready_pipe.close()
        parent_gone = lambda: os.getppid() != parent_pid  # noqa: E731
        broadcast.wait_until_ready(timeout=60, should_abort=parent_gone)
        responses.wait_until_ready(timeout=60, should_abort=parent_gone)
        _serve(wrapper, rank, broadcast, responses, parent_gone,
               resolve_obj_by_qualname(worker_cls), doorbell, wakeup)
    except QueueAbortedError:
        logger.info("parent process is gone; exiting")
    except Exception as e:  # start-up failed: tell the parent if it is still listening
        try:
            ready_pipe.send({"error": f"failed to start: {type(e).__name__}: {e}"})
        except (OSError, ValueError):
            pass
        raise
    finally:
        _cleanup(wrapper, rank, parent_pid, handle, broadcast, responses)


def _cleanup(wrapper: WorkerWrapperBase, rank: int, parent_pid: int, handle: Handle,
             broadcast: MessageQueue | None, responses: MessageQueue | None) -> None:
    """Each step on its own: a failing one (a dead peer breaks the process group) must not
    keep the queues from being removed."""
    from fleetllm.distributed.parallel_state import destroy_distributed

    # Shared memory first: tearing down the process group can block on a dying peer.
    steps = [
        lambda: responses.close() if responses is not None else None,
        lambda: broadcast.close() if broadcast is not None else None,
        # nobody else is left to remove the parent's segment
        lambda: reclaim_orphan(handle) if rank == 0 and _parent_gone(parent_pid) else None,
        lambda: wrapper.worker.shutdown() if wrapper.worker is not None else None,
        destroy_distributed,
    ]
    for step in steps:
        try:
            step()
        except BaseException:  # noqa: BLE001 - keep cleaning up whatever happened
            logger.warning("cleanup step failed", exc_info=True)


_signalled = False


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # PDEATHSIG can fire twice: a killed parent's threads die one by one, and we are first
    # handed to a sibling thread of the same process. The second must not cut the cleanup
    # the first one started.
    global _signalled
    _signalled = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _parent_gone(parent_pid: int) -> bool:
    """True once we have been handed to another process. After a signal the parent may
    still be dying (its other threads), so give it a moment."""
    deadline = time.monotonic() + (1.0 if _signalled else 0.0)
    while os.getppid() == parent_pid:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _serve(wrapper: WorkerWrapperBase, rank: int, broadcast: MessageQueue,
           responses: MessageQueue, parent_gone: Any, cls: type, doorbell: Any = None,
           wakeup: Any = None) -> None:
    """doorbell: rung after each reply (the driver may sleep on it); wakeup: rung by the
    driver after each call, so an idle worker sleeps instead of polling."""
    bell = None if doorbell is None else doorbell.fileno()
    wake = None if wakeup is None else wakeup.fileno()
    for fd in (bell, wake):
        if fd is not None:
            os.set_blocking(fd, False)
    while True:
        data = broadcast.dequeue(should_abort=parent_gone, bell=wake)
        if data == SHUTDOWN:
            return
        req = rpc.decode_request(data)
        try:
            method, args, kwargs = rpc.unpack_request(req, cls)
            result = wrapper.execute_method(method, *args, **kwargs)
            if req.reply_rank >= 0 and req.reply_rank != rank:
                continue
            reply = rpc.make_response(req.call_id, rank, result, pickled=bool(req.pickled))
        except Exception as e:
            logger.debug("rpc %s failed", req.method or "<callable>", exc_info=True)
            reply = rpc.make_error(req.call_id, rank, e)
        responses.enqueue(reply, should_abort=parent_gone)
        if bell is not None:
            try:
                os.write(bell, b"\0")  # wakes a driver sleeping on the doorbell
            except OSError:
                pass  # full (it is ringing already) or the driver is gone
