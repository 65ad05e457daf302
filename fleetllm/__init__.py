"""fleetllm: one engine, from one process to a cluster."""

from fleetllm.engine.output import CompletionOutput, Logprob, RequestOutput
from fleetllm.entrypoints.llm import LLM
from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams
from fleetllm.structured.params import StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "LoRARequest"]
__version__ = "0.1.0"
