"""The OpenAI-compatible HTTP server: `fleetllm serve`."""
