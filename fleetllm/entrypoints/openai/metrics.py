"""The server's Prometheus metrics: request latencies and tokens, and the engines' stats."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.errors import EngineDeadError, EngineRestartingError
from fleetllm.spec_decode.metrics import prometheus_families as spec_decode_families

from .streaming import Stream

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)
# The scheduler's stats, as (name, help, stats key); gauges, then counters.
ENGINE_GAUGES = (
    ("fleetllm:num_requests_running", "Requests the scheduler is running.", "num_running"),
    ("fleetllm:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("fleetllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
     "kv_cache_usage"),
)
ENGINE_COUNTERS = (
    ("fleetllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_queries"),
    ("fleetllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     "prefix_cache_hits"),
    ("fleetllm:num_preemptions", "Requests preempted for lack of KV cache.", "num_preemptions"),
    ("fleetllm:kv_connector_blocks_loaded", "KV blocks a KV connector loaded (all ranks).",
     "kv_connector_blocks_loaded"),
    ("fleetllm:kv_connector_bytes_loaded", "KV bytes a KV connector loaded (all ranks).",
     "kv_connector_bytes_loaded"),
    ("fleetllm:kv_connector_blocks_saved", "KV blocks a KV connector saved or sent.",
     "kv_connector_blocks_saved"),
    ("fleetllm:kv_connector_bytes_saved", "KV bytes a KV connector saved or sent.",
     "kv_connector_bytes_saved"),
    ("fleetllm:kv_connector_tokens_loaded", "Prompt tokens whose KV a connector loaded.",
     "kv_connector_tokens_loaded"),
)


class _EngineStats(Collector):
    """Exports the engines' last reported scheduler stats, one sample per engine, and the
    restarts: of engine cores, as this front end saw them (every API server hears of every
    one, so any server's count is the total), and of workers, summed over the engines (a
    restarted engine core starts from 0, which Prometheus reads as a counter reset)."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine
        self.per_engine: list[dict[str, float]] = []
        self.lora_load: dict[str, list[int]] = {}

    def collect(self) -> Iterator[Metric]:
        for kinds, family in ((ENGINE_GAUGES, GaugeMetricFamily),
                              (ENGINE_COUNTERS, CounterMetricFamily)):
            for name, doc, key in kinds:
                metric = family(name, doc, labels=["engine"])
                for i, stats in enumerate(self.per_engine):
                    metric.add_metric([str(i)], stats.get(key, 0.0))
                yield metric
        yield CounterMetricFamily("fleetllm:engine_restarts",
                                  "Engine cores that died and were restarted.",
                                  value=self.engine.num_engine_restarts)
        yield CounterMetricFamily(
            "fleetllm:worker_restarts", "Workers restarted inside the engine cores.",
            value=sum(s.get("num_worker_restarts", 0.0) for s in self.per_engine))
        yield CounterMetricFamily(
            "fleetllm:requests_recomputed",
            "Requests put back and recomputed inside an engine core after its workers "
            "were restarted.",
            value=sum(s.get("num_requests_recomputed", 0.0) for s in self.per_engine))
        yield from spec_decode_families(self.per_engine)
        yield from self._balance()
        yield from self._loras()

    def _loras(self) -> Iterator[Metric]:
        """vLLM's lora_requests_info (the adapter names running and waiting, as labels, with
        the time as value), and fleetllm's per-adapter counts."""
        lora_config = self.engine.config.lora_config
        if lora_config is None:
            return
        info = GaugeMetricFamily(
            "fleetllm:lora_requests_info", "Running stats on LoRA requests.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        running = sorted(k for k, (r, _) in self.lora_load.items() if r)
        waiting = sorted(k for k, (_, w) in self.lora_load.items() if w)
        info.add_metric([",".join(running), ",".join(waiting), str(lora_config.max_loras)],
                        time.time())
        yield info
        for i, (name, doc) in enumerate((("running", "running"), ("waiting", "waiting"))):
            family = GaugeMetricFamily(f"fleetllm:lora_requests_{name}",
                                       f"Requests {doc} per LoRA adapter.", labels=["lora_name"])
            for adapter, counts in sorted(self.lora_load.items()):
                family.add_metric([adapter], counts[i])
            yield family

    def _balance(self) -> Iterator[Metric]:
        """How this API server balances: each engine's load as the DPCoordinator last
        published it (4 * waiting + running, plus this server's sends since), and this
        server's own unfinished requests on each engine."""
        if self.engine.errored:
            return
        loads = self.engine.engine_loads()
        published = GaugeMetricFamily(
            "fleetllm:engine_load", "An engine core's load as the data-parallel coordinator "
            "publishes it (4 * waiting + running); absent without a coordinator.",
            labels=["engine"])
        own = GaugeMetricFamily(
            "fleetllm:engine_requests_from_this_server",
            "Unfinished requests this API server has on each engine core.", labels=["engine"])
        for index, score, sent in loads:
            if score is not None:
                published.add_metric([str(index)], score)
            own.add_metric([str(index)], sent)
        yield published
        yield own
        yield GaugeMetricFamily("fleetllm:data_parallel_size", "Engine cores in the fleet.",
                                value=len(loads))


class ServerMetrics:
    """Prometheus metrics on the app's own registry, so two apps in a process never clash."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.engine_stats = _EngineStats(engine)
        self.registry.register(self.engine_stats)
        r = self.registry
        # A multiprocess counter: with several API servers, each re-sends its own requests.
        self.requests_recovered = Counter(
            "fleetllm:requests_recovered",
            "Unfinished requests re-sent to a live engine after their engine core died.",
            registry=r)
        engine.on_requests_recovered(self.requests_recovered.inc)
        self.prompt_tokens = Counter("fleetllm:prompt_tokens", "Prefilled prompt tokens.",
                                     registry=r)
        self.generation_tokens = Counter("fleetllm:generation_tokens", "Generated tokens.",
                                         registry=r)
        self.ttft = Histogram("fleetllm:time_to_first_token_seconds",
                              "Time from arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fleetllm:inter_token_latency_seconds",
                             "Time between successive outputs of a request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fleetllm:e2e_request_latency_seconds",
                             "Time from arrival to the finished output.",
                             buckets=LATENCY_BUCKETS, registry=r)

    async def track(self, stream: Stream, prompt_len: int) -> Stream:
        start = last = time.monotonic()
        seen = 0
        async for out in stream:
            now = time.monotonic()
            total = sum(len(o.token_ids) for o in out.outputs)
            if total > seen:
                if seen == 0:
                    self.ttft.observe(now - start)
                    self.prompt_tokens.inc(prompt_len)
                else:
                    self.itl.observe(now - last)
                self.generation_tokens.inc(total - seen)
                seen, last = total, now
            if out.finished:
                self.e2e.observe(now - start)
            yield out

    async def render(self) -> bytes:
        if not self.engine.errored:
            try:
                self.engine_stats.per_engine = await self.engine.get_stats()
                if self.engine.config.lora_config is not None:
                    self.engine_stats.lora_load = await self.engine.lora_load()
            except (EngineDeadError, EngineRestartingError):
                pass  # keep the last numbers; /health reports a death
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        # Several API server processes: any of them answers a scrape with the sum of all.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.engine_stats)
        return generate_latest(registry)
