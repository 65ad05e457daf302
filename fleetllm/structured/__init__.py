"""Structured outputs: params.py (StructuredOutputsParams, plain data), grammar.py (the
xgrammar adapter: checks and compiles a spec), manager.py (the engine-core side: compiled
grammars, matchers, the step's token bitmask). Workers only apply the bitmask they are sent
(fleetllm.model.layers.sampler), so they never import xgrammar."""

from fleetllm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
