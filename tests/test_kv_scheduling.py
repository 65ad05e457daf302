"""The scheduler with a KV connector: loads, failed loads, aborts, held sends, restarts
(a stand-in connector; the block pool is checked after each)."""

from __future__ import annotations

from fleetllm.config import SchedulerConfig
from fleetllm.distributed.kv_transfer.messages import KVConnectorMetadata, KVConnectorOutput
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.kv_transfer import KVTransferScheduling
from fleetllm.sched.output import ModelRunnerOutput
from fleetllm.sched.request import Request, RequestStatus
from fleetllm.sched.scheduler import Scheduler

BS = 4
NUM_BLOCKS = 32


class StubConnector:
    """Offers every prompt's full blocks once; sends of finished requests are held."""

    def __init__(self, hold_sends: bool = False) -> None:
        self.hold_sends = hold_sends
        self.allocs: list[tuple[str, list[int], int]] = []
        self.tried: set[str] = set()

    def get_num_new_matched_tokens(self, req: Request, num_computed: int):
        if req.request_id in self.tried or self.hold_sends:
            return 0, False
        return (req.num_tokens - 1) // BS * BS - num_computed, True

    def update_state_after_alloc(self, req: Request, block_ids: list[int], n: int) -> None:
        self.tried.add(req.request_id)
        self.allocs.append((req.request_id, block_ids, n))

    def build_connector_meta(self, so) -> KVConnectorMetadata:
        return KVConnectorMetadata()

    def update_connector_output(self, out: KVConnectorOutput) -> None:
        pass

    def request_finished(self, req: Request, block_ids: list[int]):
        return self.hold_sends, None


def _sched(conn: StubConnector) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=64), NUM_BLOCKS, BS,
                     kv_transfer=KVTransferScheduling(conn))


def _all_free(s: Scheduler) -> bool:
    return s.kv.pool.num_free_blocks == NUM_BLOCKS - 1


def _reply(so, kv: KVConnectorOutput | None = None) -> ModelRunnerOutput:
    ids = list(so.num_scheduled_tokens)
    return ModelRunnerOutput(ids, {r: i for i, r in enumerate(ids)}, [[7] for _ in ids],
                             kv_connector_output=kv)


def _req(rid: str, n: int = 14, max_tokens: int = 2) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens))


def test_loaded_blocks_become_the_prefix_and_only_the_rest_is_computed() -> None:
    s = _sched(StubConnector())
    s.add_request(_req("a"))
    so = s.schedule()
    assert so.total_num_scheduled_tokens == 0 and s.requests["a"].status == (
        RequestStatus.WAITING_FOR_REMOTE_KVS)
    s.update_from_output(so, _reply(so, KVConnectorOutput(finished_recving=["a"])))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 2}  # 12 loaded, 2 computed
    outs = s.update_from_output(so, _reply(so))
    assert outs[0].num_cached_tokens == 12
    assert s.stats()["kv_connector_tokens_loaded"] == 12
    so = s.schedule()
    s.update_from_output(so, _reply(so))
    assert not s.has_unfinished_requests() and _all_free(s)


def test_failed_load_recomputes_and_hashes_nothing() -> None:
    s = _sched(StubConnector())
    s.add_request(_req("a"))
    so = s.schedule()
    s.update_from_output(so, _reply(so, KVConnectorOutput(finished_recving=["a"],
                                                          failed_recving=["a"])))
    assert not s.kv.pool.cached
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 14}
    assert s.stats()["kv_connector_loads_failed"] == 1


def test_abort_while_loading_frees_its_blocks() -> None:
    s = _sched(StubConnector())
    s.add_request(_req("a"))
    s.schedule()
    assert not _all_free(s)
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert _all_free(s) and not s.has_unfinished_requests()
    so = s.schedule()
    assert so.finished_req_ids == ["a"]  # the workers drop its pending load
    s.update_from_output(so, _reply(so, KVConnectorOutput(finished_recving=["a"])))
    assert _all_free(s) and not s.kv.pool.cached


def test_blocks_held_until_every_rank_sent_them() -> None:
    s = _sched(StubConnector(hold_sends=True))
    s.add_request(_req("a", max_tokens=1))
    so = s.schedule()
    s.update_from_output(so, _reply(so))
    assert "a" not in s.requests and s.has_unfinished_requests() and not _all_free(s)
    so = s.schedule()
    s.update_from_output(so, _reply(so, KVConnectorOutput(finished_sending=["a"])))
    assert _all_free(s) and not s.has_unfinished_requests()


def test_restart_puts_loading_requests_back_and_frees_held_ones() -> None:
    s = _sched(StubConnector())
    s.add_request(_req("a"))
    s.schedule()
    s.abandon_in_flight(kv_lost=True)
    assert s.requests["a"].status == RequestStatus.WAITING and _all_free(s)
    held = _sched(StubConnector(hold_sends=True))
    held.add_request(_req("b", max_tokens=1))
    so = held.schedule()
    held.update_from_output(so, _reply(so))
    held.abandon_in_flight(kv_lost=True)
    assert _all_free(held) and not held.has_unfinished_requests()
