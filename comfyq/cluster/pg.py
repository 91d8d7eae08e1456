"""The Postgres link: registry rows, LISTEN/NOTIFY for state changes and live events.

Two connections of its own, beside the store's pool:

- the listener: ``LISTEN comfyq_events, comfyq_live``. A trigger on ``job_events`` notifies every
  committed state change with its origin and row ids only (NOTIFY serialises commits across the
  cluster, so payloads stay a few bytes); the listener reads the rows back in one query per batch
  of notifications and hands them to the bus and the stage runners as if they had been written
  here. Its own changes (same application_name) are skipped: they were published locally.
- webhook deliveries queued elsewhere (``comfyq_outbox``, a trigger on ``webhook_deliveries``)
  wake this instance's webhook sender.
- the talker: heartbeats, registry reads, and live events (progress, text) as ``pg_notify`` on
  ``comfyq_live``; progress of one job is coalesced while a send is on its way, so a burst of
  ticks costs one round trip.

When the database goes away the listener reconnects with backoff, replays the event rows written
after the last one it heard (waking workers and publishing them), then tells the bus there was a
gap: every open stream reads its own job's rows after the last one it sent. The replay alone
could miss a row: ids come from a sequence and transactions commit in any order, so a row with an
id below the last one heard may commit while the listener is away; the streams' reads cannot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import psycopg
from psycopg.rows import dict_row

from comfyq.clock import iso
from comfyq.cluster.link import OnLive, OnTransitions
from comfyq.cluster.migrate import apply_cluster_migrations
from comfyq.cluster.model import Instance
from comfyq.store.model import Stage, State, Transition, loads

log = logging.getLogger("comfyq.cluster")

EVENTS = "comfyq_events"
LIVE = "comfyq_live"
OUTBOX = "comfyq_outbox"
PING = "comfyq_ping"  # each instance pings itself: a listener that stopped hearing is replaced
PING_EVERY = 2.0  # seconds
PING_LOST = 10.0  # seconds without hearing its own ping before the listener is reconnected
MAX_PAYLOAD = 7900  # Postgres refuses NOTIFY payloads of 8000 bytes and more
REPLAY_LIMIT = 10000  # event rows replayed after the listener reconnects

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

_COLS = "id, job_id, at, from_state, to_state, stage, attempt, message, data"


def _text_time(v: Any) -> str:
    return iso(v.timestamp()) if isinstance(v, datetime) else str(v)


def _transition(row: dict[str, Any]) -> Transition:
    data = row["data"]
    if isinstance(data, str | bytes):
        data = loads(data)
    return Transition(
        event_id=int(row["id"]),
        job_id=row["job_id"],
        from_state=State(row["from_state"]) if row["from_state"] else None,
        to_state=State(row["to_state"]),
        stage=Stage(row["stage"]),
        attempt=int(row["attempt"]),
        message=row["message"] or "",
        at=_text_time(row["at"]),
        data=data or None,
    )


def parse_events_payload(payload: str) -> tuple[str, list[int], list[tuple[int, int]]]:
    """``"<origin>|1,2,3"`` or ``"<origin>|5-900"``: (origin, ids, ranges)."""
    origin, _, rest = payload.rpartition("|")
    ids: list[int] = []
    ranges: list[tuple[int, int]] = []
    for part in rest.split(","):
        lo, dash, hi = part.partition("-")
        if dash and lo.isdigit() and hi.isdigit():
            ranges.append((int(lo), int(hi)))
        elif part.isdigit():
            ids.append(int(part))
    return origin, ids, ranges


def live_payloads(origin: str, events: list[list[Any]]) -> list[str]:
    """Live events as NOTIFY payloads under the size limit; one too large on its own is dropped."""
    out: list[str] = []
    batch: list[bytes] = []
    size = 0
    head = b'{"o":' + _encode(origin) + b',"e":['
    for ev in events:
        enc = _encode(ev)
        if len(head) + len(enc) + 2 > MAX_PAYLOAD:
            continue
        if batch and size + len(enc) + 1 + len(head) + 2 > MAX_PAYLOAD:
            out.append((head + b",".join(batch) + b"]}").decode())
            batch, size = [], 0
        batch.append(enc)
        size += len(enc) + 1
    if batch:
        out.append((head + b",".join(batch) + b"]}").decode())
    return out


class PgLink:
    """Registry, cross-instance state changes and live events over one Postgres database."""

    shared = True

    def __init__(self, conninfo: str, *, app_name: str, reconnect_max: float = 5.0) -> None:
        self.conninfo = conninfo
        self.app_name = app_name[:63]  # application_name of the store's connections: the origin
        self.reconnect_max = reconnect_max
        self._talk: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._talk_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._on_transitions: OnTransitions = lambda trs: None
        self._on_live: OnLive = lambda *a: None
        self._on_outbox: Callable[[], None] = lambda: None
        self._on_gap: Callable[[], None] = lambda: None
        self._pending_live: list[list[Any]] = []
        self._pending_progress: dict[str, int] = {}  # job id -> index of its tick in the list
        self._live_ready = asyncio.Event()
        self._max_seen = 0
        self._heard = time.monotonic()
        self.connected = False
        self.reconnects = 0
        self.gaps = 0  # times open streams were told to read the rows they may have missed
        self.received_events = 0
        self.received_live = 0
        self.sent_live = 0
        self.notifies_sent = 0
        self.last_error: str | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def _connect(self, role: str) -> psycopg.AsyncConnection[dict[str, Any]]:
        return await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,
            row_factory=dict_row,
            application_name=f"{self.app_name}/{role}"[:63],
            connect_timeout=10,
        )

    async def open(
        self,
        me: Instance,
        on_transitions: OnTransitions,
        on_live: OnLive,
        on_outbox: Callable[[], None] = lambda: None,
        on_gap: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_transitions = on_transitions
        self._on_live = on_live
        self._on_outbox = on_outbox
        self._on_gap = on_gap
        talk = await self._connect("link")
        await apply_cluster_migrations(talk)
        self._talk = talk
        await self._register(me)
        row = await self._one("SELECT coalesce(max(id), 0) AS m FROM job_events")
        self._max_seen = int(row["m"]) if row else 0
        listening = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._listen_forever(listening), name="cluster-listen"),
            asyncio.create_task(self._send_forever(), name="cluster-live"),
            asyncio.create_task(self._ping_forever(), name="cluster-ping"),
        ]
        await listening.wait()

    async def close(self, me: Instance) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self._exec("UPDATE instances SET stopped_at = now() WHERE id = %s", (me.id,))
        except Exception as exc:  # noqa: BLE001 - stopping; the heartbeat ages out anyway
            log.warning("could not mark instance %s stopped: %s", me.name, exc)
        if self._talk is not None:
            await self._talk.close()
            self._talk = None

    async def close_connection(self) -> None:
        """Close the talker of a link used only to read (``comfyq instances``)."""
        if self._talk is not None:
            await self._talk.close()
            self._talk = None

    # --- talker ---------------------------------------------------------------------------------

    async def _talker(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        if self._talk is None or self._talk.closed or self._talk.broken:
            if self._talk is not None:
                await self._talk.close()
            self._talk = await self._connect("link")
        return self._talk

    async def _exec(self, sql: str, params: Any = None) -> int:
        async with self._talk_lock:
            conn = await self._talker()
            cur = await conn.execute(sql, params)
            return cur.rowcount

    async def _rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        async with self._talk_lock:
            conn = await self._talker()
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    async def _one(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    async def _register(self, me: Instance) -> None:
        await self._exec(
            "INSERT INTO instances (id, name, url, roles, backends, host, pid, version)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name, url = excluded.url,"
            " roles = excluded.roles, backends = excluded.backends, heartbeat_at = now(),"
            " stopped_at = NULL",
            (
                me.id,
                me.name,
                me.url,
                ",".join(me.roles),
                ",".join(me.backends),
                me.host,
                me.pid,
                me.version,
            ),
        )

    async def heartbeat(self, me: Instance) -> None:
        n = await self._exec(
            "UPDATE instances SET heartbeat_at = now(), url = %s, name = %s, stopped_at = NULL"
            " WHERE id = %s",
            (me.url, me.name, me.id),
        )
        if n == 0:  # someone pruned the row (or the database was restored): register again
            await self._register(me)
        if random.random() < 0.01:
            await self._exec("DELETE FROM instances WHERE heartbeat_at < now() - interval '7 days'")

    async def instances(self) -> list[Instance]:
        rows = await self._rows(
            "SELECT *, extract(epoch FROM now() - heartbeat_at)::float8 AS age,"
            " extract(epoch FROM started_at)::float8 AS started,"
            " extract(epoch FROM heartbeat_at)::float8 AS heard,"
            " extract(epoch FROM stopped_at)::float8 AS stopped"
            " FROM instances ORDER BY heartbeat_at DESC LIMIT 200"
        )
        return [
            Instance(
                id=r["id"],
                name=r["name"],
                url=r["url"],
                roles=[x for x in r["roles"].split(",") if x],
                backends=[x for x in r["backends"].split(",") if x],
                host=r["host"],
                pid=r["pid"],
                version=r["version"],
                started_at=r["started"],
                heartbeat_at=r["heard"],
                stopped_at=r["stopped"],
                heartbeat_age=max(0.0, r["age"]),
            )
            for r in rows
        ]

    async def dead_owners(self, me: str, heartbeat: float) -> list[str]:
        """Lease owners of running jobs that are not live instances (stopped, silent for three
        heartbeats, or never registered): their jobs can be rescued before their leases expire."""
        rows = await self._rows(
            "SELECT owner FROM (SELECT lease_owner AS owner FROM jobs WHERE state = 'running'"
            " UNION SELECT lease_owner FROM webhook_deliveries WHERE state = 'sending') o"
            " WHERE owner <> %s AND owner NOT IN (SELECT id FROM instances"
            " WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => %s))",
            (me, 3 * heartbeat),
        )
        return [r["owner"] for r in rows if r["owner"]]

    async def expire_deliveries(self, owners: list[str]) -> int:
        """End the leases of webhook posts the given dead owners had in flight (a delivery lease
        outlasts the longest post, minutes), so that the outbox's recovery takes them now."""
        return await self._exec(
            "UPDATE webhook_deliveries SET lease_expires_at = now() - interval '1 second'"
            " WHERE state = 'sending' AND lease_owner = ANY(%s)",
            (owners,),
        )

    async def backend_load(self, me: str) -> dict[str, int]:
        rows = await self._rows(
            "SELECT comfy_backend AS url, count(*) AS n FROM jobs"
            " WHERE state = 'running' AND stage = 'generate' AND comfy_backend IS NOT NULL"
            " AND lease_owner <> %s GROUP BY comfy_backend",
            (me,),
        )
        return {r["url"]: int(r["n"]) for r in rows}

    # --- live events out ------------------------------------------------------------------------

    def send_live(self, job_id: str, kind: str, event_id: str, data: dict[str, Any]) -> None:
        ev = [job_id, kind, event_id, data]
        if kind == "progress":
            # Only the newest tick of a job is worth sending: it takes the place of an older one.
            at = self._pending_progress.get(job_id)
            if at is not None:
                self._pending_live[at] = ev
                return
            self._pending_progress[job_id] = len(self._pending_live)
        self._pending_live.append(ev)
        self._live_ready.set()

    async def _send_forever(self) -> None:
        while True:
            await self._live_ready.wait()
            self._live_ready.clear()
            events = self._pending_live
            self._pending_live, self._pending_progress = [], {}
            try:
                for payload in live_payloads(self.app_name, events):
                    await self._exec("SELECT pg_notify(%s, %s)", (LIVE, payload))
                    self.notifies_sent += 1
                self.sent_live += len(events)
            except Exception as exc:  # noqa: BLE001 - live events are droppable by design
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("live events not sent: %s", exc)
                await asyncio.sleep(0.5)

    async def _ping_forever(self) -> None:
        while True:
            await asyncio.sleep(PING_EVERY)
            try:
                await self._exec("SELECT pg_notify(%s, %s)", (PING, self.app_name))
            except Exception as exc:  # noqa: BLE001 - the database is away: the listener knows
                log.debug("cluster ping not sent: %s", exc)

    # --- listener -------------------------------------------------------------------------------

    async def _listen_forever(self, listening: asyncio.Event) -> None:
        delay = 0.1
        first = True
        while True:
            try:
                conn = await self._connect("listen")
            except Exception as exc:  # noqa: BLE001 - the database is away: try again
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(delay)
                delay = min(self.reconnect_max, delay * 2)
                continue
            try:
                await conn.execute(f"LISTEN {EVENTS}")
                await conn.execute(f"LISTEN {LIVE}")
                await conn.execute(f"LISTEN {OUTBOX}")
                await conn.execute(f"LISTEN {PING}")
                self._heard = time.monotonic()
                self.connected = True
                delay = 0.1
                if first:
                    first = False
                    listening.set()
                else:
                    self.reconnects += 1
                    log.info(
                        "cluster listener reconnected; replaying events after %d", self._max_seen
                    )
                    await self._replay(conn)
                    self._gap()
                    self._on_outbox()  # deliveries queued meanwhile: look at the outbox
                await self._listen(conn)
            except asyncio.CancelledError:
                await conn.close()
                raise
            except Exception as exc:  # noqa: BLE001 - connection lost: reconnect
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("cluster listener lost its connection: %s", exc)
            await conn.close()
            await asyncio.sleep(delay)

    async def _listen(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        while True:
            batch = [n async for n in conn.notifies(stop_after=1, timeout=PING_LOST)]
            if time.monotonic() - self._heard > PING_LOST:
                # Not even our own pings arrive: this connection hears nothing any more.
                raise ConnectionError(f"no notification heard for {PING_LOST:.0f}s")
            # Everything already arrived joins the batch: one read for the lot.
            batch += [n async for n in conn.notifies(timeout=0)]
            ids: list[int] = []
            ranges: list[tuple[int, int]] = []
            for n in batch:
                if n.channel == LIVE:
                    self._live(n.payload)
                    continue
                if n.channel == PING:
                    if n.payload == self.app_name:
                        self._heard = time.monotonic()
                    continue
                if n.channel == OUTBOX:
                    if n.payload != self.app_name:
                        self._on_outbox()
                    continue
                origin, i, r = parse_events_payload(n.payload)
                if origin == self.app_name:
                    if i:
                        self._max_seen = max(self._max_seen, *i)
                    continue
                ids += i
                ranges += r
            if ids or ranges:
                await self._fetch(conn, ids, ranges)

    async def _fetch(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        ids: list[int],
        ranges: list[tuple[int, int]],
    ) -> None:
        where = ["id = ANY(%s)"]
        params: list[Any] = [ids]
        for lo, hi in ranges:
            where.append("id BETWEEN %s AND %s")
            params += [lo, hi]
        cur = await conn.execute(
            f"SELECT {_COLS} FROM job_events WHERE {' OR '.join(where)} ORDER BY id", params
        )
        self._dispatch([_transition(r) for r in await cur.fetchall()])

    async def _replay(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        cur = await conn.execute(
            f"SELECT {_COLS} FROM job_events WHERE id > %s ORDER BY id LIMIT %s",
            (self._max_seen, REPLAY_LIMIT),
        )
        self._dispatch([_transition(r) for r in await cur.fetchall()])

    def _dispatch(self, trs: list[Transition]) -> None:
        if not trs:
            return
        self._max_seen = max(self._max_seen, trs[-1].event_id)
        self.received_events += len(trs)
        try:
            self._on_transitions(trs)
        except Exception:  # a listener bug must not stop the listener
            log.exception("cluster: transition listener failed")

    def _gap(self) -> None:
        self.gaps += 1
        try:
            self._on_gap()
        except Exception:  # a listener bug must not stop the listener
            log.exception("cluster: gap listener failed")

    def _live(self, payload: str) -> None:
        try:
            msg = _decode(payload)
            if msg.get("o") == self.app_name:
                return
            for job_id, kind, event_id, data in msg.get("e") or ():
                self.received_live += 1
                self._on_live(str(job_id), str(kind), str(event_id), data)
        except Exception:  # a malformed payload is someone else's bug
            log.exception("cluster: unreadable live event payload")

    def health(self) -> dict[str, Any]:
        return {
            "shared": True,
            "listening": self.connected,
            "reconnects": self.reconnects,
            "gaps": self.gaps,
            "received_events": self.received_events,
            "received_live": self.received_live,
            "sent_live": self.sent_live,
            "notifies_sent": self.notifies_sent,
            "last_error": self.last_error,
        }


def default_instance_id() -> str:
    """A fresh id per process: host, pid and a random part (a restart is a new instance)."""
    return f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
