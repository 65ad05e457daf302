"""fleetllm on a multi-node Ray cluster, simulated on this machine with
ray.cluster_utils.Cluster: a head and two worker nodes, each a raylet of its own with one
CPU (two 0.5-CPU worker bundles) and a custom resource naming it.

Every simulated node shares this machine's IP, so "local" is decided by node id: engines
on the head talk ipc, the others TCP, and the TCP path is exercised here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetllm import LLM
from tests.test_executor_mp import GREEDY, KV, _prompts, assert_same_greedy

ray = pytest.importorskip("ray", reason="the Ray tests need Ray: pip install -e .[ray]")

from ray.cluster_utils import Cluster  # noqa: E402 - needs ray

from fleetllm.executor.ray_placement import group_node  # noqa: E402 - needs ray

NODES = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node0": 1}, "include_dashboard": False})
    for i in range(1, NODES):
        c.add_node(num_cpus=1, resources={f"node{i}": 1})
    ray.init(address=c.address, log_to_driver=True)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def reference(llama_dir: Path, cluster: Cluster) -> list:
    with LLM(str(llama_dir), kv_cache_memory_bytes=KV) as llm:
        return llm.generate(_prompts(), GREEDY, use_tqdm=False)


def _node_names() -> dict[str, str]:
    """node id -> the custom resource naming it (node0 is the head)."""
    return {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node") and
                              not k.startswith("node:"))
            for n in ray.nodes() if n["Alive"]}


def test_data_parallel_engines_spread_one_per_node(llama_dir: Path, cluster: Cluster,
                                                   reference: list) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, data_parallel_size=NODES,
              data_parallel_backend="ray")
    try:
        manager = llm.engine_core.proc_manager
        names = _node_names()
        placed = [names[n] for n in manager.engine_nodes()]
        assert sorted(placed) == [f"node{i}" for i in range(NODES)], placed
        # The two engines off the head node are "remote" (TCP), though every node has the
        # same IP: locality is by node id.
        assert len(manager.remote_engines()) == NODES - 1
        out = llm.generate(_prompts(), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [
            o.outputs[0].token_ids for o in reference]
        assert all(q > 0 for q in [s["prefix_cache_queries"] for s in
                                   llm.engine_core.call_utility("stats")])
    finally:
        llm.shutdown()


def _wait_all_free(timeout: float = 30) -> None:
    """Until the groups of an earlier test are released (Ray frees them asynchronously)."""
    import time

    from ray._private.state import available_resources_per_node

    deadline = time.monotonic() + timeout
    while sum(r.get("CPU", 0) for r in available_resources_per_node().values()) < NODES:
        assert time.monotonic() < deadline, available_resources_per_node()
        time.sleep(0.1)


def test_pack_fills_this_node_first(llama_dir: Path, cluster: Cluster) -> None:
    _wait_all_free()
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, data_parallel_size=NODES,
              data_parallel_backend="ray", ray_placement="pack")
    try:
        names = _node_names()
        placed = sorted(names[n] for n in llm.engine_core.proc_manager.engine_nodes())
        # The head holds two 0.5-CPU engines; the third goes to the next node.
        assert placed.count("node0") == 2 and len(set(placed)) == 2, placed
    finally:
        llm.shutdown()


def test_pipeline_stages_span_nodes_tensor_groups_do_not(llama_dir: Path, cluster: Cluster,
                                                         reference: list) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, distributed_executor_backend="ray",
              tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        ex = llm.engine_core.executor
        stage_nodes = [group_node(pg) for pg in ex._own_pgs]
        assert len(set(stage_nodes)) == 2, stage_nodes  # two stages, two nodes
        # Each tensor-parallel group on one node: ranks 0,1 with stage 0; 2,3 with stage 1.
        nodes = llm.collective_rpc(lambda w: ray.get_runtime_context().get_node_id())
        assert nodes[0] == nodes[1] == stage_nodes[0] and nodes[2] == nodes[3] == stage_nodes[1]
        assert_same_greedy(reference, llm.generate(_prompts(), GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()


def test_serve_on_an_existing_cluster(llama_dir: Path, cluster: Cluster, reference: list,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`RAY_ADDRESS=... fleetllm serve --data-parallel-backend ray` joins the cluster."""
    from ray.util import placement_group_table

    import tests.test_openai_server as server_tests

    monkeypatch.setitem(server_tests.ENV, "RAY_ADDRESS", cluster.address)
    # What this process's Ray session set up (an earlier ray.init may have turned token
    # authentication on) must reach the server too.
    for key, value in os.environ.items():
        if key.startswith("RAY_"):
            monkeypatch.setitem(server_tests.ENV, key, value)
    before = set(placement_group_table())
    with server_tests.serve(llama_dir, tmp_path / "server.log", "--data-parallel-size",
                            str(NODES), "--data-parallel-backend", "ray") as s:
        groups = {k: v for k, v in placement_group_table().items()
                  if k not in before and v["state"] == "CREATED"}
        names = _node_names()
        assert sorted(names[g["bundles_to_node_id"][0]] for g in groups.values()) == [
            f"node{i}" for i in range(NODES)]
        texts = []
        for p in _prompts():
            r = httpx.post(f"{s.url}/v1/completions", headers=server_tests.AUTH, timeout=60,
                           json={"model": server_tests.MODEL, "prompt": p["prompt_token_ids"],
                                 "max_tokens": GREEDY.max_tokens, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert texts == [o.outputs[0].text for o in reference]
