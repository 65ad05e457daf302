"""SharedStorageConnector: prompt KV saved to and loaded from a directory.

Each request's block-aligned prompt KV is stored once, under shared_storage_path, in a
folder named by the hash of its token ids (and its LoRA adapter):
    <key>/rank<r>/layer<i>.safetensors   K and V of rank r's heads, [tokens, heads, dim]
    <key>/rank<r>.json                   the layout and each layer's sha256, written last
A later request, on this engine or another, loads the longest stored prefix of its
tokens. Loads are asynchronous in the scheduler's sense: the request waits one step in
WAITING_FOR_REMOTE_KVS while every rank loads its share, so an entry that turns out
missing, corrupt or from another model (or dtype, or layout) on any rank is recomputed,
with a warning, before anything reads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import torch
from safetensors.torch import load_file, save_file

from fleetllm.distributed.kv_transfer.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    aligned_prompt_tokens,
    lora_tag,
    token_hash,
)
from fleetllm.distributed.kv_transfer.blocks import (
    gather_tokens,
    nbytes,
    scatter_tokens,
    token_slots,
)
from fleetllm.distributed.kv_transfer.identity import KVLayout, model_fingerprint
from fleetllm.distributed.kv_transfer.messages import KVConnectorMetadata, KVTransferRequest
from fleetllm.distributed.kv_transfer.tracker import RequestTracker
from fleetllm.errors import ConfigurationError

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig
    from fleetllm.distributed.kv_transfer.config import KVTransferConfig
    from fleetllm.sched.output import SchedulerOutput
    from fleetllm.sched.request import Request

logger = logging.getLogger(__name__)


class EntryManifest(msgspec.Struct):
    layout: KVLayout
    num_tokens: int
    sha256: dict[str, str]  # layer file name -> digest of its K and V bytes


def _digest(k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (k, v):
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class SharedStorageConnector(KVConnectorBase_V1):
    def __init__(self, config: EngineConfig, role: KVConnectorRole, rank: int = 0) -> None:
        super().__init__(config, role, rank)
        self.root = Path(self.kv_config.get_from_extra_config("shared_storage_path", ""))
        self.world_size = config.parallel_config.world_size
        self.fingerprint = model_fingerprint(config)
        # scheduler side
        self.tracker = RequestTracker()
        self._matched: dict[str, tuple[str, int, int]] = {}  # req -> (key, start, tokens)
        self._tried: set[str] = set()  # loaded once (or failed): never again
        self._loads: list[KVTransferRequest] = []
        # worker side
        self._saves: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._recving: set[str] = set()

    @classmethod
    def validate_config(cls, kv_config: KVTransferConfig) -> None:
        path = kv_config.get_from_extra_config("shared_storage_path", None)
        if not path or not isinstance(path, str):
            raise ConfigurationError(
                "SharedStorageConnector needs kv_connector_extra_config.shared_storage_path, "
                'a directory, e.g. {"shared_storage_path": "/tmp/fleetllm_kv"}')
        if Path(path).exists() and not Path(path).is_dir():
            raise ConfigurationError(f"shared_storage_path={path!r} exists and is not a "
                                     "directory; give a directory")

    def _dir(self, key: str) -> Path:
        return self.root / key

    # ---- scheduler side -----------------------------------------------------------------
    def _usable(self, key: str) -> bool:
        """Every rank's share is there and comes from this model and dtype."""
        entry = self._dir(key)
        if not (entry / "rank0.json").is_file():
            return False
        for r in range(self.world_size):
            try:
                m = msgspec.json.decode((entry / f"rank{r}.json").read_bytes(),
                                        type=EntryManifest)
            except (OSError, msgspec.DecodeError) as e:
                logger.warning("stored KV %s rank %d is unreadable (%s); recomputing", key, r, e)
                return False
            mc = self.config.model_config
            if (m.layout.model, m.layout.dtype, m.layout.block_size, m.layout.tp_size) != (
                    self.fingerprint, mc.dtype, self.block_size, self.tp_size):
                logger.warning("stored KV %s was made by another model, dtype, block size or "
                               "tensor-parallel size (%s); recomputing", key, m.layout)
                return False
        return True

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.kv_config.is_kv_consumer or request.request_id in self._tried:
            return 0, False
        tokens = request.all_token_ids[:request.num_prompt_tokens]
        tag = lora_tag(request)
        end = aligned_prompt_tokens(len(tokens), self.block_size)
        for n in range(end, num_computed_tokens, -self.block_size):
            key = token_hash(tokens[:n], tag)
            if self._usable(key):
                self._matched[request.request_id] = (key, num_computed_tokens, n)
                return n - num_computed_tokens, True
        return 0, False

    def update_state_after_alloc(self, request: Request, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        match = self._matched.pop(request.request_id, None)
        if match is None or num_external_tokens == 0:
            return
        self._tried.add(request.request_id)
        key, start, _ = match
        self._loads.append(KVTransferRequest(request.request_id, list(block_ids), start,
                                             num_external_tokens, key))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVConnectorMetadata(load=self._loads)
        self._loads = []
        if not self.kv_config.is_kv_producer:
            self.tracker.update(scheduler_output)
            return meta
        for t in self.tracker.update(scheduler_output):
            n = aligned_prompt_tokens(len(t.prompt_token_ids), self.block_size)
            if t.saved or n == 0 or t.num_computed_tokens < n:
                continue
            t.saved = True
            key = token_hash(t.prompt_token_ids[:n], t.lora_tag)
            if not (self._dir(key) / f"rank{self.world_size - 1}.json").is_file():
                meta.save.append(KVTransferRequest(t.req_id, t.block_ids[:n // self.block_size],
                                                   0, n, key))
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, None]:
        self.tracker.pop(request.request_id)
        self._matched.pop(request.request_id, None)
        self._tried.discard(request.request_id)
        return False, None

    # ---- worker side --------------------------------------------------------------------
    def start_load_kv(self) -> None:
        self._saves = {}  # what a failed step gathered
        for item in self.get_connector_metadata().load:
            self._recving.add(item.req_id)
            try:
                self._load(item)
            except Exception as e:  # noqa: BLE001 - any failure means recompute
                logger.warning("cannot load stored KV %s for request %s on rank %d (%s: %s); "
                               "it will be recomputed", item.key, item.req_id, self.rank,
                               type(e).__name__, e)
                self.failed_recving.add(item.req_id)

    def _load(self, item: KVTransferRequest) -> None:
        entry = self._dir(item.key)
        m = msgspec.json.decode((entry / f"rank{self.rank}.json").read_bytes(),
                                type=EntryManifest)
        if m.layout != self.layout():
            raise ValueError(f"its layout {m.layout} is not this rank's {self.layout()}")
        if m.num_tokens < item.start + item.num_tokens:
            raise ValueError(f"it holds {m.num_tokens} tokens, not "
                             f"{item.start + item.num_tokens}")
        loaded = {}
        for layer in self.kv_caches:
            name = f"layer{layer}.safetensors"
            tensors = load_file(str(entry / f"rank{self.rank}" / name))
            k, v = tensors["k"], tensors["v"]
            if _digest(k, v) != m.sha256.get(name):
                raise ValueError(f"{name} does not match its checksum (corrupt)")
            loaded[layer] = (k, v)
        k0, _ = next(iter(self.kv_caches.values()))
        slots = token_slots(item.block_ids, item.start, item.num_tokens, self.block_size,
                            k0.device)
        rows = slice(item.start, item.start + item.num_tokens)
        for layer, (k, v) in loaded.items():
            k_cache, v_cache = self.kv_caches[layer]
            scatter_tokens(k_cache, slots, k[rows])
            scatter_tokens(v_cache, slots, v[rows])
            self.counters.bytes_loaded += nbytes(k[rows]) + nbytes(v[rows])
        self.counters.blocks_loaded += -(-item.num_tokens // self.block_size)

    def save_kv_layer(self, layer: int, kv_layer: tuple[torch.Tensor, torch.Tensor]) -> None:
        meta = self._metadata
        if meta is None or not meta.save:
            return
        k_cache, v_cache = kv_layer
        for item in meta.save:
            slots = token_slots(item.block_ids, item.start, item.num_tokens, self.block_size,
                                k_cache.device)
            self._saves.setdefault(item.req_id, {})[layer] = (gather_tokens(k_cache, slots),
                                                              gather_tokens(v_cache, slots))

    def wait_for_save(self) -> None:
        meta = self._metadata
        saves, self._saves = self._saves, {}
        for item in meta.save if meta is not None else []:
            layers = saves.get(item.req_id)
            if layers is None or set(layers) != set(self.kv_caches):
                continue  # this rank's attention never ran this step (a failed step)
            try:
                self._write(item, layers)
            except OSError as e:
                logger.warning("cannot store KV of request %s under %s: %s", item.req_id,
                               self.root, e)

    def _write(self, item: KVTransferRequest,
               layers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        entry = self._dir(item.key)
        final = entry / f"rank{self.rank}"
        if (entry / f"rank{self.rank}.json").is_file():
            return
        tmp = entry / f".rank{self.rank}.{os.getpid()}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            digests = {}
            for layer, (k, v) in layers.items():
                name = f"layer{layer}.safetensors"
                save_file({"k": k.contiguous(), "v": v.contiguous()}, str(tmp / name))
                digests[name] = _digest(k, v)
                self.counters.bytes_saved += nbytes(k) + nbytes(v)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = EntryManifest(self.layout(), item.num_tokens, digests)
        part = entry / f".rank{self.rank}.json.{os.getpid()}.tmp"
        part.write_bytes(msgspec.json.encode(manifest))
        os.replace(part, entry / f"rank{self.rank}.json")
        self.counters.blocks_saved += len(item.block_ids)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, set[str] | None]:
        done, self._recving = self._recving, set()
        return None, done or None


__all__ = ["SharedStorageConnector"]
