"""The comfyq command on a real database file, run as a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from comfyq.store import NewJob, open_store
from comfyq.store.model import Stage, State


def cq(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COMFYQ_DATABASE": str(tmp_path / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(tmp_path / "out"),
        "COMFYQ_CONFIG": str(tmp_path / "absent.toml"),
    }
    return subprocess.run(
        [sys.executable, "-m", "comfyq", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


async def _seed(db: Path) -> None:
    s = open_store(db)
    await s.open()
    try:
        for i in range(3):
            await s.create(NewJob(id=f"job{i}", payload={"input": {}}, payload_hash=str(i)), 10)
        await s.claim(Stage.PREPROCESS, 1, 30, "Preprocessing")  # job0 running
        await s.finish(
            "job0",
            State.FAILED,
            "Generation failed: boom",
            error={"type": "node_error", "message": "boom", "node_id": "5"},
        )
        await s.claim(Stage.PREPROCESS, 1, 30, "Preprocessing")  # job1 running
    finally:
        await s.close()


def test_migrate_ls_show_cancel_retry_prune(tmp_path: Path) -> None:
    p = cq(tmp_path, "migrate")
    assert p.returncode == 0 and "applied [1" in p.stdout
    assert "up to date" in cq(tmp_path, "migrate").stdout
    asyncio.run(_seed(tmp_path / "q.db"))

    out = cq(tmp_path, "jobs", "ls").stdout
    assert "job0" in out and "failed" in out and "node_error" in out and "queued" in out

    show = cq(tmp_path, "jobs", "show", "job0")
    assert show.returncode == 0
    assert (
        "pending -> running" in show.stdout
        and "running -> failed" in show.stdout
        and "boom" in show.stdout
    )

    assert "cancelled" in cq(tmp_path, "jobs", "cancel", "job2").stdout
    assert "cancel requested" in cq(tmp_path, "jobs", "cancel", "job1").stdout
    assert "already failed" in cq(tmp_path, "jobs", "cancel", "job0").stdout
    missing = cq(tmp_path, "jobs", "cancel", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr

    assert "queued again" in cq(tmp_path, "jobs", "retry", "job0").stdout
    assert "queued" in cq(tmp_path, "jobs", "ls", "--status", "queued").stdout
    bad = cq(tmp_path, "jobs", "retry", "job1")
    assert bad.returncode == 1 and "only failed or cancelled" in bad.stderr

    assert "pruned 0" in cq(tmp_path, "prune", "--older-than", "1h").stdout
    (tmp_path / "out" / "job2").mkdir(parents=True)
    assert "pruned 1" in cq(tmp_path, "prune", "--older-than", "0").stdout  # job2 (cancelled)
    assert not (tmp_path / "out" / "job2").exists()
    assert cq(tmp_path, "prune", "--older-than", "soon").returncode == 2
