"""Job transitions on PostgreSQL: each is ``await fn(conn, ...)`` on a pooled connection.

The usual case of every hot transition is one statement (guarded UPDATE + its events, see
``sql.with_events``) run in autocommit: one round trip, one commit. When it matches nothing, the
slow path opens a transaction, locks the row (``FOR UPDATE``) and either explains (LeaseLost,
IllegalTransition, NotFound) or takes the other branch (cancel, fail when attempts are spent),
as the SQLite adapter's ``ops`` does. The trigger ``jobs_legal_transition`` refuses anything the
state machine does not list, whoever writes.
"""

from __future__ import annotations

from typing import Any

from comfyq.clock import iso, parse_iso
from comfyq.errors import Conflict, IllegalTransition, LeaseLost, NotFound, QueueFull
from comfyq.store.model import NEXT_STAGE, STAGE_MS, Job, NewJob, Stage, State, Transition, dumps
from comfyq.store.postgres.connect import Conn
from comfyq.store.postgres.sql import (
    ADMIT,
    ADMIT_CLAIMED,
    ADMIT_CLAIMED_WITH_SECRETS,
    ADMIT_WITH_SECRETS,
    ADVANCE,
    CLAIM,
    CLAIM_ASSIGN,
    CLAIM_ONE,
    HAND_OFF,
    HELD,
    NOW,
    OUTPUT_COLS,
    add_timing,
    keep_asset_id,
    ms_since,
    outputs_cte,
    with_events,
)

CANCELLED = {"type": "cancelled", "message": "Request cancelled by client"}
_SETTABLE = {"prepared", "result", "comfy_prompt_id", "comfy_backend", "message", "error"}
_JSON = {"prepared", "result", "error"}


def _job(row: dict[str, Any]) -> tuple[Job, list[int]]:
    ids = row.pop("event_ids")
    return Job(row), ids


def _tr(
    job: Job, event_id: int, from_state: State | None, message: str, data: Any = None
) -> Transition:
    return Transition(
        event_id,
        job.id,
        from_state,
        job.state,
        job.stage,
        job.attempts,
        message,
        job.updated_at,
        data,
        job,
    )


async def _rows(conn: Conn, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall() if cur.description else []


async def get(conn: Conn, job_id: str, *, lock: bool = False) -> Job | None:
    cur = await conn.execute(
        "SELECT * FROM jobs WHERE id = %s" + (" FOR UPDATE" if lock else ""), (job_id,)
    )
    row = await cur.fetchone()
    return None if row is None else Job(row)


# --- admission and claims ----------------------------------------------------------------------


def _admit_params(new: NewJob, now: float, max_queue: int) -> dict[str, Any]:
    params = {
        "id": new.id,
        "priority": new.priority,
        "max_attempts": new.max_attempts,
        "kind": new.kind,
        "payload": dumps(new.payload),
        "hash": new.payload_hash,
        "now": iso(now),
        "deadline": iso(now + new.timeout),
        "max": max_queue,
        "job_owner": new.owner,
    }
    if new.secrets:
        params["secrets"] = dumps(new.secrets)
    return params


async def create(
    conn: Conn, new: NewJob, now: float, max_queue: int
) -> tuple[Job, Transition | None]:
    """Insert a job (or return the existing one with the same id, payload and owner)."""
    params = _admit_params(new, now, max_queue)
    rows = await _rows(conn, ADMIT_WITH_SECRETS if new.secrets else ADMIT, params)
    if rows:
        job, (event_id,) = _job(rows[0])
        return job, _tr(job, event_id, None, "Request accepted")
    return await _not_admitted(conn, new, max_queue), None


async def create_claimed(
    conn: Conn, new: NewJob, now: float, max_queue: int, owner: str, lease: float, message: str
) -> tuple[Job, list[Transition]]:
    """``create``, the job claimed for preprocess by ``owner`` in the same statement when no
    claimable job of equal or higher priority waits (as the SQLite adapter's). The job as
    accepted (waiting) and the transitions: [accepted] or [accepted, claimed] ([] for an
    existing job)."""
    params = _admit_params(new, now, max_queue)
    params.update(owner=owner, exp=iso(now + lease), message=message)
    rows = await _rows(conn, ADMIT_CLAIMED_WITH_SECRETS if new.secrets else ADMIT_CLAIMED, params)
    if not rows:
        return await _not_admitted(conn, new, max_queue), []
    row = rows[0]
    job, event_ids = _job(row)
    if job.state == State.PENDING:
        return job, [_tr(job, event_ids[0], None, "Request accepted")]
    accepted = Job(row)  # as it was the instant before the claim, for its event
    accepted.state, accepted.lease_owner, accepted.lease_expires_at = State.PENDING, None, None
    accepted.attempts, accepted.message = 0, "Request accepted"
    setattr(accepted, "_timings", "{}")  # noqa: B010 - the raw column's slot: nothing timed yet
    return accepted, [
        _tr(accepted, event_ids[0], None, "Request accepted"),
        _tr(job, event_ids[1], State.PENDING, message),
    ]


async def _not_admitted(conn: Conn, new: NewJob, max_queue: int) -> Job:
    """Nothing inserted: a repeated id (the existing job) or a full queue (raised)."""
    existing = await get(conn, new.id)
    if existing is not None:
        if existing.owner != new.owner:
            # Another key's job: a conflict, whatever its payload (never that key's job itself).
            raise Conflict(
                f"request_id {new.id!r} is already used",
                fields=[{"path": "$.input.request_id", "message": "already used"}],
            )
        if existing.payload_hash != new.payload_hash:
            raise Conflict(
                f"request_id {new.id!r} was already used with a different payload",
                fields=[
                    {
                        "path": "$.input.request_id",
                        "message": "already used with a different payload",
                    }
                ],
            )
        return existing  # a repeated request is answered even when the queue is full
    cur = await conn.execute("SELECT sum(unfinished) AS n FROM queue_stats")
    row = await cur.fetchone()
    waiting = int(row["n"]) if row and row["n"] is not None else 0
    raise QueueFull(f"queue is full ({waiting} unfinished jobs, limit {max_queue}); retry shortly")


async def claim(
    conn: Conn,
    stage: Stage,
    owner: str,
    n: int,
    now: float,
    lease: float,
    message: str,
    prompt_backend: str | None = None,
) -> list[Transition]:
    """Claim up to ``n`` claimable jobs of ``stage`` in one statement, by priority then age
    (``prompt_backend``: see ``JobStore.claim``)."""
    params = {"owner": owner, "exp": iso(now + lease), "now": iso(now), "n": n, "message": message}
    if prompt_backend is not None:
        params["backend"] = prompt_backend
    sql = CLAIM[stage] if prompt_backend is None else CLAIM_ASSIGN[stage]
    rows = await _rows(conn, sql, params)
    out = []
    for row in rows:
        job, (event_id,) = _job(row)
        out.append(_tr(job, event_id, State.PENDING, message))
    out.sort(key=lambda t: (-t.job.priority, t.job.created_at, t.job.id))  # type: ignore[union-attr]
    return out


# --- a held job's transitions ------------------------------------------------------------------


def _field_sets(fields: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if not fields:
        return "", {}
    sets, params = [], {}
    for k, v in fields.items():
        if k not in _SETTABLE:
            raise ValueError(f"column {k} cannot be set this way")
        sets.append(f"{k} = %(f_{k})s")
        params[f"f_{k}"] = dumps(v) if k in _JSON and v is not None else v
    return ", " + ", ".join(sets), params


async def _guarded(
    conn: Conn,
    before: Job,
    owner: str | None,
    sets: str,
    params: dict[str, Any],
    message: str,
    *,
    from_states: tuple[State, ...] = (State.RUNNING,),
    data: Any = None,
) -> Transition:
    """Inside a transaction that locked ``before``'s row: its guarded UPDATE and event, or the
    reason it may not happen."""
    job_id = before.id
    if before.state not in from_states or (owner is not None and before.lease_owner != owner):
        if before.state == State.RUNNING and owner is not None and before.lease_owner != owner:
            raise LeaseLost(f"job {job_id} is no longer held by this worker")
        if State.RUNNING in from_states and owner is not None:
            raise LeaseLost(f"job {job_id} is {before.state}, not running")
        raise IllegalTransition(f"job {job_id} is {before.state}")
    where = " WHERE id = %(id)s AND state = %(from_state)s" + (
        " AND lease_owner = %(owner)s" if owner else ""
    )
    rows = await _rows(
        conn,
        with_events(
            f"UPDATE jobs SET {sets}{where}",
            [("%(from_state)s", "state", "%(event_message)s")],
            data=data is not None,
        ),
        {
            **params,
            "id": job_id,
            "from_state": before.state,
            "owner": owner,
            "event_message": message,
            "data": None if data is None else dumps(data),
        },
    )
    job, (event_id,) = _job(rows[0])
    return _tr(job, event_id, before.state, message, data)


async def _put_outputs(
    conn: Conn, job_id: str, now: float, outputs: list[dict[str, Any]] | None
) -> None:
    for row in outputs or ():
        await put_output(conn, job_id, now, row)


async def advance(
    conn: Conn,
    job_id: str,
    owner: str,
    now: float,
    message: str,
    fields: dict[str, Any] | None = None,
    outputs: list[dict[str, Any]] | None = None,
) -> Transition:
    """End the job's current stage successfully: pending in the next stage, or completed."""
    if "error" not in (fields or ()):  # finishing sets error itself: two assignments would clash
        extra, params = _field_sets(fields)
        also, output_params = outputs_cte(outputs or [])
        params.update(output_params, now=iso(now), message=message, id=job_id, owner=owner)
        # Fast path, one statement: the job, its event and its outputs.
        rows = await _rows(
            conn,
            with_events(ADVANCE + extra + HELD, [("'running'", "state", "%(message)s")], also=also),
            params,
        )
        if rows:
            job, (event_id,) = _job(rows[0])
            return _tr(job, event_id, State.RUNNING, message)
    async with conn.transaction():
        current = await get(conn, job_id, lock=True)
        if current is None:
            raise NotFound(f"job {job_id} not found")
        if current.cancel_requested and current.state == State.RUNNING:
            return await _cancel_running(conn, current, now)
        await _put_outputs(conn, job_id, now, outputs)
        nxt = NEXT_STAGE[current.stage]
        if nxt is None:
            return await _finish(
                conn, current, owner, now, State.COMPLETED, message, None, fields, (State.RUNNING,)
            )
        extra, params = _field_sets(fields)
        params.update(now=iso(now), message=message, next=nxt)
        return await _guarded(
            conn,
            current,
            owner,
            "state = 'pending', stage = %(next)s, lease_owner = NULL, lease_expires_at = NULL,"
            f" message = %(message)s, updated_at = {NOW}, run_after = {NOW},"
            f" timings = {add_timing(STAGE_MS[current.stage])}, stage_entered_at = {NOW}" + extra,
            params,
            message,
        )


async def advance_and_claim(
    conn: Conn,
    job_id: str,
    owner: str,
    now: float,
    message: str,
    fields: dict[str, Any] | None,
    lease: float,
    claim_message: str,
    outputs: list[dict[str, Any]] | None = None,
    claim_fields: dict[str, Any] | None = None,
) -> list[Transition]:
    """Finish a stage and, in the same statement, claim the job for its next stage (both events
    written, as two transitions would); ``claim_fields`` are set only by this one statement."""
    if "error" not in (fields or ()):
        row_message = claim_message
        hand_fields = fields
        if claim_fields:
            claim_fields = dict(claim_fields)
            row_message = claim_fields.pop("message", claim_message)
            hand_fields = {**(fields or {}), **claim_fields}
        extra, params = _field_sets(hand_fields)
        also, output_params = outputs_cte(outputs or [])
        params.update(
            output_params,
            now=iso(now),
            message=message,
            claim_message=claim_message,
            row_message=row_message,
            id=job_id,
            owner=owner,
            exp=iso(now + lease),
        )
        sql = with_events(
            HAND_OFF.replace("message = %(message)s", "message = %(row_message)s")
            + extra
            + HELD
            + " AND stage IN ('preprocess', 'generate')",
            [
                ("'running'", "'pending'", "%(message)s"),
                ("'pending'", "state", "%(claim_message)s"),
            ],
            also=also,
        )
        rows = await _rows(conn, sql, params)
        if rows:
            claimed, (wait_id, claim_id) = _job(rows[0])
            waiting = Job(rows[0])
            waiting.state, waiting.lease_owner, waiting.lease_expires_at = State.PENDING, None, None
            waiting.message = message
            return [
                _tr(waiting, wait_id, State.RUNNING, message),
                _tr(claimed, claim_id, State.PENDING, claim_message),
            ]
    done = await advance(conn, job_id, owner, now, message, fields, outputs)
    if done.to_state != State.PENDING:
        return [done]
    rows = await _rows(
        conn,
        CLAIM_ONE,
        {
            "owner": owner,
            "exp": iso(now + lease),
            "now": iso(now),
            "id": job_id,
            "message": claim_message,
        },
    )
    if not rows:
        return [done]
    job, (event_id,) = _job(rows[0])
    return [done, _tr(job, event_id, State.PENDING, claim_message)]


async def _finish(
    conn: Conn,
    current: Job,
    owner: str | None,
    now: float,
    state: State,
    message: str,
    error: dict[str, Any] | None,
    fields: dict[str, Any] | None,
    from_states: tuple[State, ...],
) -> Transition:
    """Inside a transaction that locked ``current``: move it to a terminal state."""
    extra, params = _field_sets(fields)
    params.update(
        now=iso(now), message=message, state=state, error=None if error is None else dumps(error)
    )
    timing = add_timing(STAGE_MS[current.stage]) if current.state == State.RUNNING else "timings"
    tr = await _guarded(
        conn,
        current,
        owner,
        "state = %(state)s, lease_owner = NULL, lease_expires_at = NULL, message = %(message)s,"
        f" updated_at = {NOW}, finished_at = {NOW}, error = %(error)s::json,"
        f" cancel_requested = false, timings = jsonb_set({timing}, '{{total_ms}}',"
        f" to_jsonb({ms_since('created_at')})), stage_entered_at = {NOW}" + extra,
        params,
        message,
        from_states=from_states,
        data=error and {"error": error},
    )
    return tr  # the trigger jobs_secrets_forget dropped its secrets


async def finish(
    conn: Conn,
    job_id: str,
    owner: str | None,
    now: float,
    state: State,
    message: str,
    *,
    error: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
    from_states: tuple[State, ...] = (State.RUNNING,),
) -> Transition:
    """Move the job to a terminal state (completed, failed, cancelled)."""
    async with conn.transaction():
        current = await get(conn, job_id, lock=True)
        if current is None:
            raise NotFound(f"job {job_id} not found")
        return await _finish(conn, current, owner, now, state, message, error, fields, from_states)


async def _cancel_running(conn: Conn, job: Job, now: float) -> Transition:
    return await _finish(
        conn,
        job,
        job.lease_owner,
        now,
        State.CANCELLED,
        CANCELLED["message"],
        CANCELLED,
        None,
        (State.RUNNING,),
    )


async def retry_later(
    conn: Conn, job_id: str, owner: str, now: float, delay: float, error: dict[str, Any]
) -> Transition:
    """A retryable failure: pending again in its stage after ``delay``, or failed when spent."""
    async with conn.transaction():
        current = await get(conn, job_id, lock=True)
        if current is None:
            raise NotFound(f"job {job_id} not found")
        if current.cancel_requested and current.state == State.RUNNING:
            return await _cancel_running(conn, current, now)
        if current.attempts >= current.max_attempts:
            msg = f"Failed after {current.attempts} attempt(s): {error.get('message', '')}"
            return await _finish(
                conn, current, owner, now, State.FAILED, msg, error, None, (State.RUNNING,)
            )
        msg = f"Attempt {current.attempts} failed ({error.get('type')}); retrying in {delay:.1f}s"
        return await _guarded(
            conn,
            current,
            owner,
            "state = 'pending', lease_owner = NULL, lease_expires_at = NULL,"
            " attempts = attempts + 1, message = %(message)s,"
            f" updated_at = {NOW}, run_after = %(run_after)s::timestamptz,"
            f" timings = {add_timing(STAGE_MS[current.stage])}, stage_entered_at = {NOW}",
            {"now": iso(now), "message": msg, "run_after": iso(now + delay)},
            msg,
            data={"error": error},
        )


async def release(conn: Conn, job_id: str, owner: str, now: float, message: str) -> Transition:
    """Give a running job back to its stage's queue without counting an attempt (shutdown)."""
    async with conn.transaction():
        current = await get(conn, job_id, lock=True)
        if current is None:
            raise NotFound(f"job {job_id} not found")
        return await _guarded(
            conn,
            current,
            owner,
            "state = 'pending', lease_owner = NULL, lease_expires_at = NULL,"
            f" message = %(message)s, updated_at = {NOW}, run_after = {NOW},"
            f" timings = {add_timing(STAGE_MS[current.stage])}, stage_entered_at = {NOW}",
            {"now": iso(now), "message": message},
            message,
        )


async def update(conn: Conn, job_id: str, owner: str, now: float, fields: dict[str, Any]) -> Job:
    """Set columns of a running job this worker holds (prompt id, backend, result...); no event."""
    extra, params = _field_sets(fields)
    params.update(now=iso(now), id=job_id, owner=owner)
    rows = await _rows(
        conn,
        f"UPDATE jobs SET updated_at = {NOW}"
        + extra
        + " WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s RETURNING *",
        params,
    )
    if rows:
        return Job(rows[0])
    current = await get(conn, job_id)
    if current is None:
        raise NotFound(f"job {job_id} not found")
    if current.state == State.RUNNING:
        raise LeaseLost(f"job {job_id} is no longer held by this worker")
    raise LeaseLost(f"job {job_id} is {current.state}, not running")


async def renew(conn: Conn, owner: str, now: float, lease: float) -> int:
    """Extend the lease of every job this process holds; return how many."""
    cur = await conn.execute(
        "UPDATE jobs SET lease_expires_at = %s::timestamptz"
        " WHERE lease_owner = %s AND state = 'running'",
        (iso(now + lease), owner),
    )
    return cur.rowcount


async def request_cancel(conn: Conn, job_id: str, now: float) -> tuple[Job, Transition | None]:
    """Cancel a waiting job at once; mark a running one for its worker; leave a finished one."""
    async with conn.transaction():
        job = await get(conn, job_id, lock=True)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.state == State.PENDING:
            tr = await _finish(
                conn,
                job,
                None,
                now,
                State.CANCELLED,
                CANCELLED["message"],
                CANCELLED,
                None,
                (State.PENDING,),
            )
            return job, tr
        if job.state == State.RUNNING and not job.cancel_requested:
            await conn.execute(
                "UPDATE jobs SET cancel_requested = true, updated_at = %s::timestamptz"
                " WHERE id = %s",
                (iso(now), job_id),
            )
            job.cancel_requested = True
        return job, None


# --- rescue, retry, prune ---------------------------------------------------------------------


async def _rescue(conn: Conn, job: Job, now: float, *, counts_attempt: bool) -> Transition:
    if job.cancel_requested:
        return await _cancel_running(conn, job, now)
    if counts_attempt and job.attempts >= job.max_attempts:
        err = {
            "type": "lease_expired",
            "message": f"worker lost the job in {job.stage} {job.attempts} time(s)",
        }
        return await _finish(
            conn,
            job,
            job.lease_owner,
            now,
            State.FAILED,
            err["message"],
            err,
            None,
            (State.RUNNING,),
        )
    msg = (
        f"Lease expired in {job.stage}; requeued"
        if counts_attempt
        else f"Resumed in {job.stage} after a restart"
    )
    bump = "attempts = attempts + 1," if counts_attempt else ""
    return await _guarded(
        conn,
        job,
        job.lease_owner,
        f"state = 'pending', lease_owner = NULL, lease_expires_at = NULL, {bump}"
        f" message = %(message)s, updated_at = {NOW}, run_after = {NOW},"
        f" timings = {add_timing(STAGE_MS[job.stage])}, stage_entered_at = {NOW}",
        {"now": iso(now), "message": msg},
        msg,
    )


async def reap(conn: Conn, now: float, grace: float, limit: int = 500) -> list[Transition]:
    """Requeue or fail jobs whose lease expired (whichever instance held them); fail jobs past
    their deadline. Rows another instance's reaper is handling are skipped, not waited for."""
    t = iso(now)
    out: list[Transition] = []
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT * FROM jobs WHERE state = 'running' AND lease_expires_at < %s::timestamptz"
            " ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (t, limit),
        )
        for row in await cur.fetchall():
            out.append(await _rescue(conn, Job(row), now, counts_attempt=True))
        cutoff = iso(now - grace)
        cur = await conn.execute(
            "SELECT * FROM jobs WHERE state IN ('pending', 'running')"
            " AND deadline_at < %s::timestamptz LIMIT %s FOR UPDATE SKIP LOCKED",
            (cutoff, limit),
        )
        for row in await cur.fetchall():
            job = Job(row)
            err = {"type": "timeout", "message": "job deadline passed"}
            out.append(
                await _finish(
                    conn,
                    job,
                    job.lease_owner,
                    now,
                    State.FAILED,
                    "Job timed out",
                    err,
                    None,
                    (job.state,),
                )
            )
    return out


async def recover(conn: Conn, owner: str, now: float, others: list[str]) -> list[Transition]:
    """Jobs left running by the given dead lease owners go back to their stage, no attempt
    counted. (A shared database cannot tell a dead owner from a live one by itself: the caller
    names them; expired leases are the reaper's.)"""
    if not others:
        return []
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT * FROM jobs WHERE state = 'running' AND lease_owner = ANY(%s)"
            " AND lease_owner <> %s FOR UPDATE SKIP LOCKED",
            (others, owner),
        )
        return [
            await _rescue(conn, Job(row), now, counts_attempt=False) for row in await cur.fetchall()
        ]


async def retry_job(conn: Conn, job_id: str, now: float) -> Transition:
    """Run a failed or cancelled job again from the start (``comfyq jobs retry``)."""
    async with conn.transaction():
        job = await get(conn, job_id, lock=True)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.state not in (State.FAILED, State.CANCELLED):
            raise IllegalTransition(
                f"job {job_id} is {job.state}; only failed or cancelled jobs can be retried"
            )
        span = parse_iso(job.deadline_at) - parse_iso(job.created_at)
        rows = await _rows(
            conn,
            with_events(
                "UPDATE jobs SET state = 'pending', stage = 'preprocess', attempts = 0,"
                " error = NULL, finished_at = NULL, comfy_prompt_id = NULL, comfy_backend = NULL,"
                " prepared = NULL, result = NULL, message = 'Retry requested',"
                f" updated_at = {NOW}, run_after = {NOW}, stage_entered_at = {NOW},"
                " deadline_at = %(deadline)s::timestamptz, timings = '{}' WHERE id = %(id)s",
                [("%(from_state)s", "state", "'Retry requested'")],
            ),
            {
                "now": iso(now),
                "deadline": iso(now + max(60.0, span)),
                "id": job_id,
                "from_state": job.state,
            },
        )
        await conn.execute("DELETE FROM outputs WHERE job_id = %s", (job_id,))
    row, (event_id,) = _job(rows[0])
    return _tr(row, event_id, job.state, "Retry requested")


# pg_try_advisory_xact_lock key of pruning: one instance prunes at a time, the others skip.
PRUNE_LOCK = 0x6371_7072


async def delete_finished(conn: Conn, job_id: str) -> bool:
    """Delete one finished job (its events, outputs and deliveries go with it by cascade)."""
    async with conn.transaction():
        rows = await _rows(
            conn,
            "DELETE FROM jobs WHERE id = %(id)s AND finished_at IS NOT NULL RETURNING id",
            {"id": job_id},
        )
    return bool(rows)


async def prune(conn: Conn, before: float, limit: int = 500) -> list[str]:
    """Delete up to ``limit`` jobs that finished before ``before``; return their ids (none when
    another instance is pruning right now)."""
    async with conn.transaction():
        cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS mine", (PRUNE_LOCK,))
        row = await cur.fetchone()
        if row is None or not row["mine"]:
            return []
        rows = await _rows(
            conn,
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL"
            " AND finished_at < %(before)s::timestamptz ORDER BY finished_at LIMIT %(n)s"
            " FOR UPDATE SKIP LOCKED) RETURNING id",
            {"before": iso(before), "n": limit},
        )
    return [r["id"] for r in rows]


async def put_output(conn: Conn, job_id: str, now: float, row: dict[str, Any]) -> None:
    """Record (or replace, when a stage runs again) one output file of a job."""
    cols = [c for c in OUTPUT_COLS if c in row]
    await conn.execute(
        f"INSERT INTO outputs (job_id, created_at, {', '.join(cols)})"
        f" VALUES (%s, %s::timestamptz, {', '.join(['%s'] * len(cols))})"
        f" ON CONFLICT (job_id, filename) DO UPDATE SET"
        f" {', '.join(map(keep_asset_id, cols))}",
        (job_id, iso(now), *(row[c] for c in cols)),
    )
