"""The webhook outbox in SQLite: claim due deliveries, record attempts, recover interrupted ones.

Each write function is ``fn(conn, ...)`` run by the store's one writer inside a transaction, so an
attempt row and the delivery's next state always commit together. The rows themselves are written
by the trigger ``jobs_state_change`` (migrations 0002 and 0005) when a job ends.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from comfyq.clock import iso
from comfyq.store.base import Attempt

# The endpoint is the URL without its query or fragment (which often carry a job id or a token).
_ENDPOINT = "substr(url, 1, min(instr(url || '?', '?'), instr(url || '#', '#')) - 1)"

# Two caps, applied in order: posts in flight per endpoint, then per host. A receiver whose one
# endpoint hangs keeps its other endpoints flowing; a dead host (whatever its paths) holds at most
# per_host of the sender's slots, so other receivers never wait for it.
_CLAIM = f"""
UPDATE webhook_deliveries
SET state = 'sending', lease_owner = :owner, lease_expires_at = :exp, attempts = attempts + 1,
    updated_at = :now
WHERE id IN (
    WITH sending AS (
        SELECT host, {_ENDPOINT} AS endpoint FROM webhook_deliveries WHERE state = 'sending'),
    due AS (
        SELECT id, host, endpoint, next_attempt_at,
               row_number() OVER (PARTITION BY endpoint ORDER BY next_attempt_at, id) AS rn
        FROM (SELECT id, host, {_ENDPOINT} AS endpoint, next_attempt_at FROM webhook_deliveries
              WHERE state = 'pending' AND next_attempt_at <= :now)),
    endpoint_ok AS (
        SELECT id, host, next_attempt_at,
               row_number() OVER (PARTITION BY host ORDER BY next_attempt_at, id) AS rn
        FROM due d
        WHERE d.rn + (SELECT count(*) FROM sending s WHERE s.endpoint = d.endpoint)
              <= :per_endpoint)
    SELECT e.id FROM endpoint_ok e
    WHERE e.rn + (SELECT count(*) FROM sending s WHERE s.host = e.host) <= :per_host
    ORDER BY e.next_attempt_at, e.id LIMIT :n)
RETURNING *
"""


def claim(
    conn: sqlite3.Connection,
    owner: str,
    now: float,
    n: int,
    per_host: int,
    lease: float,
    per_endpoint: int | None = None,
) -> list[dict[str, Any]]:
    """Lease up to ``n`` due deliveries, oldest first, within the per-endpoint and per-host caps."""
    rows = conn.execute(
        _CLAIM,
        {
            "owner": owner,
            "exp": iso(now + lease),
            "now": iso(now),
            "n": n,
            "per_host": per_host,
            "per_endpoint": per_endpoint or per_host,
        },
    ).fetchall()
    return sorted((dict(r) for r in rows), key=lambda r: (r["next_attempt_at"], r["id"]))


def record(
    conn: sqlite3.Connection, delivery: dict[str, Any], owner: str, now: float, attempt: Attempt
) -> bool:
    """Store one attempt and the delivery's next state; False when the lease was lost meanwhile."""
    common = {
        "id": delivery["id"],
        "owner": owner,
        "now": iso(now),
        "status": attempt.status,
        "error": attempt.error,
    }
    if attempt.outcome == "retry":
        sql = (
            "UPDATE webhook_deliveries SET state = 'pending', lease_owner = NULL,"
            " lease_expires_at = NULL,"
            " next_attempt_at = :next, last_status = :status,"
            " last_error = :error, updated_at = :now"
            " WHERE id = :id AND state = 'sending' AND lease_owner = :owner"
        )
        common["next"] = iso(attempt.next_at if attempt.next_at is not None else now)
    else:
        # The delivery has ended: its secret is no longer needed, so it goes now.
        sql = (
            "UPDATE webhook_deliveries SET state = :state, lease_owner = NULL,"
            " lease_expires_at = NULL,"
            " secret = NULL, finished_at = :now, last_status = :status, last_error = :error,"
            " updated_at = :now WHERE id = :id AND state = 'sending' AND lease_owner = :owner"
        )
        common["state"] = "delivered" if attempt.outcome == "delivered" else "failed"
    if conn.execute(sql, common).rowcount != 1:
        return False
    conn.execute(
        "INSERT INTO webhook_attempts (job_id, delivery_id, attempt, at, duration_ms,"
        " status_code, error, outcome)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            delivery["job_id"],
            delivery["id"],
            delivery["attempts"],
            iso(attempt.started),
            attempt.duration_ms,
            attempt.status,
            attempt.error,
            attempt.outcome,
        ),
    )
    return True


def recover(conn: sqlite3.Connection, owner: str, now: float, max_attempts: int) -> int:
    """Deliveries left mid-attempt by a dead process (or an expired lease) are due again."""
    rows = conn.execute(
        "SELECT * FROM webhook_deliveries WHERE state = 'sending' AND (lease_owner <> ? OR"
        " lease_expires_at < ?)",
        (owner, iso(now)),
    ).fetchall()
    for r in rows:
        d = dict(r)
        gave_up = d["attempts"] >= max_attempts
        note = "interrupted: comfyq stopped during this attempt" + (
            "; attempts spent" if gave_up else ""
        )
        conn.execute("UPDATE webhook_deliveries SET lease_owner = ? WHERE id = ?", (owner, d["id"]))
        record(
            conn,
            d,
            owner,
            now,
            Attempt("gave_up" if gave_up else "retry", None, note, now, None, now),
        )
    return len(rows)
