"""The server's documented limits (a light module: the command line's help imports it)."""

from __future__ import annotations

# --max-request-body-bytes: a 10 MB prompt fits, a 20 MB one does not. At about 4 bytes per
# token that is some 4M tokens, 30 times a 128K context, so no prompt a model can take is
# refused for its size; and it bounds what one request can make the server parse and hold (a
# body of token ids becomes about 6x its size in Python objects).
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
# --max-n: OpenAI's own cap on n. Each copy is a sequence in the engine, so an unbounded n
# lets one request take the server (vLLM's CVE-2026-34756).
DEFAULT_MAX_N = 128
# --max-prompts-per-request: each prompt of a /v1/completions list is its own engine request;
# the body cap alone lets one request carry millions ("[[1],[1],...]" is 4 bytes a prompt).
# 1024 is 4x the default --max-num-seqs: a full batch and its queue, but no request that
# queues 100,000 sequences ahead of everyone. It also caps n x prompts (with --max-n for n).
DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024
# --tool-call-parser: the built-in tool parsers' names (tool_parsers registers them).
TOOL_CALL_PARSERS = ("hermes",)
# --shutdown-timeout: Kubernetes gives a pod 30 s between SIGTERM and SIGKILL by default;
# 20 s of draining leaves time to end the remaining requests and stop the engines.
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
