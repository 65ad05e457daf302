"""scripts/compare_engines.py end to end at a tiny scale, without vLLM (CI has none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_engines.py"


def test_compare_engines_runs_each_engine_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workloads", "builtin", "--engines",
         "fleetllm,vllm,transformers", "--vllm-python", str(tmp_path / "no-such-python"),
         "--scale", "0.2", "--markdown", "--output-json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipping vLLM" in proc.stdout
    results = json.loads(out.read_text())
    assert {r["engine"] for r in results} == {"fleetllm", "transformers"}
    for r in results:
        assert r["workload"] == "builtin" and r["output_len"] == 26
        for key in ("startup_s", "prefill_s", "total_s", "out_tok_s", "decode_ms_per_step",
                    "prefill_ms_per_token"):
            assert r[key] > 0, (key, r)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| builtin")]
    assert len(table) == 1 and table[0].count("x |") == 1  # fleetllm / transformers


def test_unknown_workload_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workloads", "W9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown workload or engine 'W9'" in proc.stderr
