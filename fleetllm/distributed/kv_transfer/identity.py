"""What KV from elsewhere must agree on to be used here: the model, its dtype and layout."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig


class KVLayout(msgspec.Struct, array_like=True, frozen=True):
    """One rank's share of a prefix's KV: a mismatch in any field means recompute."""

    model: str  # model_fingerprint
    dtype: str
    block_size: int
    tp_size: int
    num_kv_heads: int  # this rank's
    head_dim: int
    layers: list[int]


def model_fingerprint(config: EngineConfig) -> str:
    """The weights the KV came from. kv_connector_extra_config "model_id" names them
    explicitly (the same model at different paths); otherwise the checkpoint's config.json,
    its weight files' names and sizes, the load format and the seed (dummy weights)."""
    kv = config.kv_transfer_config
    explicit = kv.get_from_extra_config("model_id", None) if kv is not None else None
    if explicit:
        return f"id:{explicit}"
    mc = config.model_config
    h = hashlib.sha256()
    path = Path(mc.model)
    cfg = path / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else mc.model.encode())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(f"{config.load_config.load_format}:{mc.seed}:{os.path.basename(mc.model)}".encode())
    return h.hexdigest()[:32]


def local_layout(config: EngineConfig, num_kv_heads: int, layers: list[int]) -> KVLayout:
    mc = config.model_config
    return KVLayout(model_fingerprint(config), mc.dtype, config.cache_config.block_size,
                    config.parallel_config.tensor_parallel_size, num_kv_heads, mc.head_dim,
                    sorted(layers))
