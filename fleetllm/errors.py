"""fleetllm's error table (the executor notes' E001-E005) plus EngineDeadError.

Every error carries its code in the message so logs and users can look it up.
"""

from __future__ import annotations


class FleetLLMError(RuntimeError):
    """Base class of the coded errors."""

    code: str = "E000"

    def __init__(self, message: str) -> None:
        super().__init__(f"[{self.code}] {message}")


class OutOfMemoryError(FleetLLMError):
    code = "E001"


class WorkerCrashedError(FleetLLMError):
    code = "E002"


class CommunicationTimeoutError(FleetLLMError, TimeoutError):
    code = "E003"


class ModelLoadError(FleetLLMError):
    code = "E004"


class ConfigurationError(FleetLLMError, ValueError):
    code = "E005"


class LoRAAdapterError(ModelLoadError, ValueError):
    """A LoRA adapter that cannot be served: the message names the file, tensor or field.
    The engine goes on; only the add_lora call (or the request) that needed it fails."""


class EngineRestartingError(RuntimeError):
    """A utility call (collective_rpc, stats, ...) could not complete because an engine core
    died; the engine is being restarted. Requests are re-sent; utility calls are not."""


class ScaleError(RuntimeError):
    """A scale of the data-parallel fleet failed; the fleet is as it was before."""


class ScaleInProgressError(RuntimeError):
    """Another scale of the fleet is under way (HTTP 409)."""


class EngineDeadError(RuntimeError):
    """The engine hit an unrecoverable error; create a new LLM to continue."""
