"""KVConnectorFactory: connector classes by name, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fleetllm.errors import ConfigurationError

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig
    from fleetllm.distributed.kv_transfer.base import KVConnectorBase_V1, KVConnectorRole
    from fleetllm.distributed.kv_transfer.config import KVTransferConfig


class KVConnectorFactory:
    _registry: dict[str, str] = {
        "SharedStorageConnector":
            "fleetllm.distributed.kv_transfer.shared_storage:SharedStorageConnector",
        "P2PZmqConnector": "fleetllm.distributed.kv_transfer.p2p_zmq:P2PZmqConnector",
    }

    @classmethod
    def register_connector(cls, name: str, target: str) -> None:
        """target: "package.module:ClassName"."""
        if name in cls._registry:
            raise ValueError(f"a KV connector named {name!r} is already registered")
        cls._registry[name] = target

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)

    @classmethod
    def get_connector_class(cls, kv_config: KVTransferConfig) -> type[KVConnectorBase_V1]:
        target = cls._registry.get(kv_config.kv_connector)
        if target is None:
            raise ConfigurationError(
                f"kv_connector={kv_config.kv_connector!r} is not known; choose one of "
                f"{', '.join(cls.names())}")
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def create_connector(cls, config: EngineConfig, role: KVConnectorRole,
                         rank: int = 0) -> KVConnectorBase_V1:
        assert config.kv_transfer_config is not None
        return cls.get_connector_class(config.kv_transfer_config)(config, role, rank)
