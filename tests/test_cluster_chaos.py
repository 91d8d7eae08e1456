"""The multi-instance chaos run as a test (real processes; about two minutes): 3 instances on a
PostgreSQL cluster of their own, 2 simulators, 300 jobs with webhooks, 10 rounds of kill -9 with
restarts and the database stopped and started mid-run. bench/chaos_cluster.py does the work and
the accounting; this test holds it to "nothing lost"."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is a folder, not a package

from bench.chaos_cluster import main as chaos


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_rounds_and_a_database_restart_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    code = chaos(["--jobs", "300", "--kills", "10", "--seed", "7", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert code in (0, 1), "the run could not be carried out"
    assert figures["accepted"] == 300
    assert figures["states"] == {"completed": 300}
    # Every count to zero, streams that missed their final result too.
    assert all(n == 0 for n in figures["problem_counts"].values()), figures["problems"]
    assert len(figures["kills"]) == 10
    # Streams held on surviving instances saw the ends of jobs admitted through killed ones.
    assert figures["finals_of_jobs_admitted_by_a_killed_instance"] > 0
    if figures["own_postgres"]:
        assert figures["database_restarted"]
    assert set(figures["graceful_exit_codes"].values()) == {0}
