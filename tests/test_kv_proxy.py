"""fleetllm proxy against stand-in prefill and decode servers (httpx.MockTransport)."""

from __future__ import annotations

import json

import httpx
from fastapi.testclient import TestClient

from fleetllm.entrypoints.disagg_proxy import build_app

PREFILL, DECODE = "http://prefill:1", "http://decode:2"


def _upstream(seen: list[tuple[str, dict]], prefill_down: bool = False):
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((str(request.url), body))
        if request.url.host == "prefill":
            if prefill_down:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, json={"choices": [{"text": "x"}]})
        if body.get("stream"):
            chunks = b"data: {\"choices\": [{\"text\": \"a\"}]}\n\ndata: [DONE]\n\n"
            return httpx.Response(200, content=chunks,
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"choices": [{"text": "abc"}]})

    return httpx.MockTransport(handle)


def test_proxy_prefills_then_streams_the_decode_answer() -> None:
    seen: list[tuple[str, dict]] = []
    app = build_app(PREFILL, DECODE, transport=_upstream(seen))
    with TestClient(app) as client:
        body = {"model": "m", "prompt": "hi", "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}
        r = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        assert r.text.endswith("data: [DONE]\n\n")
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [],
                                                      "max_completion_tokens": 5})
        assert r.json() == {"choices": [{"text": "abc"}]}
    (p_url, p_body), (d_url, d_body) = seen[:2]
    assert p_url == PREFILL + "/v1/completions" and d_url == DECODE + "/v1/completions"
    assert p_body["max_tokens"] == 1 and "stream" not in p_body
    assert "stream_options" not in p_body
    assert p_body["kv_transfer_params"]["do_remote_decode"] is True
    tid = p_body["kv_transfer_params"]["transfer_id"]
    assert d_body["kv_transfer_params"] == {"do_remote_prefill": True, "transfer_id": tid}
    assert d_body["max_tokens"] == 8 and d_body["stream"] is True
    assert seen[2][1]["max_completion_tokens"] == 1
    assert seen[3][1]["kv_transfer_params"]["transfer_id"] != tid  # one id per request


def test_proxy_prefill_down_is_a_clear_503() -> None:
    seen: list[tuple[str, dict]] = []
    app = build_app(PREFILL, DECODE, transport=_upstream(seen, prefill_down=True))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 503
    assert "prefill server at http://prefill:1 is unavailable" in r.json()["error"]["message"]
    assert [url for url, _ in seen] == [PREFILL + "/v1/completions"]  # decode never asked


def test_proxy_sends_what_generates_nothing_to_the_decode_side() -> None:
    """/tokenize and /detokenize (fleetllm bench serve learns the vocabulary through them)
    go to the decode server unchanged, with no prefill."""
    seen: list[tuple[str, dict]] = []
    app = build_app(PREFILL, DECODE, transport=_upstream(seen))
    with TestClient(app) as client:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            r = client.post(path, json=body)
            assert r.status_code == 200
    assert seen == [(DECODE + "/tokenize", {"prompt": "hi"}),
                    (DECODE + "/detokenize", {"tokens": [1]})]
