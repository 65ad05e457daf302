"""`fleetllm bench serve` against a real `fleetllm serve`, and its figures on synthetic timings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetllm.entrypoints.bench_serve import RequestResult, compute_metrics, format_report
from tests.test_openai_server import API_KEY, ENV, Server, _free_port, serve

REPORT_LINES = ("Successful requests:", "Failed requests:", "Benchmark duration (s):",
                "Total input tokens:", "Total generated tokens:", "Request throughput (req/s):",
                "Output token throughput (tok/s):", "Total token throughput (tok/s):",
                "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):", "Mean TPOT (ms):",
                "Median TPOT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):", "Median ITL (ms):",
                "P99 ITL (ms):")


@pytest.fixture(scope="module")
def server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(llama_dir, tmp_path_factory.mktemp("server") / "server.log") as s:
        yield s


def bench(url: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fleetllm.entrypoints.cli", "bench", "serve", "--base-url", url,
           "--num-prompts", "8", "--input-len", "16", "--output-len", "8", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)


def _row(stdout: str, label: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith(label))
    return float(line[len(label):])


def test_bench_serve(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = bench(server.url, "--api-key", API_KEY, "--max-concurrency", "4",
              "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert (m["completed"], m["failed"]) == (8, 0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (8 * 16, 8 * 8)
    assert m["model"] == "tiny" and m["request_rate"] == "inf" and m["max_concurrency"] == 4
    for name in ("ttft", "tpot", "itl"):
        assert 0 < m[f"median_{name}_ms"] <= m[f"p99_{name}_ms"], name
        assert m[f"mean_{name}_ms"] > 0
    assert m["output_throughput"] > 0
    for label in REPORT_LINES:
        assert label in r.stdout, label
    assert _row(r.stdout, "Successful requests:") == 8
    assert _row(r.stdout, "Total generated tokens:") == 64


def test_poisson_arrivals(server: Server) -> None:
    r = bench(server.url, "--api-key", API_KEY, "--request-rate", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert _row(r.stdout, "Successful requests:") == 8


def test_failed_requests_exit_nonzero_with_the_reason(server: Server) -> None:
    r = bench(server.url, "--api-key", API_KEY, "--model", "no-such-model")
    assert r.returncode != 0
    assert "8 of 8 requests failed" in r.stderr and "HTTP 404" in r.stderr
    assert "does not exist" in r.stderr
    assert _row(r.stdout, "Failed requests:") == 8


def test_wrong_api_key(server: Server) -> None:
    r = bench(server.url, "--api-key", "wrong-key")
    assert r.returncode != 0
    assert "HTTP 401" in r.stderr and "API key" in r.stderr


def test_unreachable_server() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    r = bench(url)
    assert r.returncode != 0
    assert f"cannot reach the server at {url}" in r.stderr


def test_compute_metrics_on_synthetic_timings() -> None:
    fast = RequestResult(10, True, 5, ttft=0.1, latency=0.5, itl=[0.1] * 4)
    slow = RequestResult(10, True, 3, ttft=0.3, latency=1.1, itl=[0.4, 0.4])
    failed = RequestResult(10, error="HTTP 500: boom")
    m = compute_metrics([fast, slow, failed], duration=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (20, 8)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 4.0
    assert m["total_token_throughput"] == 14.0
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(298)  # linear interpolation between 100 and 300
    assert m["mean_tpot_ms"] == pytest.approx(250)  # (400 / 4 + 800 / 2) / 2
    assert m["median_itl_ms"] == pytest.approx(100) and m["p99_itl_ms"] == pytest.approx(400)
    assert m["mean_itl_ms"] == pytest.approx(1200 / 6)
    report = format_report(m)
    assert all(label in report for label in REPORT_LINES)
    assert "Failed requests:                         1" in report


def test_compute_metrics_with_no_successes() -> None:
    m = compute_metrics([RequestResult(4, error="x")], duration=1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_bench_against_a_server_without_tokenizer(llama_dir: Path, tmp_path: Path) -> None:
    """The README's serving figure uses a config-only model: `serve --skip-tokenizer-init`."""
    with serve(llama_dir, tmp_path / "server.log", "--skip-tokenizer-init") as s:
        r = bench(s.url, "--api-key", API_KEY)
        assert r.returncode == 0, r.stderr
        assert _row(r.stdout, "Successful requests:") == 8
        assert _row(r.stdout, "Total generated tokens:") == 64
