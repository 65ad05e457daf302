"""`fleetllm serve --api-server-count N`: N HTTP server processes over shared engine cores.

The parent (the supervisor) binds the listening socket, starts the engine cores (processes
or Ray actors) and runs their handshake, then spawns N API server processes. Each inherits
the socket (the kernel spreads connections across them) and binds its own pair of ZMQ
sockets, to which every engine connects. The supervisor then waits. An engine core that
dies is restarted by the supervisor's engine manager (it owns the processes), and each API
server hears of the death and of the return over its pipe (EngineEvent), re-sending its own
unfinished requests. An engine that cannot be restarted, or any API server that dies, tears
the whole tree down; SIGTERM or Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from fleetllm.config import EngineArgs
from fleetllm.engine.coordinator import CoordinatorManager
from fleetllm.engine.core_proc import set_process_name
from fleetllm.engine.handshake import unlink_ipc
from fleetllm.engine.launch import (
    EngineConnection,
    EngineManager,
    kill_process_tree,
    launch_core_engines,
)
from fleetllm.engine.messages import EngineEvent

from .server import (
    ENGINE_DEATH_GRACE_S,
    UVICORN_GRACE_S,
    _raise_stopped,
    _Stopped,
    listen_socket,
    serve_http,
)
from .shutdown import CUT_GRACE_S, IGNORE_SIGINT

# Past its drain, a server that has not exited is killed: time for the cut requests, uvicorn's
# own shutdown and the engine client's.
STOP_MARGIN_S = CUT_GRACE_S + UVICORN_GRACE_S + 5

logger = logging.getLogger(__name__)


class APIServerProcessManager:
    """Starts the API server processes, and terminates them (then their trees) on close.

    Each server gets the listening socket, its client config (engine addresses and its
    index), and the read end of a pipe on which `notify` passes on the engine events; the
    pipe also reads as closed if this process dies."""

    def __init__(self, target_server_fn: Callable[..., Any], listen_address: str,
                 sock: socket.socket, args: argparse.Namespace, num_servers: int,
                 input_addresses: list[str], output_addresses: list[str],
                 client_config: dict[str, Any] | None = None) -> None:
        self.listen_address = listen_address
        self.sock = sock
        self.args = args
        ctx = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self._links: list[Connection] = []
        self._finalizer = weakref.finalize(self, _close, self.processes, self._links,
                                           args.shutdown_timeout + STOP_MARGIN_S)
        base = dict(client_config or {})
        for i, (in_addr, out_addr) in enumerate(zip(input_addresses, output_addresses)):
            reader, writer = ctx.Pipe(duplex=False)
            self._links.append(writer)
            config = {**base, "input_address": in_addr, "output_address": out_addr,
                      "client_index": i, "supervisor": reader}
            proc = ctx.Process(target=target_server_fn, name=f"ApiServer_{i}",
                               args=(listen_address, sock, args, config))
            self.processes.append(proc)
            try:
                proc.start()
            finally:
                reader.close()  # the child has its own copy
        logger.info("started %d API server processes on %s", num_servers, listen_address)

    def notify(self, event: EngineEvent) -> None:
        message = msgspec.msgpack.encode(event)
        for link in self._links:
            try:
                link.send_bytes(message)
            except OSError:
                pass  # that server is gone already

    def close(self) -> None:
        self._finalizer()


def _close(processes: list[BaseProcess], links: list[Connection], timeout_s: float) -> None:
    """SIGTERM every server (each drains its requests, see shutdown.py), wait up to
    timeout_s, then kill whatever is left with its children."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive() and proc.pid is not None:
            logger.warning("API server %s did not stop in %.0f s; killing it", proc.name,
                           timeout_s)
            kill_process_tree(proc.pid)
            proc.join(1)
    for link in links:
        link.close()


def wait_for_completion_or_failure(api_server_manager: APIServerProcessManager,
                                   engine_manager: EngineManager | None = None,
                                   coordinator: CoordinatorManager | None = None) -> None:
    """Waits until any API server ends or an engine core dies for good, then tears
    everything down; passes every engine event on to the API servers meanwhile.

    The coordinator (by default the engine manager's) is not watched here: its manager
    restarts it when it dies, and nothing fails meanwhile. It is ended with the rest.

    Raises RuntimeError naming what died with a non-zero code (an engine that could not be
    restarted always counts: engines only stop when told). Returns when the API servers all
    stopped cleanly; KeyboardInterrupt (Ctrl-C, or SIGTERM turned into _Stopped) stops the
    tree without an error."""
    by_sentinel = {p.sentinel: p for p in api_server_manager.processes}
    events_fd = engine_manager.events_fd() if engine_manager else None
    try:
        logger.info("supervising %d API server(s) and the engine cores",
                    len(by_sentinel))
        while True:
            ready = connection.wait([*by_sentinel, *([] if events_fd is None else [events_fd])])
            if events_fd in ready:
                _pass_on_engine_events(api_server_manager, engine_manager)
            ended = [p for p in api_server_manager.processes if not p.is_alive()]
            if ended:
                failed = [p for p in ended if p.exitcode != 0]
                if failed:
                    raise RuntimeError("; ".join(
                        f"API server {p.name} (pid {p.pid}) died with exit code {p.exitcode}"
                        for p in failed))
                logger.info("API server %s stopped; stopping the others", ended[0].name)
                return
    except (KeyboardInterrupt, _Stopped):
        logger.info("stopped by a signal; stopping every process")
    finally:
        api_server_manager.close()
        if engine_manager is not None:
            engine_manager.close()
        if coordinator is not None:
            coordinator.close()


def _pass_on_engine_events(api_server_manager: APIServerProcessManager,
                           engine_manager: EngineManager) -> None:
    """Tells every API server; an engine dead for good ends the tree after the grace
    period, in which the servers answer 503 and end their streams with an error."""
    for event in engine_manager.take_events():
        api_server_manager.notify(event)
        if event.final:
            logger.error("engine core died (%s); stopping every process in %.0f s",
                         event.detail, ENGINE_DEATH_GRACE_S)
            time.sleep(ENGINE_DEATH_GRACE_S)
            raise RuntimeError(f"engine core died: {event.detail}")
        what = {"dead": "died; restarting it", "ready": "is back",
                "gone": "could not be restarted; the others serve without it"}[event.kind]
        logger.info("engine core %d %s (%s)", event.index, what, event.detail)


def run_multi_server(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    signal.signal(signal.SIGTERM, _raise_stopped)
    config = EngineArgs(**engine_kwargs).create_engine_config()
    n = args.api_server_count
    sock = listen_socket(args.host, args.port)
    engine_manager: EngineManager | None = None
    addresses = None
    metrics_dir: str | None = None
    try:
        try:
            engine_manager, addresses, blocks = launch_core_engines(
                config, args.data_parallel_size, args.data_parallel_backend, num_clients=n)
        except (_Stopped, KeyboardInterrupt):
            logger.info("stopped by a signal during start-up")
            return 0
        signal.signal(signal.SIGTERM, _raise_stopped)  # ray.init replaces it with an abort
        client = {"config": config, "num_engines": args.data_parallel_size,
                  "num_gpu_blocks": blocks}
        # The servers' request metrics go to files here, so /metrics sums all of them.
        metrics_dir = tempfile.mkdtemp(prefix="fleetllm-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        api = APIServerProcessManager(
            run_api_server_worker, f"http://{args.host}:{args.port}", sock, args, n,
            addresses.inputs, addresses.outputs, client)
        sock.close()  # the servers hold it now
        try:
            wait_for_completion_or_failure(api, engine_manager,
                                           getattr(engine_manager, "coordinator", None))
        finally:
            engine_manager = None  # closed by the call above
    finally:
        sock.close()
        if engine_manager is not None:
            engine_manager.close()
        if addresses is not None:
            unlink_ipc(*addresses.inputs, *addresses.outputs)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def run_api_server_worker(listen_address: str, sock: socket.socket, args: argparse.Namespace,
                          client_config: dict[str, Any]) -> None:
    """One API server process: a client of every engine core, serving on the shared socket."""
    from fleetllm.engine.async_llm import AsyncLLM
    from fleetllm.engine.messages import EngineZmqAddresses

    index = client_config["client_index"]
    set_process_name(f"fleetllm-api{index}")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(levelname)s api_server{index} %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; the supervisor decides, and its SIGTERM
    # makes this server drain its requests (uvicorn ignores SIGINT here too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stopped)
    link: Connection = client_config["supervisor"]
    engine: AsyncLLM | None = None
    code = 0
    try:
        # This server's own pair of addresses, as client 0 of the pair.
        addresses = EngineZmqAddresses([client_config["input_address"]],
                                       [client_config["output_address"]])
        engine = AsyncLLM(client_config["config"], connection=EngineConnection(
            addresses, 0, client_config["num_engines"], client_config["num_gpu_blocks"], link))
        code = serve_http(engine, args, sock, log_config=None, ignored_signals=IGNORE_SIGINT)
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        if engine is not None:
            engine.shutdown()
        else:
            link.close()
        sock.close()
    sys.exit(code)
