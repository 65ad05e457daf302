"""KVTransferConfig: which KV connector an engine runs, with vLLM's field names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fleetllm.errors import ConfigurationError

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
_FIELDS = ("kv_connector", "kv_role", "kv_connector_extra_config", "engine_id")
_EXAMPLE = ('\'{"kv_connector": "SharedStorageConnector", "kv_role": "kv_both", '
            '"kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}\'')


@dataclass(frozen=True)
class KVTransferConfig:
    """kv_producer saves (or sends) prompt KV, kv_consumer loads (or receives) it, kv_both
    does both. kv_connector_extra_config holds the connector's own settings."""

    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    engine_id: str | None = None

    @property
    def is_kv_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_kv_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def get_from_extra_config(self, key: str, default: Any) -> Any:
        return self.kv_connector_extra_config.get(key, default)

    @staticmethod
    def from_user(value: KVTransferConfig | dict[str, Any] | str | None
                  ) -> KVTransferConfig | None:
        """From LLM(kv_transfer_config={...}) or --kv-transfer-config JSON; None: off."""
        if value is None or isinstance(value, KVTransferConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigurationError(
                    f"kv_transfer_config is not valid JSON ({e}); give e.g. {_EXAMPLE}") from e
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"kv_transfer_config={value!r} must be a dict (JSON object), e.g. {_EXAMPLE}")
        if unknown := sorted(set(value) - set(_FIELDS)):
            raise ConfigurationError(f"kv_transfer_config has unknown keys {unknown}; known: "
                                     f"{list(_FIELDS)}")
        if "kv_connector" not in value:
            raise ConfigurationError(f"kv_transfer_config needs kv_connector, e.g. {_EXAMPLE}")
        cfg = KVTransferConfig(**value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from fleetllm.distributed.kv_transfer.factory import KVConnectorFactory

        if self.kv_connector not in KVConnectorFactory.names():
            raise ConfigurationError(
                f"kv_transfer_config kv_connector={self.kv_connector!r} is not known; choose "
                f"one of {', '.join(KVConnectorFactory.names())}")
        if self.kv_role not in KV_ROLES:
            raise ConfigurationError(f"kv_transfer_config kv_role={self.kv_role!r}; choose "
                                     f"one of {', '.join(KV_ROLES)}")
        if not isinstance(self.kv_connector_extra_config, dict):
            raise ConfigurationError("kv_transfer_config kv_connector_extra_config must be a "
                                     f"dict, got {self.kv_connector_extra_config!r}")
        KVConnectorFactory.get_connector_class(self).validate_config(self)
