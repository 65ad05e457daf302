"""KV connectors: the aggregator, the config, and both connectors' two sides (no engine)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import msgspec
import pytest
import torch

from fleetllm.config import EngineArgs, EngineConfig
from fleetllm.distributed.kv_transfer import (
    KVConnectorFactory,
    KVConnectorOutput,
    KVOutputAggregator,
    KVTransferConfig,
)
from fleetllm.distributed.kv_transfer.base import KVConnectorRole, aligned_prompt_tokens
from fleetllm.errors import ConfigurationError
from fleetllm.executor.futures import FutureWrapper
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from fleetllm.sched.request import Request
from tests.helpers import free_ports

BS = 4
NUM_BLOCKS = 16


class _Out(msgspec.Struct):
    """A ModelRunnerOutput stand-in with the kv_connector_output field."""

    rank: int
    kv_connector_output: KVConnectorOutput | None = None


def _outs(*per_rank: tuple[list[str], list[str]]) -> list[_Out]:
    return [_Out(r, KVConnectorOutput(finished_sending=s, finished_recving=v))
            for r, (s, v) in enumerate(per_rank)]


# ---- KVOutputAggregator -------------------------------------------------------------------
def test_aggregator_out_of_order_reports_from_two_ranks() -> None:
    agg = KVOutputAggregator(2)
    out = agg.aggregate(_outs((["a"], ["x"]), (["b"], [])), output_rank=0)
    assert out.kv_connector_output.finished_sending == []
    assert out.kv_connector_output.finished_recving == []
    out = agg.aggregate(_outs((["b"], []), (["a"], ["x"])), output_rank=1)
    assert out.rank == 1
    assert sorted(out.kv_connector_output.finished_sending) == ["a", "b"]
    assert out.kv_connector_output.finished_recving == ["x"]
    assert agg.pending() == (set(), set())


def test_aggregator_one_rank_reporting_twice_is_not_enough() -> None:
    agg = KVOutputAggregator(2)
    for _ in range(3):
        out = agg.aggregate(_outs((["a"], ["a"]), ([], [])))
        assert out.kv_connector_output.finished_sending == []
        assert out.kv_connector_output.finished_recving == []
    out = agg.aggregate(_outs(([], []), (["a"], ["a"])))
    assert out.kv_connector_output.finished_sending == ["a"]
    assert out.kv_connector_output.finished_recving == ["a"]


def test_aggregator_request_finished_on_one_rank_only_is_not_reported() -> None:
    agg = KVOutputAggregator(2)
    for _ in range(3):
        out = agg.aggregate(_outs((["a"], []), ([], [])))
        assert out.kv_connector_output.finished_sending == []
    assert agg.pending() == ({"a"}, set())


def test_aggregator_failed_load_counts_and_counters_sum() -> None:
    agg = KVOutputAggregator(2)
    a = KVConnectorOutput(finished_recving=["r"], failed_recving=["r"], blocks_loaded=2,
                          bytes_loaded=10)
    b = KVConnectorOutput(finished_recving=["r"], blocks_loaded=3, bytes_loaded=5)
    original = _Out(0, a)
    kv = agg.aggregate([original, _Out(1, b)]).kv_connector_output
    assert kv.finished_recving == ["r"] and kv.failed_recving == ["r"]
    assert (kv.blocks_loaded, kv.bytes_loaded) == (5, 15)
    assert original.kv_connector_output is a  # the rank's own output is left as it is


def test_aggregator_worker_may_change_expected_count() -> None:
    agg = KVOutputAggregator(4)
    out = agg.aggregate([_Out(0, KVConnectorOutput(finished_sending=["a"],
                                                   expected_finished_count=1))])
    assert out.kv_connector_output.finished_sending == ["a"]
    assert agg.expected_finished_count == 1


def test_future_wrapper_aggregates_once() -> None:
    agg = KVOutputAggregator(2)
    futures: list[Future] = [Future(), Future()]
    wrapper = FutureWrapper(futures, agg, output_rank=0)
    seen = []
    wrapper.add_done_callback(lambda f: seen.append(f))
    for f, out in zip(futures, _outs((["a"], []), (["a"], []))):
        f.set_result(out)
    assert wrapper.result(1).kv_connector_output.finished_sending == ["a"]
    assert wrapper.result(1).kv_connector_output.finished_sending == ["a"]
    assert len(seen) == 1


# ---- configuration ------------------------------------------------------------------------
def _config(model: Path, tmp_path: Path, connector: str = "SharedStorageConnector",
            role: str = "kv_both", tp: int = 1, **extra: object) -> EngineConfig:
    if connector == "SharedStorageConnector":
        extra.setdefault("shared_storage_path", str(tmp_path / "kv"))
    kv = {"kv_connector": connector, "kv_role": role, "kv_connector_extra_config": extra}
    return EngineArgs(model=str(model), block_size=BS, tensor_parallel_size=tp,
                      distributed_executor_backend="mp" if tp > 1 else None,
                      kv_transfer_config=kv).create_engine_config()


@pytest.mark.parametrize("value, words", [
    ("{", "not valid JSON"),
    ({"kv_connector": "Nope"}, "choose one of P2PZmqConnector, SharedStorageConnector"),
    ({"kv_connector": "SharedStorageConnector"}, "shared_storage_path"),
    ({"kv_connector": "SharedStorageConnector", "kv_role": "both",
      "kv_connector_extra_config": {"shared_storage_path": "/tmp/x"}}, "kv_producer"),
    ({"kv_connector": "P2PZmqConnector", "kv_connector_extra_config": {"kv_port": 0}},
     "must be a TCP port"),
    ({"connector": "x"}, "unknown keys ['connector']"),
])
def test_kv_transfer_config_errors_say_what_to_change(value: object, words: str) -> None:
    with pytest.raises(ConfigurationError, match=r"\[E005\]") as e:
        KVTransferConfig.from_user(value)
    assert words in str(e.value)


def test_engine_args_carry_kv_transfer_config(llama_dir: Path, tmp_path: Path) -> None:
    cfg = _config(llama_dir, tmp_path, role="kv_producer")
    kv = cfg.kv_transfer_config
    assert kv.kv_connector == "SharedStorageConnector" and kv.is_kv_producer
    assert not kv.is_kv_consumer
    assert EngineArgs(model=str(llama_dir)).create_engine_config().kv_transfer_config is None


# ---- helpers for the connectors' two sides ------------------------------------------------
def _caches(cfg: EngineConfig, tp: int = 1, seed: int | None = None
            ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    mc = cfg.model_config
    shape = (NUM_BLOCKS, BS, mc.num_key_value_heads // tp, mc.head_dim)
    gen = torch.Generator().manual_seed(seed or 0)
    make = (lambda: torch.randn(shape, generator=gen)) if seed is not None else (
        lambda: torch.zeros(shape))
    return {layer: (make(), make()) for layer in range(mc.num_hidden_layers)}


def _worker(cfg: EngineConfig, caches: dict, rank: int = 0):
    conn = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, rank)
    conn.register_kv_caches(caches)
    return conn


def _request(req_id: str, tokens: list[int], **params: object) -> Request:
    req = Request(req_id, tokens, SamplingParams(max_tokens=4))
    if params:
        req.kv_transfer_params = params
    return req


def _prefill_step(req: Request, block_ids: list[int]) -> SchedulerOutput:
    new = NewRequestData(req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                         req.sampling_params, block_ids, 0, [])
    n = req.num_tokens
    return SchedulerOutput([new], CachedRequestData(), {req.request_id: n}, n, [])


def _run_step(workers: list, meta, finished: set[str] | None = None) -> list[KVConnectorOutput]:
    """What the model runner does around a forward pass, on each rank."""
    outs = []
    for w in workers:
        w.bind_connector_metadata(meta)
        w.start_load_kv()
        for layer, kv in w.kv_caches.items():
            w.wait_for_layer_load(layer)
            w.save_kv_layer(layer, kv)
        w.wait_for_save()
        outs.append(w.build_output(finished or set()))
        w.clear_connector_metadata()
    return outs


def _tokens_of(caches: dict, block_ids: list[int], n: int) -> list[torch.Tensor]:
    out = []
    for k, v in caches.values():
        for c in (k, v):
            out.append(c[block_ids].reshape(-1, *c.shape[2:])[:n])
    return out


TOKENS = list(range(1, 15))  # 14 tokens: 12 move (3 blocks), the last 2 are computed
PRODUCER_BLOCKS = [3, 5, 7, 9]
CONSUMER_BLOCKS = [10, 2, 12, 4]


# ---- SharedStorageConnector ---------------------------------------------------------------
def _store(cfg: EngineConfig, tp: int) -> list[dict]:
    """A producer computes TOKENS and saves their KV; returns each rank's caches."""
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER)
    req = _request("a", TOKENS)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = sched.build_connector_meta(_prefill_step(req, PRODUCER_BLOCKS))
    assert [(s.req_id, s.num_tokens) for s in meta.save] == [("a", 12)]
    caches = [_caches(cfg, tp, seed=r + 1) for r in range(tp)]
    workers = [_worker(cfg, c, r) for r, c in enumerate(caches)]
    outs = _run_step(workers, meta)
    assert sum(o.blocks_saved for o in outs) == 3 * tp
    assert sched.request_finished(req, PRODUCER_BLOCKS) == (False, None)
    return caches


def _load(cfg: EngineConfig, tp: int, tokens: list[int]) -> tuple[list[dict], KVConnectorOutput,
                                                                   tuple[int | None, bool]]:
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER)
    req = _request("b", tokens)
    match = sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, CONSUMER_BLOCKS, match[0] or 0)
    meta = sched.build_connector_meta(SchedulerOutput.empty())
    caches = [_caches(cfg, tp) for _ in range(tp)]
    outs = _run_step([_worker(cfg, c, r) for r, c in enumerate(caches)], meta)
    agg = KVOutputAggregator(tp).aggregate([_Out(r, o) for r, o in enumerate(outs)])
    return caches, agg.kv_connector_output, match


@pytest.mark.parametrize("tp", [1, 2])
def test_shared_storage_roundtrip_each_rank_its_heads(llama_dir: Path, tmp_path: Path,
                                                      tp: int) -> None:
    produced = _store(_config(llama_dir, tmp_path, role="kv_producer", tp=tp), tp)
    consumer = _config(llama_dir, tmp_path, role="kv_consumer", tp=tp)
    caches, kv, match = _load(consumer, tp, TOKENS + [99, 98, 97])  # a longer prompt
    assert match == (12, True)
    assert kv.finished_recving == ["b"] and kv.failed_recving == []
    assert kv.blocks_loaded == 3 * tp
    for r in range(tp):
        for got, want in zip(_tokens_of(caches[r], CONSUMER_BLOCKS, 12),
                             _tokens_of(produced[r], PRODUCER_BLOCKS, 12)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_shared_storage_corrupt_file_means_recompute(llama_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _store(_config(llama_dir, tmp_path, role="kv_producer", tp=2), 2)
    layer = next((tmp_path / "kv").glob("*/rank1/layer1.safetensors"))
    data = bytearray(layer.read_bytes())
    data[-8:] = b"\xff" * 8  # inside the tensor bytes: only the checksum can tell
    layer.write_bytes(bytes(data))
    _, kv, match = _load(_config(llama_dir, tmp_path, role="kv_consumer", tp=2), 2, TOKENS)
    assert match == (12, True)
    assert kv.finished_recving == ["b"] and kv.failed_recving == ["b"]
    assert "checksum" in caplog.text and "recomputed" in caplog.text


def test_shared_storage_other_dtype_or_prefix_is_not_used(llama_dir: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    _store(_config(llama_dir, tmp_path, role="kv_producer"), 1)
    cfg = _config(llama_dir, tmp_path, role="kv_consumer")
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER)
    assert sched.get_num_new_matched_tokens(_request("c", [5] + TOKENS[1:]), 0) == (0, False)
    other = cfg.replace(model_config=dataclasses.replace(cfg.model_config, dtype="bfloat16"))
    sched = KVConnectorFactory.create_connector(other, KVConnectorRole.SCHEDULER)
    assert sched.get_num_new_matched_tokens(_request("d", TOKENS), 0) == (0, False)
    assert "another model, dtype" in caplog.text
    assert aligned_prompt_tokens(16, BS) == 12 and aligned_prompt_tokens(17, BS) == 16


# ---- P2PZmqConnector ----------------------------------------------------------------------
def _poll(workers: list, want: str, field: str, first: list[KVConnectorOutput],
          agg: KVOutputAggregator | None = None, timeout: float = 10.0) -> KVConnectorOutput:
    """Aggregates the step's outputs (first), then polls the workers until want shows."""
    agg = agg or KVOutputAggregator(len(workers))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outs = first or [w.build_output(set()) for w in workers]
        first = []
        kv = agg.aggregate([_Out(r, o) for r, o in enumerate(outs)]).kv_connector_output
        if want in getattr(kv, field):
            return kv
        time.sleep(0.02)
    raise AssertionError(f"{want} never reached {field}")


def _p2p_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fleetllm-kv-")]


@pytest.mark.parametrize("tp", [1, 2])
def test_p2p_push_from_prefill_to_decode(llama_dir: Path, tmp_path: Path, tp: int) -> None:
    port = free_ports(tp)
    prod = _config(llama_dir, tmp_path, "P2PZmqConnector", "kv_producer", tp, remote_port=port)
    cons = _config(llama_dir, tmp_path, "P2PZmqConnector", "kv_consumer", tp, kv_port=port)
    produced = [_caches(prod, tp, seed=r + 1) for r in range(tp)]
    received = [_caches(cons, tp) for _ in range(tp)]
    workers = ([_worker(cons, c, r) for r, c in enumerate(received)]
               + [_worker(prod, c, r) for r, c in enumerate(produced)])
    decoders, prefillers = workers[:tp], workers[tp:]
    try:
        p_sched = KVConnectorFactory.create_connector(prod, KVConnectorRole.SCHEDULER)
        req = _request("a", TOKENS, do_remote_decode=True, transfer_id="t1")
        assert p_sched.get_num_new_matched_tokens(req, 0) == (0, False)
        meta = p_sched.build_connector_meta(_prefill_step(req, PRODUCER_BLOCKS))
        assert [(s.req_id, s.num_tokens) for s in meta.save] == [("a", 12)]
        outs = _run_step(prefillers, meta)
        assert p_sched.request_finished(req, PRODUCER_BLOCKS) == (True, None)  # held
        p_sched.update_connector_output(_poll(prefillers, "a", "finished_sending", outs))

        d_sched = KVConnectorFactory.create_connector(cons, KVConnectorRole.SCHEDULER)
        dreq = _request("b", TOKENS, do_remote_prefill=True, transfer_id="t1")
        assert d_sched.get_num_new_matched_tokens(dreq, 0) == (12, True)
        d_sched.update_state_after_alloc(dreq, CONSUMER_BLOCKS, 12)
        outs = _run_step(decoders, d_sched.build_connector_meta(SchedulerOutput.empty()))
        kv = _poll(decoders, "b", "finished_recving", outs)
        assert kv.failed_recving == [] and kv.blocks_loaded == 3 * tp
        for r in range(tp):
            for got, want in zip(_tokens_of(received[r], CONSUMER_BLOCKS, 12),
                                 _tokens_of(produced[r], PRODUCER_BLOCKS, 12)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        # Asked once only: a second admission (after a failure) recomputes.
        assert d_sched.get_num_new_matched_tokens(dreq, 0) == (0, False)
    finally:
        for w in workers:
            w.shutdown()
    assert _p2p_threads() == []


def test_p2p_decode_recomputes_on_timeout_or_mismatch(llama_dir: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    port = free_ports(1)
    prod = _config(llama_dir, tmp_path, "P2PZmqConnector", "kv_producer", remote_port=port)
    cons = _config(llama_dir, tmp_path, "P2PZmqConnector", "kv_consumer", kv_port=port,
                   recv_timeout_s=3.0)
    decoder, prefiller = _worker(cons, _caches(cons)), _worker(prod, _caches(prod, seed=1))
    try:
        d_sched = KVConnectorFactory.create_connector(cons, KVConnectorRole.SCHEDULER)
        never = _request("n", TOKENS, do_remote_prefill=True, transfer_id="never")
        other = _request("o", [7] + TOKENS[1:], do_remote_prefill=True, transfer_id="t2")
        for r in (never, other):
            n, _ = d_sched.get_num_new_matched_tokens(r, 0)
            d_sched.update_state_after_alloc(r, CONSUMER_BLOCKS, n)
        outs = _run_step([decoder], d_sched.build_connector_meta(SchedulerOutput.empty()))
        p_sched = KVConnectorFactory.create_connector(prod, KVConnectorRole.SCHEDULER)
        req = _request("a", TOKENS, do_remote_decode=True, transfer_id="t2")
        p_sched.get_num_new_matched_tokens(req, 0)
        _run_step([prefiller], p_sched.build_connector_meta(_prefill_step(req, PRODUCER_BLOCKS)))
        agg = KVOutputAggregator(1)
        kv = _poll([decoder], "o", "finished_recving", outs, agg)
        assert kv.failed_recving == ["o"]  # another prompt's KV is never used
        kv = _poll([decoder], "n", "finished_recving", [], agg)
        assert kv.failed_recving == ["n"]
        assert "did not arrive" in caplog.text and "differ" in caplog.text
    finally:
        decoder.shutdown()
        prefiller.shutdown()


def test_p2p_dead_decode_side_never_holds_blocks(llama_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    prod = _config(llama_dir, tmp_path, "P2PZmqConnector", "kv_producer",
                   remote_port=free_ports(1), send_timeout_s=0.3)
    prefiller = _worker(prod, _caches(prod, seed=1))
    try:
        sched = KVConnectorFactory.create_connector(prod, KVConnectorRole.SCHEDULER)
        req = _request("a", TOKENS, do_remote_decode=True, transfer_id="t3")
        sched.get_num_new_matched_tokens(req, 0)
        outs = _run_step([prefiller],
                         sched.build_connector_meta(_prefill_step(req, PRODUCER_BLOCKS)))
        assert sched.request_finished(req, PRODUCER_BLOCKS)[0]
        sched.update_connector_output(_poll([prefiller], "a", "finished_sending", outs))
        assert "will recompute" in caplog.text
        assert not sched.request_finished(req, PRODUCER_BLOCKS)[0]
    finally:
        prefiller.shutdown()
    assert _p2p_threads() == []


def test_p2p_port_in_use_is_a_clear_error(llama_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cons = _config(llama_dir, tmp_path, "P2PZmqConnector", "kv_consumer",
                       kv_port=s.getsockname()[1])
        with pytest.raises(ConfigurationError, match="choose another kv_port"):
            _worker(cons, _caches(cons))
    assert _p2p_threads() == []


# ---- executors ----------------------------------------------------------------------------
def test_mp_executor_collects_every_rank_with_a_connector(llama_dir: Path,
                                                          tmp_path: Path) -> None:
    from tests.helpers import generate_ids, greedy, make_llm, random_prompts

    prompts = random_prompts((9, 30))
    kv = {"kv_connector": "SharedStorageConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "kv")}}
    plain = make_llm(llama_dir, kv_cache_memory_bytes=1 << 22)
    try:
        want = generate_ids(plain, prompts, greedy(8))
    finally:
        plain.shutdown()
    llm = make_llm(llama_dir, kv_cache_memory_bytes=1 << 22, tensor_parallel_size=2,
                   distributed_executor_backend="mp", kv_transfer_config=kv)
    try:
        ex = llm.engine_core.executor
        assert ex.kv_output_aggregator is not None
        assert ex.kv_output_aggregator.expected_finished_count == 2
        assert generate_ids(llm, prompts, greedy(8)) == want
    finally:
        llm.shutdown()


def test_shared_storage_lora_adapter_has_its_own_entries(llama_dir: Path,
                                                         tmp_path: Path) -> None:
    from fleetllm.lora.request import LoRARequest

    _store(_config(llama_dir, tmp_path, role="kv_producer"), 1)
    sched = KVConnectorFactory.create_connector(
        _config(llama_dir, tmp_path, role="kv_consumer"), KVConnectorRole.SCHEDULER)
    req = Request("l", TOKENS, SamplingParams(), lora_request=LoRARequest("a", 1, "/x"))
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.get_num_new_matched_tokens(_request("p", TOKENS), 0) == (12, True)
