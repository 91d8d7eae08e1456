"""bench.bench_floor at its smallest: the bare-aiohttp floor server runs real jobs against the
simulator through the same client as comfyq, and both servers' CPU per job is reported. No
figure is judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_floor_and_comfyq_both_run_every_job(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    p = subprocess.run(
        [sys.executable, "-m", "bench.bench_floor", "--jobs", "40", "--rounds", "1"]
        + ["--in-flight", "4", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    f = json.loads(out.read_text())
    assert f["jobs_per_server"] == 40 and f["in_flight"] == 4
    for name in ("floor", "comfyq"):
        assert f[f"{name}_cpu_ms_per_job"] > 0
        assert f[f"{name}_jobs_per_s"] > 0
    assert f["cpu_ratio"] == f["comfyq_cpu_ms_per_job"] / f["floor_cpu_ms_per_job"]
    assert "floor (bare aiohttp, same exchanges)" in p.stdout
