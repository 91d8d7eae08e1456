"""Write operations: each is ``fn(conn, ...)`` run by the writer inside one group transaction.

Every state change is a guarded UPDATE (``WHERE id = ? AND state = ? [AND lease_owner = ?]``)
whose row count is checked, plus its ``job_events`` row, in the same transaction. The schema's
trigger refuses any transition the state machine does not list. The hot transitions (a stage's
end, a hand-off, an update, an admission) are one UPDATE or INSERT in the usual case; only when
that matches nothing do they read the row, to say why.
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from comfyq.clock import parse_iso
from comfyq.errors import Conflict, IllegalTransition, LeaseLost, NotFound, QueueFull
from comfyq.store.model import (
    NEXT_STAGE,
    STAGE_MS,
    Job,
    NewJob,
    Stage,
    State,
    Transition,
    dumps,
)
from comfyq.store.sqlite.journal import PLAIN
from comfyq.store.sqlite.journal import event as _event
from comfyq.store.sqlite.journal import events as _events
from comfyq.store.sqlite.journal import stamp as _iso
from comfyq.store.sqlite.sql import (
    ADVANCE,
    FIRST_CLAIMABLE,
    HAND_OFF,
    HELD,
    add_timing,
    claim_assign_sql,
    claim_one_assign_sql,
    claim_sql,
    ms_since,
)

CANCELLED = {"type": "cancelled", "message": "Request cancelled by client"}


def _one(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> Job | None:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else Job.from_row(row)


def get(conn: sqlite3.Connection, job_id: str) -> Job | None:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else Job.from_row(row)


def _existing(conn: sqlite3.Connection, new: NewJob) -> Job | None:
    existing = get(conn, new.id)
    if existing is not None and existing.owner != new.owner:
        # Another key's job: a conflict, whatever its payload (never that key's job itself).
        raise Conflict(
            f"request_id {new.id!r} is already used",
            fields=[{"path": "$.input.request_id", "message": "already used"}],
        )
    if existing is not None and existing.payload_hash != new.payload_hash:
        raise Conflict(
            f"request_id {new.id!r} was already used with a different payload",
            fields=[
                {"path": "$.input.request_id", "message": "already used with a different payload"}
            ],
        )
    return existing


_ADMIT = (
    "INSERT INTO jobs (id, priority, max_attempts, kind, payload, payload_hash,"
    " message, run_after, deadline_at, created_at, updated_at, stage_entered_at, owner)"
    " SELECT :id, :priority, :max_attempts, :kind, :payload, :hash, 'Request accepted', :now,"
    " :deadline, :now, :now, :now, :owner"
    " WHERE (SELECT unfinished FROM queue_stats WHERE id = 1) < :max"
    " ON CONFLICT (id) DO NOTHING RETURNING *"
)
# The same, claimed at once by an idle preprocess worker of this process (``go``) unless a
# claimable job of equal or higher priority waits (it is ahead in claim order, and the claimer
# is about to take it): as ``claim`` would write it right after, with 0 ms queued.
_ADMIT_CLAIMED = (
    "INSERT INTO jobs (id, priority, max_attempts, kind, payload, payload_hash,"
    " message, run_after, deadline_at, created_at, updated_at, stage_entered_at, owner,"
    " state, lease_owner, lease_expires_at, attempts, timings)"
    " SELECT :id, :priority, :max_attempts, :kind, :payload, :hash,"
    " CASE WHEN go THEN :message ELSE 'Request accepted' END, :now,"
    " :deadline, :now, :now, :now, :owner,"
    " CASE WHEN go THEN 'running' ELSE 'pending' END, CASE WHEN go THEN :lease_owner END,"
    " CASE WHEN go THEN :exp END, go, CASE WHEN go THEN '{\"queued_ms\":0.0}' ELSE '{}' END"
    " FROM (SELECT NOT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_claim WHERE state = 'pending'"
    " AND stage = 'preprocess' AND priority >= :priority AND run_after <= :now) AS go)"
    " WHERE (SELECT unfinished FROM queue_stats WHERE id = 1) < :max"
    " ON CONFLICT (id) DO NOTHING RETURNING *"
)


def _admit_params(new: NewJob, now: float, max_queue: int) -> dict[str, Any]:
    t = _iso(now)
    return {
        "id": new.id,
        "priority": new.priority,
        "max_attempts": new.max_attempts,
        "kind": new.kind,
        "payload": dumps(new.payload),
        "hash": new.payload_hash,
        "now": t,
        "deadline": _iso(now + new.timeout),
        "max": max_queue,
        "owner": new.owner,
    }


def _not_admitted(conn: sqlite3.Connection, new: NewJob, max_queue: int) -> Job:
    """Nothing inserted: a repeated id (the existing job) or a full queue (raised)."""
    existing = _existing(conn, new)  # a repeated request is answered even when the queue is full
    if existing is not None:
        return existing
    (waiting,) = conn.execute("SELECT unfinished FROM queue_stats WHERE id = 1").fetchone()
    raise QueueFull(f"queue is full ({waiting} unfinished jobs, limit {max_queue}); retry shortly")


def create(
    conn: sqlite3.Connection, new: NewJob, now: float, max_queue: int
) -> tuple[Job, Transition | None]:
    """Insert a job (or return the existing one with the same id and payload)."""
    # One statement in the usual case: the queue limit is checked by the INSERT itself. Nothing
    # inserted means a full queue or a repeated id; both are told apart below.
    job = _one(conn, _ADMIT, _admit_params(new, now, max_queue))
    if job is None:
        return _not_admitted(conn, new, max_queue), None
    if new.secrets:
        conn.execute(
            "INSERT INTO job_secrets (job_id, data) VALUES (?, ?)", (new.id, dumps(new.secrets))
        )
    return job, _event(conn, job, None, "Request accepted")


def create_claimed(
    conn: sqlite3.Connection,
    new: NewJob,
    now: float,
    max_queue: int,
    owner: str,
    lease: float,
    message: str,
) -> tuple[Job, list[Transition]]:
    """``create``, the job claimed for preprocess by ``owner`` in the same statement when no
    claimable job of equal or higher priority waits (a crash after the commit leaves a job
    claimed by a dead process: ``recover``/``reap`` requeue it as any claimed job). The job as
    accepted (waiting) and the transitions: [accepted] or [accepted, claimed] ([] for an
    existing job)."""
    params = _admit_params(new, now, max_queue)
    params.update(lease_owner=owner, exp=_iso(now + lease), message=message)
    row = conn.execute(_ADMIT_CLAIMED, params).fetchone()
    if row is None:
        return _not_admitted(conn, new, max_queue), []
    if new.secrets:
        conn.execute(
            "INSERT INTO job_secrets (job_id, data) VALUES (?, ?)", (new.id, dumps(new.secrets))
        )
    job = Job.from_row(row)
    if job.state == State.PENDING:
        return job, [_event(conn, job, None, "Request accepted")]
    accepted = Job.from_row(row)  # as it was the instant before the claim, for its event
    accepted.state, accepted.lease_owner, accepted.lease_expires_at = State.PENDING, None, None
    accepted.attempts, accepted.message = 0, "Request accepted"
    setattr(accepted, "_timings", "{}")  # noqa: B010 - the raw column's slot: nothing timed yet
    return accepted, _events(
        conn, [(accepted, None, "Request accepted"), (job, State.PENDING, message)]
    )


def claim(
    conn: sqlite3.Connection,
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
    params = {
        "owner": owner,
        "exp": _iso(now + lease),
        "now": _iso(now),
        "stage": PLAIN.get(stage, stage),
        "n": n,
        "message": message,
    }
    if prompt_backend is not None:
        params["backend"] = prompt_backend
        if n == 1:
            params["pid"] = str(uuid.uuid4())
            sql = claim_one_assign_sql(stage)
        else:
            sql = claim_assign_sql(stage)
    elif n == 1:
        sql = claim_sql(stage, FIRST_CLAIMABLE)
    else:
        sql = claim_sql(
            stage,
            "id IN (SELECT id FROM jobs WHERE state = 'pending' AND stage = :stage"
            " AND run_after <= :now ORDER BY priority DESC, created_at, id LIMIT :n)",
        )
    rows = conn.execute(sql, params).fetchall()
    if not rows:
        return []
    if len(rows) == 1:
        return [_event(conn, Job.from_row(rows[0]), State.PENDING, message)]
    jobs = sorted(map(Job.from_row, rows), key=lambda j: (-j.priority, j.created_at, j.id))
    return _events(conn, [(j, State.PENDING, message) for j in jobs])


def _guarded(
    conn: sqlite3.Connection,
    job_id: str,
    owner: str | None,
    sets: str,
    params: dict[str, Any],
    *,
    from_states: tuple[State, ...] = (State.RUNNING,),
    before: Job | None = None,
) -> tuple[Job, State]:
    """Run a guarded UPDATE of one job; raise LeaseLost/IllegalTransition if it matches nothing."""
    before = before or get(conn, job_id)
    if before is None:
        raise NotFound(f"job {job_id} not found")
    if before.state not in from_states or (owner is not None and before.lease_owner != owner):
        if before.state == State.RUNNING and owner is not None and before.lease_owner != owner:
            raise LeaseLost(f"job {job_id} is no longer held by this worker")
        if State.RUNNING in from_states and owner is not None:
            raise LeaseLost(f"job {job_id} is {before.state}, not running")
        raise IllegalTransition(f"job {job_id} is {before.state}")
    where = "id = :id AND state = :from_state" + (" AND lease_owner = :owner" if owner else "")
    try:
        job = _one(
            conn,
            f"UPDATE jobs SET {sets} WHERE {where} RETURNING *",
            {
                **params,
                "id": job_id,
                "from_state": PLAIN.get(before.state, before.state),
                "owner": owner,
            },
        )
    except sqlite3.IntegrityError as exc:
        raise IllegalTransition(f"job {job_id}: {exc}") from exc
    assert job is not None  # same transaction as the read above
    return job, before.state


def advance(
    conn: sqlite3.Connection,
    job_id: str,
    owner: str,
    now: float,
    message: str,
    fields: dict[str, Any] | None = None,
    outputs: list[dict[str, Any]] | None = None,
) -> Transition:
    """End the job's current stage successfully: pending in the next stage, or completed."""
    for row in outputs or ():
        put_output(conn, job_id, now, row)
    extra, params = _field_sets(fields)
    if "error" not in (fields or ()):  # finishing sets error itself: two assignments would clash
        params.update(now=_iso(now), message=message, id=job_id, owner=owner)
        # Fast path, one statement: a held, uncancelled job in any stage.
        row = conn.execute(ADVANCE + extra + HELD + " RETURNING *", params).fetchone()
        if row is not None:
            job = Job.from_row(row)
            if job.state == State.COMPLETED:
                conn.execute("DELETE FROM job_secrets WHERE job_id = ?", (job_id,))
            return _event(conn, job, State.RUNNING, message)
    current = get(conn, job_id)
    if current is None:
        raise NotFound(f"job {job_id} not found")
    if current.cancel_requested:
        return _cancel_running(conn, current, now)
    nxt = NEXT_STAGE[current.stage]
    extra, params = _field_sets(fields)
    params.update(now=_iso(now), message=message)
    if nxt is None:
        return finish(
            conn, job_id, owner, now, State.COMPLETED, message, fields=fields, current=current
        )
    params["next"] = PLAIN.get(nxt, nxt)
    job, prev = _guarded(
        conn,
        job_id,
        owner,
        "state = 'pending', stage = :next, lease_owner = NULL, lease_expires_at = NULL,"
        f" message = :message, updated_at = :now, run_after = :now,"
        f" timings = {add_timing(STAGE_MS[current.stage])}, stage_entered_at = :now" + extra,
        params,
        before=current,
    )
    return _event(conn, job, prev, message)


def advance_and_claim(
    conn: sqlite3.Connection,
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
    """Finish a stage and, in the same transaction, claim the job for its next stage (hand-off to
    an idle worker of that stage: one commit instead of two, both events still written).
    ``claim_fields`` are set only by the one-statement hand-off (see ``JobStore``)."""
    if "error" not in (fields or ()):
        for row in outputs or ():
            put_output(conn, job_id, now, row)
        row_message = claim_message
        hand_fields = fields
        if claim_fields:
            claim_fields = dict(claim_fields)
            row_message = claim_fields.pop("message", claim_message)
            hand_fields = {**(fields or {}), **claim_fields}
        extra, params = _field_sets(hand_fields)
        t = _iso(now)
        params.update(now=t, message=row_message, id=job_id, owner=owner, exp=_iso(now + lease))
        # Fast path: the stage's end and the next stage's claim in one UPDATE. The row passes
        # through 'pending' only inside this transaction, so nobody could have seen it there;
        # both events are written, with the same instant, as two separate statements would.
        row = conn.execute(
            HAND_OFF + extra + HELD + " AND stage IN ('preprocess', 'generate') RETURNING *", params
        ).fetchone()
        if row is not None:
            claimed = Job.from_row(row)
            waiting = Job.from_row(row)
            waiting.state, waiting.lease_owner, waiting.lease_expires_at = State.PENDING, None, None
            waiting.message = message
            return _events(
                conn, [(waiting, State.RUNNING, message), (claimed, State.PENDING, claim_message)]
            )
        outputs = None  # already written above
    done = advance(conn, job_id, owner, now, message, fields, outputs)
    if done.to_state != State.PENDING:
        return [done]
    row = conn.execute(
        claim_sql(
            done.stage, "id = :id AND state = 'pending' AND stage = :stage AND run_after <= :now"
        ),
        {
            "owner": owner,
            "exp": _iso(now + lease),
            "now": _iso(now),
            "stage": PLAIN.get(done.stage, done.stage),
            "id": job_id,
            "message": claim_message,
        },
    ).fetchone()
    if row is None:
        return [done]
    return [done, _event(conn, Job.from_row(row), State.PENDING, claim_message)]


def finish(
    conn: sqlite3.Connection,
    job_id: str,
    owner: str | None,
    now: float,
    state: State,
    message: str,
    *,
    error: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
    from_states: tuple[State, ...] = (State.RUNNING,),
    current: Job | None = None,
) -> Transition:
    """Move the job to a terminal state (completed, failed, cancelled)."""
    current = current or get(conn, job_id)
    if current is None:
        raise NotFound(f"job {job_id} not found")
    extra, params = _field_sets(fields)
    params.update(
        now=_iso(now),
        message=message,
        state=PLAIN.get(state, state),
        error=None if error is None else dumps(error),
    )
    timing = add_timing(STAGE_MS[current.stage]) if current.state == State.RUNNING else "timings"
    job, prev = _guarded(
        conn,
        job_id,
        owner,
        "state = :state, lease_owner = NULL, lease_expires_at = NULL, message = :message,"
        " updated_at = :now, finished_at = :now, error = :error, cancel_requested = 0,"
        f" timings = json_set({timing}, '$.total_ms', {ms_since('created_at', ':now')}),"
        " stage_entered_at = :now" + extra,
        params,
        from_states=from_states,
        before=current,
    )
    conn.execute("DELETE FROM job_secrets WHERE job_id = ?", (job_id,))
    return _event(conn, job, prev, message, error and {"error": error})


def retry_later(
    conn: sqlite3.Connection,
    job_id: str,
    owner: str,
    now: float,
    delay: float,
    error: dict[str, Any],
) -> Transition:
    """A retryable failure: pending again in its stage after ``delay``, or failed when spent."""
    current = get(conn, job_id)
    if current is None:
        raise NotFound(f"job {job_id} not found")
    if current.cancel_requested:
        return _cancel_running(conn, current, now)
    if current.attempts >= current.max_attempts:
        msg = f"Failed after {current.attempts} attempt(s): {error.get('message', '')}"
        return finish(conn, job_id, owner, now, State.FAILED, msg, error=error)
    msg = f"Attempt {current.attempts} failed ({error.get('type')}); retrying in {delay:.1f}s"
    job, prev = _guarded(
        conn,
        job_id,
        owner,
        "state = 'pending', lease_owner = NULL, lease_expires_at = NULL, attempts = attempts + 1,"
        " message = :message, updated_at = :now, run_after = :run_after,"
        f" timings = {add_timing(STAGE_MS[current.stage])}, stage_entered_at = :now",
        {"now": _iso(now), "message": msg, "run_after": _iso(now + delay)},
        before=current,
    )
    return _event(conn, job, prev, msg, {"error": error})


def release(
    conn: sqlite3.Connection, job_id: str, owner: str, now: float, message: str
) -> Transition:
    """Give a running job back to its stage's queue without counting an attempt (shutdown)."""
    current = get(conn, job_id)
    if current is None:
        raise NotFound(f"job {job_id} not found")
    job, prev = _guarded(
        conn,
        job_id,
        owner,
        "state = 'pending', lease_owner = NULL, lease_expires_at = NULL, message = :message,"
        f" updated_at = :now, run_after = :now, timings = {add_timing(STAGE_MS[current.stage])},"
        " stage_entered_at = :now",
        {"now": _iso(now), "message": message},
        before=current,
    )
    return _event(conn, job, prev, message)


def update(
    conn: sqlite3.Connection, job_id: str, owner: str, now: float, fields: dict[str, Any]
) -> Job:
    """Set columns of a running job this worker holds (prompt id, backend, result...); no event."""
    extra, params = _field_sets(fields)
    params.update(now=_iso(now), id=job_id, owner=owner)
    try:  # one statement when the job is held; the guarded path explains why it is not
        row = conn.execute(
            "UPDATE jobs SET updated_at = :now"
            + extra
            + " WHERE id = :id AND state = 'running' AND lease_owner = :owner RETURNING *",
            params,
        ).fetchone()
    except sqlite3.IntegrityError as exc:
        raise IllegalTransition(f"job {job_id}: {exc}") from exc
    if row is not None:
        return Job.from_row(row)
    job, _ = _guarded(conn, job_id, owner, "updated_at = :now" + extra, params)
    return job


_SETTABLE = {"prepared", "result", "comfy_prompt_id", "comfy_backend", "message", "error"}
_JSON = {"prepared", "result", "error"}


def _field_sets(fields: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if not fields:
        return "", {}
    sets, params = [], {}
    for k, v in fields.items():
        if k not in _SETTABLE:
            raise ValueError(f"column {k} cannot be set this way")
        sets.append(f"{k} = :f_{k}")
        params[f"f_{k}"] = dumps(v) if k in _JSON and v is not None else v
    return ", " + ", ".join(sets), params


def renew(conn: sqlite3.Connection, owner: str, now: float, lease: float) -> int:
    """Extend the lease of every job this process holds; return how many."""
    return conn.execute(
        "UPDATE jobs SET lease_expires_at = ? WHERE lease_owner = ? AND state = 'running'",
        (_iso(now + lease), owner),
    ).rowcount


def request_cancel(
    conn: sqlite3.Connection, job_id: str, now: float
) -> tuple[Job, Transition | None]:
    """Cancel a waiting job at once; mark a running one for its worker; leave a finished one."""
    job = get(conn, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if job.state == State.PENDING:
        return job, finish(
            conn,
            job_id,
            None,
            now,
            State.CANCELLED,
            CANCELLED["message"],
            error=CANCELLED,
            from_states=(State.PENDING,),
        )
    if job.state == State.RUNNING and not job.cancel_requested:
        conn.execute(
            "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (_iso(now), job_id)
        )
        job.cancel_requested = True
    return job, None


def reap(conn: sqlite3.Connection, now: float, owner: str, grace: float) -> list[Transition]:
    """Requeue or fail jobs whose lease expired; fail jobs past their deadline."""
    t = _iso(now)
    out: list[Transition] = []
    expired = conn.execute(
        "SELECT * FROM jobs WHERE state = 'running' AND lease_expires_at < ?", (t,)
    ).fetchall()
    for row in map(Job.from_row, expired):
        out.append(_rescue(conn, row, now, counts_attempt=True))
    # One query per state so each reads its partial index, not the whole (mostly finished) table.
    cutoff = _iso(now - grace)
    overdue = conn.execute(
        "SELECT id, state, lease_owner FROM jobs WHERE state = 'pending' AND deadline_at < ?"
        " UNION ALL SELECT id, state,"
        " lease_owner FROM jobs WHERE state = 'running' AND deadline_at < ?",
        (cutoff, cutoff),
    ).fetchall()
    for job_id, state, lease_owner in overdue:
        err = {"type": "timeout", "message": "job deadline passed"}
        out.append(
            finish(
                conn,
                job_id,
                lease_owner,
                now,
                State.FAILED,
                "Job timed out",
                error=err,
                from_states=(State(state),),
            )
        )
    return out


def recover(conn: sqlite3.Connection, owner: str, now: float) -> list[Transition]:
    """At start: jobs a dead process left running go back to their stage (no attempt counted)."""
    rows = conn.execute(
        "SELECT * FROM jobs WHERE state = 'running' AND lease_owner <> ?", (owner,)
    ).fetchall()
    return [_rescue(conn, Job.from_row(r), now, counts_attempt=False) for r in rows]


def _cancel_running(conn: sqlite3.Connection, job: Job, now: float) -> Transition:
    return finish(
        conn, job.id, job.lease_owner, now, State.CANCELLED, CANCELLED["message"], error=CANCELLED
    )


def _rescue(conn: sqlite3.Connection, job: Job, now: float, *, counts_attempt: bool) -> Transition:
    if job.cancel_requested:
        return _cancel_running(conn, job, now)
    if counts_attempt and job.attempts >= job.max_attempts:
        err = {
            "type": "lease_expired",
            "message": f"worker lost the job in {job.stage} {job.attempts} time(s)",
        }
        return finish(conn, job.id, job.lease_owner, now, State.FAILED, err["message"], error=err)
    msg = (
        f"Lease expired in {job.stage}; requeued"
        if counts_attempt
        else f"Resumed in {job.stage} after a restart"
    )
    bump = "attempts = attempts + 1," if counts_attempt else ""
    row, prev = _guarded(
        conn,
        job.id,
        job.lease_owner,
        "state = 'pending', lease_owner = NULL, lease_expires_at = NULL,"
        f" {bump} message = :message,"
        f" updated_at = :now, run_after = :now, timings = {add_timing(STAGE_MS[job.stage])},"
        " stage_entered_at = :now",
        {"now": _iso(now), "message": msg},
        before=job,
    )
    return _event(conn, row, prev, msg)


def retry_job(conn: sqlite3.Connection, job_id: str, now: float) -> Transition:
    """Run a failed or cancelled job again from the start (``comfyq jobs retry``)."""
    job = get(conn, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if job.state not in (State.FAILED, State.CANCELLED):
        raise IllegalTransition(
            f"job {job_id} is {job.state}; only failed or cancelled jobs can be retried"
        )
    t = _iso(now)
    deadline = now + max(60.0, _deadline_span(job))
    row = _one(
        conn,
        "UPDATE jobs SET state = 'pending', stage = 'preprocess', attempts = 0, error = NULL,"
        " finished_at = NULL, comfy_prompt_id = NULL, comfy_backend = NULL, prepared = NULL,"
        " result = NULL, message = 'Retry requested', updated_at = :now, run_after = :now,"
        " stage_entered_at = :now, deadline_at = :deadline,"
        " timings = '{}' WHERE id = :id RETURNING *",
        {"now": t, "deadline": _iso(deadline), "id": job_id},
    )
    assert row is not None
    conn.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
    return _event(conn, row, job.state, "Retry requested")


def _deadline_span(job: Job) -> float:
    return parse_iso(job.deadline_at) - parse_iso(job.created_at)


def delete_finished(conn: sqlite3.Connection, job_id: str) -> bool:
    """Delete one finished job (its events, outputs and deliveries go with it by cascade)."""
    row = conn.execute(
        "DELETE FROM jobs WHERE id = ? AND finished_at IS NOT NULL RETURNING id", (job_id,)
    ).fetchone()
    return row is not None


def prune(conn: sqlite3.Connection, before: float, limit: int = 500) -> list[str]:
    """Delete up to ``limit`` jobs that finished before ``before``; return their ids."""
    rows = conn.execute(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL"
        " AND finished_at < ? ORDER BY finished_at LIMIT ?) RETURNING id",
        (_iso(before), limit),
    ).fetchall()
    return [r[0] for r in rows]


_OUTPUT_COLS = (
    "filename",
    "node_id",
    "output_type",
    "comfy_type",
    "subfolder",
    "mimetype",
    "size",
    "sha256",
    "local_path",
    "url",
    "upload_error",
    "error",
    "asset_id",
    "blake3",
)


def _keep_asset_id(col: str) -> str:
    # A file recorded again (the stage ran again) keeps the asset id clients may already hold.
    if col == "asset_id":
        return "asset_id = coalesce(outputs.asset_id, excluded.asset_id)"
    return f"{col} = excluded.{col}"


def put_output(conn: sqlite3.Connection, job_id: str, now: float, row: dict[str, Any]) -> None:
    """Record (or replace, when a stage runs again) one output file of a job."""
    cols = [c for c in _OUTPUT_COLS if c in row]
    conn.execute(
        f"INSERT INTO outputs (job_id, created_at, {', '.join(cols)}) VALUES (?, ?,"
        f" {', '.join('?' * len(cols))})"
        " ON CONFLICT (job_id, filename)"
        f" DO UPDATE SET {', '.join(map(_keep_asset_id, cols))}",
        (job_id, _iso(now), *(row[c] for c in cols)),
    )
