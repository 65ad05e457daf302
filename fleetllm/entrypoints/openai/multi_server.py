"""`fleetllm serve --api-server-count N`: N HTTP server processes over shared engine cores.

The parent (the supervisor) binds the listening socket, starts the engine cores (processes
or Ray actors) and runs their handshake, then spawns N API server processes. Each inherits
the socket (the kernel spreads connections across them) and binds its own pair of ZMQ
sockets, to which every engine connects. The supervisor then waits: if any process or
actor dies it tears the whole tree down; SIGTERM or Ctrl-C stops it cleanly.
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
from fleetllm.engine.core_proc import set_process_name
from fleetllm.engine.launch import (
    EngineConnection,
    EngineManager,
    launch_core_engines,
    shutdown,
    unlink_ipc,
    wait_for_finished,
)

from .server import ENGINE_DEATH_GRACE_S, _raise_stopped, _Stopped, listen_socket, serve_http

logger = logging.getLogger(__name__)

EXIT_CODE_WAIT_S = 1.0


class APIServerProcessManager:
    """Starts the API server processes, and terminates them (then their trees) on close.

    Each server gets the listening socket, its client config (engine addresses and its
    index), and the read end of a pipe on which `notify_engine_death` tells it the engines
    died; the pipe also reads as closed if this process dies."""

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
        self._finalizer = weakref.finalize(self, _close, self.processes, self._links)
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

    def notify_engine_death(self, finished: dict[str, int]) -> None:
        message = msgspec.json.encode(finished)
        for link in self._links:
            try:
                link.send_bytes(message)
            except OSError:
                pass  # that server is gone already

    def close(self) -> None:
        self._finalizer()


def _close(processes: list[BaseProcess], links: list[Connection]) -> None:
    shutdown(processes)
    for link in links:
        link.close()


def wait_for_completion_or_failure(api_server_manager: APIServerProcessManager,
                                   engine_manager: EngineManager | None = None) -> None:
    """Waits until any API server or engine core ends, then tears everything down.

    Raises RuntimeError naming what died with a non-zero code (engines always count: they
    only stop when told). Returns when the API servers all stopped cleanly; KeyboardInterrupt
    (Ctrl-C, or SIGTERM turned into _Stopped) stops the tree without an error."""
    by_sentinel = {p.sentinel: p for p in api_server_manager.processes}
    engine_sentinels = engine_manager.sentinels() if engine_manager else []
    try:
        logger.info("supervising %d API server(s) and the engine cores",
                    len(by_sentinel))
        while True:
            ready = connection.wait([*by_sentinel, *engine_sentinels])
            if engine_manager is not None and any(s in engine_sentinels for s in ready):
                engines_done = wait_for_finished(engine_manager, EXIT_CODE_WAIT_S)
                # The servers answer 503 and end their streams with an error meanwhile.
                api_server_manager.notify_engine_death(engines_done)
                detail = ", ".join(f"{n} exited with code {c}" for n, c in engines_done.items())
                logger.error("engine core died (%s); stopping every process in %.0f s",
                             detail, ENGINE_DEATH_GRACE_S)
                time.sleep(ENGINE_DEATH_GRACE_S)
                raise RuntimeError(f"engine core died: {detail}")
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
            wait_for_completion_or_failure(api, engine_manager)
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
    # Ctrl-C reaches the whole process group; the supervisor decides (uvicorn, once it
    # runs, stops gracefully on it, which the supervisor sees as a clean exit).
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
        code = serve_http(engine, args, sock, log_config=None)
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        if engine is not None:
            engine.shutdown()
        else:
            link.close()
        sock.close()
    sys.exit(code)
