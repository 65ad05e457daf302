"""Where Ray places fleetllm's groups: topology-aware placement groups on a cluster.

A group (the ranks of one tensor-parallel group, or one data-parallel engine and its
workers) is one STRICT_PACK placement group, so it never spans nodes. Groups are spread
over the nodes ("spread", the default: each gets the node with the most room left as its
soft target) or packed onto as few as possible, this process's node first ("pack"). Soft
targets let Ray place a group elsewhere when its node is full or gone (node loss).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from fleetllm.errors import ConfigurationError

RAY_PLACEMENTS = ("spread", "pack")


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def targets(count: int, bundles: list[dict[str, float]], placement: str) -> list[str | None]:
    """A node id for each of `count` groups of `bundles` among the alive nodes whose free
    resources hold one: "spread" takes the node with the most room left each time (an even
    spread), "pack" fills this process's node first, then the others in order. None when
    no node has room (Ray then decides)."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    free = _free_per_node()
    nodes = [n["NodeID"] for n in alive_nodes()]
    here = ray.get_runtime_context().get_node_id()
    nodes.sort(key=lambda node: node != here)  # stable: this node first
    room = {node: dict(free.get(node, {})) for node in nodes}
    targets: list[str | None] = []
    for _ in range(count):
        fits = [node for node in nodes
                if all(room[node].get(k, 0.0) >= v - 1e-9 for k, v in need.items())]
        if not fits:
            targets.append(None)
            continue
        if placement == "pack":
            node = fits[0]
        else:  # the node that still has the most of the scarcest resource
            node = max(fits, key=lambda nd: min((room[nd].get(k, 0.0) / v
                                                 for k, v in need.items() if v > 0),
                                                default=0.0))
        for k, v in need.items():
            room[node][k] = room[node].get(k, 0.0) - v
        targets.append(node)
    return targets


def _free_per_node() -> dict[str, dict[str, float]]:
    """Free resources by node id. Ray offers this only from its private state module; on a
    Ray without it, every node counts as free and Ray's own placement decides."""
    try:
        from ray._private.state import available_resources_per_node
    except ImportError:
        return {n["NodeID"]: dict(n.get("Resources", {})) for n in alive_nodes()}
    return available_resources_per_node()


def create_groups(count: int, bundles: list[dict[str, float]], placement: str, name: str,
                  timeout_s: float, what: str) -> list[PlacementGroup]:
    """`count` STRICT_PACK groups of `bundles`, ready; a clear error if Ray cannot place
    them within timeout_s (and nothing is left reserved)."""
    if placement not in RAY_PLACEMENTS:
        raise ConfigurationError(f"ray_placement={placement!r}; choose one of "
                                 f"{', '.join(RAY_PLACEMENTS)}")
    groups = [placement_group([dict(b) for b in bundles], strategy="STRICT_PACK",
                              name=f"{name}{i}", _soft_target_node_id=target)
              for i, target in enumerate(targets(count, bundles, placement))]
    try:
        ray.get([pg.ready() for pg in groups], timeout=timeout_s)
    except GetTimeoutError:
        for pg in groups:
            remove_placement_group(pg)
        total = {k: v * len(bundles) for k, v in bundles[0].items()}
        raise ConfigurationError(
            f"Ray could not place {count} {what}, each needing {total} on one node, within "
            f"{timeout_s:.0f} s; the cluster has {ray.available_resources()} available") from None
    return groups


def group_node(pg: PlacementGroup, bundle: int = 0) -> str | None:
    """The id of the node that holds a bundle of a ready placement group."""
    from ray.util.placement_group import placement_group_table

    return placement_group_table(pg).get("bundles_to_node_id", {}).get(bundle)
