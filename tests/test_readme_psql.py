"""The README's psql recipes for operators, run against a PostgreSQL database of real jobs, so the
docs cannot rot: each statement through psycopg, and through the psql binary when installed."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import psycopg
from support.servers import MakeServer, wait_healthy
from support.workflows import workflow

from comfyq.store.model import State

README = Path(__file__).resolve().parents[1] / "README.md"


def recipes() -> list[str]:
    """The SQL of every ``psql "$COMFYQ_DATABASE" -c ...`` line of the README's psql blocks."""
    out = []
    for m in re.finditer(r"^```sh psql\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL):
        for line in m.group(1).splitlines():
            if line.startswith("psql "):
                args = shlex.split(line)
                assert args[1] == "$COMFYQ_DATABASE" and args[2] == "-c", line
                out.append(args[3])
    return out


async def test_psql_recipes_run_on_a_real_database(make_server: MakeServer, pg_url: str) -> None:
    srv = await make_server(database=pg_url)
    await wait_healthy(srv)
    body = {"input": {"workflow_json": workflow(7), "request_id": "my-first-job"}}
    async with srv.session.post(srv.u("/generate"), json=body) as r:
        assert r.status in (200, 201, 202)
    async with asyncio.timeout(30):  # hang guard only
        while (job := await srv.services.store.get("my-first-job")) is None or not job.terminal:
            await asyncio.sleep(0.05)
    assert job.state == State.COMPLETED
    sqls = recipes()
    assert len(sqls) >= 15
    binary = shutil.which("psql")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for sql in sqls:
            rows = conn.execute(sql.encode()).fetchall()
            if "job_history" in sql or "from outputs" in sql:
                assert rows, f"{sql} found nothing for my-first-job"
            if binary is not None:
                p = await asyncio.to_thread(
                    subprocess.run,
                    [binary, pg_url, "-v", "ON_ERROR_STOP=1", "-c", sql],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert p.returncode == 0 and not p.stderr, f"{sql}: {p.stderr}"
