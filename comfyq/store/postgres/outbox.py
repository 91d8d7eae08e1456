"""The webhook outbox on PostgreSQL: claim due deliveries (SKIP LOCKED), record attempts, recover
interrupted ones. The rows are written by the trigger ``jobs_outbox_webhook`` when a job ends.

Delivered once in normal operation: a row is leased to one instance by the claim, and SKIP LOCKED
keeps two instances' claims apart. At least once across crashes: a lease that expires mid-attempt
makes the row due again, with the same webhook-id.
"""

from __future__ import annotations

from typing import Any

from comfyq.clock import iso
from comfyq.store.base import Attempt
from comfyq.store.postgres.connect import Conn

# The endpoint is the URL without its query or fragment (which often carry a job id or a token).
_ENDPOINT = "split_part(split_part(url, '?', 1), '#', 1)"

# Two caps, applied in order: posts in flight per endpoint, then per host (see the SQLite
# adapter). The window functions pick candidates; the locking read then skips any row another
# instance is claiming at the same moment and re-checks that each is still pending.
_CLAIM = f"""
WITH sending AS (
    SELECT host, {_ENDPOINT} AS endpoint FROM webhook_deliveries WHERE state = 'sending'),
due AS (
    SELECT id, host, endpoint, next_attempt_at,
           row_number() OVER (PARTITION BY endpoint ORDER BY next_attempt_at, id) AS rn
    FROM (SELECT id, host, {_ENDPOINT} AS endpoint, next_attempt_at FROM webhook_deliveries
          WHERE state = 'pending' AND next_attempt_at <= %(now)s::timestamptz) x),
endpoint_ok AS (
    SELECT id, host, next_attempt_at,
           row_number() OVER (PARTITION BY host ORDER BY next_attempt_at, id) AS rn
    FROM due d
    WHERE d.rn + (SELECT count(*) FROM sending s WHERE s.endpoint = d.endpoint)
          <= %(per_endpoint)s),
candidates AS (
    SELECT e.id FROM endpoint_ok e
    WHERE e.rn + (SELECT count(*) FROM sending s WHERE s.host = e.host) <= %(per_host)s
    ORDER BY e.next_attempt_at, e.id LIMIT %(n)s),
picked AS (
    SELECT d.id FROM webhook_deliveries d
    WHERE d.id IN (SELECT id FROM candidates) AND d.state = 'pending'
    FOR UPDATE SKIP LOCKED)
UPDATE webhook_deliveries w
SET state = 'sending', lease_owner = %(owner)s, lease_expires_at = %(exp)s::timestamptz,
    attempts = attempts + 1, updated_at = %(now)s::timestamptz
FROM picked WHERE w.id = picked.id
RETURNING w.*
"""

# One statement: the delivery's next state and, if it was still ours, the attempt's row.
_RECORD = """
WITH d AS (
    UPDATE webhook_deliveries SET {sets}, lease_owner = NULL, lease_expires_at = NULL,
        last_status = %(status)s, last_error = %(error)s, updated_at = %(now)s::timestamptz
    WHERE id = %(id)s AND state = 'sending' AND lease_owner = %(owner)s
    RETURNING id, job_id, attempts)
INSERT INTO webhook_attempts
    (job_id, delivery_id, attempt, at, duration_ms, status_code, error, outcome)
SELECT job_id, id, attempts, %(started)s::timestamptz, %(duration)s::integer,
       %(status)s::integer, %(error)s::text, %(outcome)s
FROM d
"""
_RETRY = _RECORD.format(sets="state = 'pending', next_attempt_at = %(next)s::timestamptz")
_END = _RECORD.format(sets="state = %(state)s, secret = NULL, finished_at = %(now)s::timestamptz")


async def claim(
    conn: Conn,
    owner: str,
    now: float,
    n: int,
    per_host: int,
    lease: float,
    per_endpoint: int | None = None,
) -> list[dict[str, Any]]:
    """Lease up to ``n`` due deliveries, oldest first, within the per-endpoint and per-host caps."""
    cur = await conn.execute(
        _CLAIM,
        {
            "owner": owner,
            "exp": iso(now + lease),
            "now": iso(now),
            "n": n,
            "per_host": per_host,
            "per_endpoint": per_endpoint or per_host,
        },
    )
    rows = await cur.fetchall()
    return sorted((dict(r) for r in rows), key=lambda r: (r["next_attempt_at"], r["id"]))


async def record(
    conn: Conn, delivery: dict[str, Any], owner: str, now: float, attempt: Attempt
) -> bool:
    """Store one attempt and the delivery's next state; False when the lease was lost meanwhile."""
    params: dict[str, Any] = {
        "id": delivery["id"],
        "owner": owner,
        "now": iso(now),
        "status": attempt.status,
        "error": attempt.error,
        "started": iso(attempt.started),
        "duration": attempt.duration_ms,
        "outcome": attempt.outcome,
    }
    if attempt.outcome == "retry":
        params["next"] = iso(attempt.next_at if attempt.next_at is not None else now)
        sql = _RETRY
    else:
        # The delivery has ended: its secret is no longer needed, so it goes now.
        params["state"] = "delivered" if attempt.outcome == "delivered" else "failed"
        sql = _END
    cur = await conn.execute(sql, params)
    return cur.rowcount == 1


async def recover(conn: Conn, owner: str, now: float, max_attempts: int) -> int:
    """Deliveries whose lease expired mid-attempt (their instance died or hung) are due again, or
    given up when their attempts are spent. Leases of live instances are left alone."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT * FROM webhook_deliveries WHERE state = 'sending'"
            " AND lease_expires_at < %s::timestamptz FOR UPDATE SKIP LOCKED",
            (iso(now),),
        )
        rows = await cur.fetchall()
        for d in rows:
            gave_up = d["attempts"] >= max_attempts
            note = "interrupted: comfyq stopped during this attempt" + (
                "; attempts spent" if gave_up else ""
            )
            await conn.execute(
                "UPDATE webhook_deliveries SET lease_owner = %s WHERE id = %s", (owner, d["id"])
            )
            await record(
                conn,
                d,
                owner,
                now,
                Attempt("gave_up" if gave_up else "retry", None, note, now, None, now),
            )
    return len(rows)
