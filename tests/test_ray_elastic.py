"""Elastic data parallel on a Ray cluster (ray.cluster_utils.Cluster, nodes of 1 CPU, each
engine's group 0.5 CPU): a scale that cannot be placed fails within its timeout and leaves
the fleet serving, a node added after start takes the next engine, and losing a node with an
engine fails no request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetllm import LLM, SamplingParams
from fleetllm.errors import EngineRestartingError, ScaleError
from tests.helpers import generate_ids, kill_mid_generate, random_prompts

ray = pytest.importorskip("ray", reason="the Ray tests need Ray: pip install -e .[ray]")

from ray.cluster_utils import Cluster  # noqa: E402 - needs ray

KV = 1 << 24
PROMPTS = random_prompts(tuple(5 + 2 * i for i in range(12)), seed=11)
PARAMS = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # outlasts a node


def _scale(llm: LLM, size: int, timeout: float = 60) -> None:
    """As a user would: while an engine restarts, a scale is refused; try again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return llm.scale_data_parallel(size)
        except EngineRestartingError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node0": 1}, "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"node1": 1})
    ray.init(address=c.address, log_to_driver=True)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _names() -> dict[str, str]:
    return {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node") and
                              not k.startswith("node:"))
            for n in ray.nodes() if n["Alive"]}


def test_scale_on_a_cluster_that_grows_and_loses_a_node(llama_dir: Path,
                                                        cluster: Cluster) -> None:
    with LLM(str(llama_dir), kv_cache_memory_bytes=KV) as ref:
        expected = generate_ids(ref, PROMPTS, PARAMS)
        expected_long = generate_ids(ref, PROMPTS, LONG)
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, data_parallel_size=2,
              data_parallel_backend="ray")
    try:
        manager = llm.engine_core.proc_manager
        assert sorted(_names()[n] for n in manager.engine_nodes()) == ["node0", "node1"]

        # 3 more engines need 1.5 CPUs; 1 is free: a clear failure within the timeout,
        # and the fleet serves as before
        start = time.monotonic()
        with pytest.raises(ScaleError, match="could not place"):
            llm.scale_data_parallel(5, startup_timeout=5)
        assert time.monotonic() - start < 30
        assert llm.data_parallel_size == 2
        assert generate_ids(llm, PROMPTS, PARAMS) == expected

        # a node that joins after start takes the next engine (it has the most room)
        cluster.add_node(num_cpus=1, resources={"node2": 1})
        cluster.wait_for_nodes()
        llm.scale_data_parallel(3)
        assert _names()[manager.engine_nodes()[2]] == "node2"
        assert generate_ids(llm, PROMPTS, PARAMS) == expected
        assert all(s["prefix_cache_queries"] > 0
                   for s in llm.engine_core.call_utility("stats"))

        # node1 goes away mid-generation: its engine's requests move, none fails
        node1 = next(n for n in cluster.worker_nodes if _names().get(n.node_id) == "node1")
        kill_mid_generate(llm, lambda: cluster.remove_node(node1))  # all under way
        assert generate_ids(llm, PROMPTS, LONG) == expected_long
        assert llm.engine_core.num_requests_recovered > 0  # it was lost mid-generation
        _scale(llm, 2)
        assert generate_ids(llm, PROMPTS, PARAMS) == expected
    finally:
        llm.shutdown()
