"""The parts of several instances that need no second process: the bus's transport, the NOTIFY
payloads, roles, and backend slots shared with other instances."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest
from support.cluster_harness import create_database, drop_database
from support.s3 import make_bucket
from support.servers import MakeServer, wait_healthy
from support.workflows import workflow

from comfyq.cluster.migrate import ClusterMigrationError, apply_cluster_migrations, migrations_dir
from comfyq.cluster.pg import MAX_PAYLOAD, live_payloads, parse_events_payload
from comfyq.comfy.backends import BackendPool
from comfyq.config import ConfigError, load_settings
from comfyq.events import ALL, GAP, EventBus, Subscription
from comfyq.sim import Simulator
from comfyq.store import open_store
from comfyq.store.model import Stage, State, Transition
from comfyq.store.postgres import PostgresStore


class Loopback:
    """A transport that hands every live event to another bus, as the Postgres link does."""

    def __init__(self, other: EventBus) -> None:
        self.other = other
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []

    def send_live(self, job_id: str, kind: str, event_id: str, data: dict[str, Any]) -> None:
        self.sent.append((job_id, kind, event_id, data))
        self.other.receive(job_id, kind, event_id, data)


def tr(event_id: int, job_id: str, to_state: str, stage: str = "generate") -> Transition:
    return Transition(
        event_id,
        job_id,
        State.PENDING,
        State(to_state),
        Stage(stage),
        1,
        "",
        "2026-12-07T00:00:00Z",
    )


async def test_live_events_reach_the_other_instance_with_their_ids() -> None:
    a, b = EventBus(), EventBus()
    a.transport = Loopback(b)
    with b.subscribe("j1") as sub:
        a.on_transitions([tr(5, "j1", "running")])
        b.on_transitions([tr(5, "j1", "running")])  # the state change arrives through the store
        a.live("j1", "progress", {"value": 1, "max": 4})
        a.live("j1", "preview", {"node": "3"}, payload=b"\x89PNG")  # stays on a
        first = await sub.get(1)
        second = await sub.get(1)
        assert first is not None and first.kind == "state" and first.id == "5"
        assert second is not None and second.kind == "progress" and second.id.startswith("5.")
        assert second.data == {"value": 1, "max": 4}
        assert sub.buffered == 0
    assert b.progress["j1"] == {"value": 1, "max": 4}
    assert [s[1] for s in a.transport.sent] == ["progress"]


async def test_a_late_progress_tick_of_an_ended_job_is_dropped() -> None:
    a, b = EventBus(), EventBus()
    a.transport = Loopback(b)
    b.transport = Loopback(EventBus())
    b.on_transitions([tr(7, "j2", "running")])
    b.on_transitions([tr(8, "j2", "completed", "postprocess")])
    with b.subscribe("j2") as sub:
        b.receive("j2", "progress", "7.3", {"value": 3})
        assert sub.buffered == 0
    assert "j2" not in b.progress


async def test_a_gap_reaches_every_subscriber_once_even_with_a_full_buffer() -> None:
    bus = EventBus()
    full = bus.subscribe("j1", maxsize=1)
    both = bus.subscribe("j1", "j2")
    every = bus.subscribe(ALL)
    bus.live("j1", "progress", {"value": 1})  # fills `full`'s one slot
    bus.live("j1", "progress", {"value": 2})  # dropped for `full`: progress is droppable
    assert full.dropped == 1
    bus.gap()

    async def kinds(sub: Subscription) -> list[str]:
        out = []
        while (ev := await sub.get(0)) is not None:
            out.append(ev.kind)
        return out

    assert await kinds(full) == ["progress", GAP]  # a gap is never dropped
    assert await kinds(both) == ["progress", "progress", GAP]  # once, not once per key
    assert await kinds(every) == ["progress", "progress", GAP]
    for sub in (full, both, every):
        sub.close()
    bus.gap()  # nobody left: nothing to do
    assert bus.subscribers() == 0


def test_events_payload_round_trip() -> None:
    assert parse_events_payload("host:1:ab|3,4,9") == ("host:1:ab", [3, 4, 9], [])
    assert parse_events_payload("x|10-250") == ("x", [], [(10, 250)])
    assert parse_events_payload("a|b|1") == ("a|b", [1], [])  # the origin may hold a bar
    assert parse_events_payload("junk") == ("", [], [])


def test_live_payloads_stay_under_the_notify_limit() -> None:
    events = [[f"job-{i}", "text", f"1.{i}", {"text": "x" * 300}] for i in range(100)]
    huge = ["big", "text", "1.0", {"text": "y" * 10_000}]
    payloads = live_payloads("origin", [*events, huge])
    assert len(payloads) > 1
    assert all(len(p.encode()) < MAX_PAYLOAD for p in payloads)
    decoded = [msgspec.json.decode(p) for p in payloads]
    assert all(d["o"] == "origin" for d in decoded)
    assert [e[2] for d in decoded for e in d["e"]] == [
        e[2] for e in events
    ]  # order kept, huge dropped


def test_roles_are_checked_and_all_means_every_one() -> None:
    s = load_settings(env={"COMFYQ_ROLES": "api,webhooks"})
    assert s.active_roles == {"api", "webhooks"}
    assert load_settings(env={}).active_roles == {
        "api",
        "preprocess",
        "generate",
        "postprocess",
        "webhooks",
    }
    with pytest.raises(ConfigError, match="roles"):
        load_settings(env={"COMFYQ_ROLES": "api,gpu"})


async def test_prompts_of_other_instances_take_slots_of_a_shared_backend(tmp_path: Path) -> None:
    sim = Simulator(port=0, data_dir=tmp_path / "sim")
    await sim.start()
    pool = BackendPool([sim.url], slots_per_backend=2, probe_interval=0.1)
    await pool.start()
    try:
        assert await pool.wait_ready(15)
        pool.set_elsewhere({sim.url: 2})  # another instance holds both slots
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        release = asyncio.Event()

        async def hold() -> None:
            async with pool.slot() as be:
                got.set_result(be)
                await release.wait()

        holder = asyncio.create_task(hold())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not got.done()
        assert pool.snapshot()[0]["in_flight_elsewhere"] == 2
        pool.set_elsewhere({sim.url: 1})  # one came free: the waiter gets it
        be = await asyncio.wait_for(got, 15)
        assert be.url == sim.url and be.in_flight == 1
        release.set()
        await holder
        assert be.in_flight == 0
    finally:
        await pool.close()
        await sim.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_database("comfyq_c2_parts")
    try:
        yield url
    finally:
        drop_database(url)


def test_the_pool_size_follows_the_workers_unless_set() -> None:
    assert load_settings(env={}).database_pool() == 3 + 2 + 3 + 8  # default workers, one backend
    two = load_settings(
        env={"COMFYUI_BACKENDS": "http://a:1,http://b:2", "PREPROCESS_WORKERS": "5"}
    )
    assert two.database_pool() == 5 + 2 * 2 + 3 + 8
    api_only = load_settings(env={"COMFYQ_ROLES": "api,webhooks"})
    assert api_only.database_pool() == 8
    gpu = load_settings(env={"COMFYQ_ROLES": "generate", "GENERATION_WORKERS": "4"})
    assert gpu.database_pool(backends=3) == 4 * 3 + 8
    assert load_settings(env={"COMFYQ_DATABASE_POOL_SIZE": "5"}).database_pool() == 5
    with pytest.raises(ConfigError, match="database_pool_size"):
        load_settings(env={"COMFYQ_DATABASE_POOL_SIZE": "-1"})


async def test_the_store_opens_no_more_connections_than_its_pool_size(pg_url: str) -> None:
    settings = load_settings(env={"COMFYQ_DATABASE": pg_url, "COMFYQ_DATABASE_POOL_SIZE": "3"})
    store = open_store(pg_url, owner="pool-size-test", pool_size=settings.database_pool())
    assert isinstance(store, PostgresStore)
    await store.open()
    seen: list[int] = []

    async def watch() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    ("pool-size-test",),
                )
                row = await cur.fetchone()
                seen.append(int(row[0]) if row else 0)
                await asyncio.sleep(0.01)

    async def slow_read() -> None:
        async with store.pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.05)")

    try:
        watcher = asyncio.create_task(watch())
        # Twenty slow calls at once: the pool lends at most three connections, the others wait
        # their turn, and every one of them completes.
        await asyncio.gather(*(slow_read() for _ in range(20)))
        assert await store.get("no-such-job") is None
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        stats = store.pool.get_stats()
        assert stats["pool_max"] == 3 and stats["requests_queued"] > 0
        assert seen and max(seen) <= 3
    finally:
        await store.close()


def comfyq(*argv: str, database: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMFYQ_DATABASE": database}
    return subprocess.run(
        [sys.executable, "-m", "comfyq", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent,
    )


def test_migrate_creates_the_cluster_tables_once_and_instances_lists_none(pg_url: str) -> None:
    first = comfyq("migrate", database=pg_url)
    assert first.returncode == 0, first.stderr
    assert "cluster tables: applied [1, 2]" in first.stdout
    again = comfyq("migrate", database=pg_url)
    assert "cluster tables: up to date" in again.stdout
    listed = comfyq("instances", database=pg_url)
    assert listed.returncode == 0 and listed.stdout.strip() == "no instance registered"


async def test_a_cluster_migration_edited_or_unknown_is_refused(
    pg_url: str, tmp_path: Path
) -> None:
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in migrations_dir().glob("*.sql"):
        (edited / f.name).write_text(f.read_text())
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        # The jobs tables first: the trigger is on job_events.
        await conn.execute("CREATE TABLE job_events (id bigint PRIMARY KEY)")
        await conn.execute("CREATE TABLE jobs (id text PRIMARY KEY)")
        await conn.execute("CREATE TABLE webhook_deliveries (id text PRIMARY KEY)")
        assert await apply_cluster_migrations(conn) == [1, 2]
        assert await apply_cluster_migrations(conn) == []
        first = min(edited.glob("*.sql"))
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(ClusterMigrationError, match="edited"):
            await apply_cluster_migrations(conn, edited)
        await conn.execute(
            "INSERT INTO cluster_migrations (version, name, checksum) VALUES (99, 'future', 'x')"
        )
        with pytest.raises(ClusterMigrationError, match="newer"):
            await apply_cluster_migrations(conn)


async def test_an_output_uploaded_to_s3_but_not_on_this_disk_is_redirected_there(
    make_server: MakeServer, moto_url: str
) -> None:
    make_bucket(moto_url, "cluster-outs")
    srv = await make_server(
        url_allowlist=["127.0.0.1"],
        s3_access_key_id="AKID",
        s3_secret_access_key="secret",
        s3_bucket_name="cluster-outs",
        s3_endpoint_url=moto_url,
    )
    await wait_healthy(srv)
    body = {"input": {"workflow_json": workflow(4242), "request_id": "s3-redirect"}}
    async with srv.session.post(srv.u("/generate/sync"), json=body) as r:
        res = await r.json()
    assert res["status"] == "completed", res
    [out] = res["output"]
    assert out["url"].startswith(moto_url)
    # As on an instance that did not post-process the job: the file is not on this disk.
    Path(out["local_path"]).unlink()
    async with srv.session.get(
        srv.u(f"/outputs/{res['id']}/{out['filename']}"), allow_redirects=False
    ) as r:
        assert r.status == 302 and r.headers["Location"] == out["url"]
    async with aiohttp.ClientSession() as s, s.get(out["url"]) as r:
        assert r.status == 200 and len(await r.read()) == out["size"]
