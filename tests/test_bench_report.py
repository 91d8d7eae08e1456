"""``python -m bench`` at its smallest: one real benchmark step in a subprocess, its JSON, the
Markdown report and charts, and a re-render from the stored JSON; plus the report's account of a
chaos run and of a step that could not run. No figure is judged here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(ROOT)
)  # bench/ is a folder of the checkout, not part of the installed package

from bench import report

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_one_step_run_writes_json_report_and_rerenders(tmp_path: Path) -> None:
    out, res, charts = tmp_path / "B.md", tmp_path / "r.json", tmp_path / "charts"
    p = bench(
        "--quick",
        "--only",
        "store",
        "--out",
        str(out),
        "--results",
        str(res),
        "--charts",
        str(charts),
        "--tmp",
        str(tmp_path / "data"),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads(res.read_text())
    assert results["mode"] == "quick"
    store = results["steps"]["store"]
    assert store["status"] == "ok", store
    f = store["figures"]
    for series in ("claim_transitions", "create_claim_transitions", "stage_runner"):
        assert set(f["throughput"][series]) == {"1", "4", "16"}
        assert all(rate > 0 for rate in f["throughput"][series].values())
    assert set(f["claim_latency"]) == {"10000", "50000"}
    assert len(f["claim_latency"]["50000"]["samples_ms"]) == f["args"]["samples"]
    assert "claim latency with" in store["output"]  # the benchmark's own printing is kept
    others = {name: s["status"] for name, s in results["steps"].items() if name != "store"}
    assert set(others.values()) == {"skipped"} and "chaos" in others and "sidebyside" in others

    md = out.read_text()
    assert "--quick" in md.split("## Targets")[0]
    assert "## Store alone (#2)" in md and "| ≥ 2,000 complete jobs/s with 16 workers |" in md
    assert f"{f['throughput']['claim_transitions']['16']:,.0f} jobs/s" in md
    assert "*Not run: not selected (--only).*" in md
    for name in ("store_throughput", "store_claim"):
        png = charts / f"{name}.png"
        assert png.exists() == HAVE_MATPLOTLIB
        if HAVE_MATPLOTLIB:
            assert png.read_bytes().startswith(b"\x89PNG")
            assert f"]({os.path.relpath(png, tmp_path)})" in md

    again = tmp_path / "B2.md"
    p = bench("--render-only", str(res), "--out", str(again), "--charts", str(charts))
    assert p.returncode == 0, p.stdout + p.stderr
    assert again.read_text() == md


def _results(chaos: dict[str, Any]) -> dict[str, Any]:
    steps = {
        name: {"status": "skipped", "reason": "not selected (--only)"}
        for name in ("store", "e2e", "api", "preprocess", "outputs", "sidebyside")
    }
    return {
        "mode": "full",
        "command": "python -m bench",
        "started": "2026-01-02T03:04:05+00:00",
        "duration_s": 60.0,
        "machine": {},
        "steps": {**steps, "chaos": chaos},
    }


def test_chaos_figures_and_a_missing_chaos_module_are_reported() -> None:
    figures = {
        "accepted": 200,
        "completed": 197,
        "failed": 3,
        "failed_reasons": {"node_error": 3},
        "lost": 0,
        "webhooks_owed": 200,
        "webhooks_delivered": 199,
        "webhooks_duplicate": 2,
        "webhooks_lost": 1,
        "prompts_submitted": 231,
        "attempts_total": 231,
        "jobs_prompts_gt_attempts": 0,
        "comfyq_kills": 20,
        "simulator_crashes": 5,
        "duration_s": 141.0,
    }
    md = report.build(
        _results(
            {
                "status": "ok",
                "figures": figures,
                "command": "python -m bench.chaos",
                "output": "RESULT: LOST SOMETHING\n",
                "exit_code": 1,
                "reason": "exit code 1",
            }
        ),
        {},
        "r.json",
    )
    assert "| #7 chaos | jobs lost: must be 0 | 0 | met |" in md
    assert (
        "| #7 chaos | webhooks owed vs delivered: no loss | 199 of 200, 1 lost | **MISSED** |" in md
    )
    assert "Failed, by reason: node_error: 3." in md
    assert "RESULT: LOST SOMETHING" in md.split("## Chaos run (#7)")[1]

    md = report.build(
        _results({"status": "skipped", "reason": "bench/chaos.py does not exist in this checkout"}),
        {},
        "r.json",
    )
    assert "*Not run: bench/chaos.py does not exist in this checkout.*" in md
    assert "| #7 chaos | every target of this step | – | not measured (skipped:" in md
