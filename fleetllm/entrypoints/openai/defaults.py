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
# --shutdown-timeout: Kubernetes gives a pod 30 s between SIGTERM and SIGKILL by default;
# 20 s of draining leaves time to end the remaining requests and stop the engines.
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
