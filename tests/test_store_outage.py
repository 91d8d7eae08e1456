"""A PostgreSQL store that is misconfigured at start, or lost while running.

At start: an address nobody answers at, an unknown role, a database of a newer schema: one line
on stderr and a non-zero exit. While running (the server reached through a TCP relay the test cuts
and restores): admissions answer 503 with Retry-After, /health names the store and why, and the
queue resumes by itself when the database is back, losing nothing it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from support.servers import MakeServer, Server, wait_healthy
from support.workflows import workflow

from comfyq.store.model import State
from comfyq.store.postgres.migrate import files


class Relay:
    """A TCP relay in front of the database: ``cut()`` drops every connection and stops
    listening (the server is gone); ``restore()`` listens again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self._writers |= {cw, sw}
        await asyncio.gather(self._pipe(cr, sw), self._pipe(sr, cw))
        self._writers -= {cw, sw}

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def restore(self) -> None:
        await self.start()


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _comfyq(tmp_path: Path, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "COMFYQ_DATABASE": database,
        "COMFYQ_CONFIG": str(tmp_path / "absent.toml"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    return subprocess.run(
        [sys.executable, "-m", "comfyq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_configuration_is_one_line_and_a_nonzero_exit(tmp_path: Path, pg_url: str) -> None:
    nobody = f"postgresql://root@127.0.0.1:{_free_port()}/test"
    stranger = pg_url.replace("://root@", "://no_such_role_c1@").replace(
        "://postgres@", "://no_such_role_c1@"
    )
    for url, words in ((nobody, "cannot connect"), (stranger, "no_such_role_c1")):
        for cmd in (["migrate"], ["serve", "--port", "0"]):
            p = _comfyq(tmp_path, url, *cmd)
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            assert p.returncode == 2, (cmd, p.stderr)
            assert len(lines) == 1 and words in lines[0], (cmd, p.stderr)
    # A database a newer comfyq migrated: refused, not "fixed".
    assert _comfyq(tmp_path, pg_url, "migrate").returncode == 0
    newest = max(m.version for m in files())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations VALUES (%s, 'from_the_future', 'x', now())",
            (newest + 1,),
        )
    for cmd in (["migrate"], ["serve", "--port", "0"]):
        p = _comfyq(tmp_path, pg_url, *cmd)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, (cmd, p.stderr)
        assert f"migration {newest + 1}" in lines[0] and "newer" in lines[0]


async def _post(srv: Server, color: int, request_id: str) -> tuple[int, dict[str, Any], Any]:
    body = {"input": {"workflow_json": workflow(color), "request_id": request_id}}
    async with srv.session.post(srv.u("/generate"), json=body) as r:
        return r.status, await r.json(), r.headers


async def _health(srv: Server) -> tuple[int, dict[str, Any]]:
    async with srv.session.get(srv.u("/health")) as r:
        return r.status, await r.json()


async def _completed(srv: Server, job_id: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):  # hang guard only
        while True:
            job = await srv.services.store.get(job_id)
            if job is not None and job.terminal:
                assert job.state == State.COMPLETED, (job.state, job.message)
                return
            await asyncio.sleep(0.05)


async def test_a_lost_database_pauses_the_queue_and_it_resumes(
    make_server: MakeServer, pg_url: str
) -> None:
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await relay.start()
    url = _via(pg_url, relay.port)
    srv = await make_server(database=url)
    await wait_healthy(srv)
    status, _, _ = await _post(srv, 1, "before")
    assert status in (200, 201, 202)
    await _completed(srv, "before")

    await relay.cut()
    status, body, headers = await _post(srv, 2, "during")
    assert status == 503 and body["error"]["type"] == "store_unavailable"
    assert headers["Retry-After"].isdigit() and "127.0.0.1" not in body["error"]["message"]
    async with srv.session.get(srv.u("/api/v2/jobs")) as r:  # the v2 surface too
        assert r.status == 503 and r.headers["Retry-After"].isdigit()
        assert (await r.json())["error"]["code"] == "store_unavailable"
    status, health = await _health(srv)
    assert status == 503 and health["store"]["writable"] is False
    assert f"127.0.0.1:{relay.port}" in health["store"]["path"] and health["store"]["error"]

    await relay.restore()
    async with asyncio.timeout(30):  # the pool reconnects on its own
        while (await _health(srv))[0] != 200:
            await asyncio.sleep(0.1)
    status, _, _ = await _post(srv, 3, "after")
    assert status in (200, 201, 202)
    await _completed(srv, "after")
    assert await srv.services.store.get("during") is None  # refused, so never accepted
    await relay.cut()  # let the server stop without waiting on a dead relay's sockets
    await relay.restore()
