"""SQL text of the PostgreSQL adapter's transitions, built once at import.

Each hot transition is one statement: the guarded UPDATE of the job and the INSERT of its event
rows, joined by a data-modifying CTE, so a transition costs one round trip and one commit. When
the UPDATE matches nothing, ``ops`` reads the row under a lock to say why (lease lost, cancelled,
not found), as the SQLite adapter does.
"""

from __future__ import annotations

from typing import Any

from comfyq.store.model import PROMPT_MESSAGE, STAGES, Stage

NOW = "%(now)s::timestamptz"


def ms_since(col: str) -> str:
    return f"round(extract(epoch FROM ({NOW} - {col})) * 1000)"


def add_ms(timings: str, key_sql: str, ms: str) -> str:
    """``timings`` with ``ms`` added to the number at key ``key_sql`` (an SQL text expression)."""
    return (
        f"jsonb_set({timings}, ARRAY[{key_sql}], to_jsonb(coalesce(({timings} ->> {key_sql})"
        f"::float8, 0) + {ms}))"
    )


def add_timing(key: str) -> str:
    """SQL that adds the time spent since stage_entered_at to timings.<key>."""
    return add_ms("timings", f"'{key}'", ms_since("stage_entered_at"))


_STAGE_KEY_SQL = (
    "CASE stage WHEN 'preprocess' THEN 'preprocess_ms' WHEN 'generate' THEN 'generation_ms'"
    " ELSE 'postprocess_ms' END"
)
_STAGE_DONE = add_ms("timings", _STAGE_KEY_SQL, ms_since("stage_entered_at"))
_WAIT_KEY_SQL = (
    "CASE stage WHEN 'preprocess' THEN 'generate_wait_ms' ELSE 'postprocess_wait_ms' END"
)

# The wait just ended in the job's present stage (a claim right after it entered it).
_WAITED_KEY_SQL = (
    "CASE stage WHEN 'generate' THEN 'generate_wait_ms' ELSE 'postprocess_wait_ms' END"
)
# A held, uncancelled job (anything else takes the slow path, which says what is wrong).
HELD = (
    " WHERE id = %(id)s AND state = 'running' AND lease_owner = %(owner)s AND NOT cancel_requested"
)

# End of a stage: pending in the next one, or completed after postprocess (as ``finish`` does).
ADVANCE = (
    "UPDATE jobs SET state = CASE stage WHEN 'postprocess' THEN 'completed' ELSE 'pending' END,"
    " stage = CASE stage WHEN 'preprocess' THEN 'generate' ELSE 'postprocess' END,"
    f" lease_owner = NULL, lease_expires_at = NULL, message = %(message)s, updated_at = {NOW},"
    f" run_after = CASE stage WHEN 'postprocess' THEN run_after ELSE {NOW} END,"
    f" finished_at = CASE stage WHEN 'postprocess' THEN {NOW} END,"
    " error = CASE stage WHEN 'postprocess' THEN NULL ELSE error END,"
    f" timings = CASE stage WHEN 'postprocess' THEN jsonb_set({_STAGE_DONE}, '{{total_ms}}',"
    f" to_jsonb({ms_since('created_at')})) ELSE {_STAGE_DONE} END, stage_entered_at = {NOW}"
)

# End of a stage and claim of the next (hand-off), as ``advance`` then ``claim`` would write it.
# The job is running before and after (HELD): ``state`` is not assigned, so none of the triggers
# on UPDATE OF state (legal transition, unfinished count, secrets, webhook outbox) runs.
HAND_OFF = (
    "UPDATE jobs SET"
    " stage = CASE stage WHEN 'preprocess' THEN 'generate' ELSE 'postprocess' END,"
    " lease_owner = %(owner)s, lease_expires_at = %(exp)s::timestamptz,"
    " attempts = greatest(attempts, 1), message = %(message)s,"
    f" updated_at = {NOW}, run_after = {NOW},"
    f" timings = {add_ms(_STAGE_DONE, _WAIT_KEY_SQL, '0.0')}, stage_entered_at = {NOW}"
)


def with_events(
    update: str, events: list[tuple[str, ...]], data: bool = False, also: str = ""
) -> str:
    """``update`` (an UPDATE or INSERT of jobs) and one event row per (from_state SQL, to_state
    SQL, message SQL[, attempt SQL[, condition SQL]]) for each row it wrote (that meets the
    condition), in one statement; ``also``: more CTEs (``, x AS (...)``) that may read the
    written rows as ``j``. The result: the rows, each with ``event_ids`` (its events' ids, in the
    order given)."""
    selects = " UNION ALL ".join(
        f"SELECT {i} AS ord, id, updated_at, {ev[0]} AS from_state, {ev[1]} AS to_state, stage,"
        f" {ev[3] if len(ev) > 3 else 'attempts'} AS attempts, {ev[2]} AS message FROM j"
        + (f" WHERE {ev[4]}" if len(ev) > 4 else "")
        for i, ev in enumerate(events)
    )
    data_sql = "%(data)s::json" if data else "NULL::json"
    return (
        f"WITH j AS ({update} RETURNING jobs.*),"
        " e AS (INSERT INTO job_events (job_id, at, from_state, to_state, stage, attempt, message,"
        f" data) SELECT id, updated_at, from_state, to_state, stage, attempts, message, {data_sql}"
        f" FROM ({selects}) s ORDER BY id, ord RETURNING id, job_id){also}"
        " SELECT j.*, ARRAY(SELECT e.id FROM e WHERE e.job_id = j.id ORDER BY e.id) AS event_ids"
        " FROM j"
    )


OUTPUT_COLS = {
    "filename": "text",
    "node_id": "text",
    "output_type": "text",
    "comfy_type": "text",
    "subfolder": "text",
    "mimetype": "text",
    "size": "bigint",
    "sha256": "text",
    "local_path": "text",
    "url": "text",
    "upload_error": "text",
    "error": "text",
    "asset_id": "text",
    "blake3": "text",
}


def keep_asset_id(col: str) -> str:
    """The ON CONFLICT assignment of ``col``: a file recorded again (its stage ran again) keeps
    the asset id clients may already hold."""
    if col == "asset_id":
        return "asset_id = coalesce(outputs.asset_id, excluded.asset_id)"
    return f"{col} = excluded.{col}"


def outputs_cte(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """CTEs recording (or replacing) output rows of the job ``j`` holds, only if it holds one."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(c for c in OUTPUT_COLS if c in row), []).append(row)
    sql, params = "", {}
    for g, (cols, members) in enumerate(groups.items()):
        values = []
        for r, row in enumerate(members):
            marks = []
            for c in cols:
                params[f"o{g}_{r}_{c}"] = row[c]
                marks.append(f"%(o{g}_{r}_{c})s::{OUTPUT_COLS[c]}")
            values.append("(" + ", ".join(marks) + ")")
        names = ", ".join(cols)
        sql += (
            f", o{g} AS (INSERT INTO outputs (job_id, created_at, {names})"
            f" SELECT j.id, {NOW}, v.* FROM j, (VALUES {', '.join(values)}) AS v ({names})"
            f" ON CONFLICT (job_id, filename) DO UPDATE SET"
            f" {', '.join(map(keep_asset_id, cols))})"
        )
    return sql, params


def claim_sql(stage: Stage) -> str:
    """Claim up to %(n)s waiting jobs of ``stage`` in one statement: the partial index gives them
    by priority then age, SKIP LOCKED passes over rows another instance is claiming."""
    wait_key = "queued_ms" if stage == Stage.PREPROCESS else f"{stage}_wait_ms"
    return with_events(
        "UPDATE jobs SET state = 'running', lease_owner = %(owner)s,"
        " lease_expires_at = %(exp)s::timestamptz, attempts = greatest(attempts, 1),"
        f" updated_at = {NOW}, message = %(message)s, timings = {add_timing(wait_key)},"
        f" stage_entered_at = {NOW} FROM (SELECT id AS picked FROM jobs"
        f" WHERE state = 'pending' AND stage = '{stage}' AND run_after <= {NOW}"
        " ORDER BY priority DESC, created_at, id LIMIT %(n)s FOR UPDATE SKIP LOCKED) p"
        " WHERE jobs.id = p.picked",
        [("'pending'", "state", "%(message)s")],
    )


CLAIM = {s: claim_sql(s) for s in STAGES}

_BEFORE, _AFTER = (f"'{part}'" for part in PROMPT_MESSAGE.split("{}"))


def claim_assign_sql(stage: Stage) -> str:
    """``claim_sql`` that also gives each claimed job without a prompt id a fresh one, the backend
    %(backend)s and the message that names it (``JobStore.claim``). SET expressions read the row
    as it was, so ``comfy_prompt_id IS NULL`` is the old value."""
    wait_key = "queued_ms" if stage == Stage.PREPROCESS else f"{stage}_wait_ms"
    fresh = "comfy_prompt_id IS NULL"
    return with_events(
        "UPDATE jobs SET state = 'running', lease_owner = %(owner)s,"
        " lease_expires_at = %(exp)s::timestamptz, attempts = greatest(attempts, 1),"
        f" updated_at = {NOW},"
        f" message = CASE WHEN {fresh} THEN {_BEFORE} || p.pid || {_AFTER} ELSE %(message)s END,"
        f" comfy_backend = CASE WHEN {fresh} THEN %(backend)s ELSE comfy_backend END,"
        " comfy_prompt_id = coalesce(comfy_prompt_id, p.pid),"
        f" timings = {add_timing(wait_key)}, stage_entered_at = {NOW}"
        " FROM (SELECT id AS picked, gen_random_uuid()::text AS pid FROM jobs"
        f" WHERE state = 'pending' AND stage = '{stage}' AND run_after <= {NOW}"
        " ORDER BY priority DESC, created_at, id LIMIT %(n)s FOR UPDATE SKIP LOCKED) p"
        " WHERE jobs.id = p.picked",
        [("'pending'", "state", "%(message)s")],
    )


CLAIM_ASSIGN = {s: claim_assign_sql(s) for s in STAGES}
# One job, when it is waiting in its stage (the second half of a slow-path hand-off).
CLAIM_ONE = with_events(
    "UPDATE jobs SET state = 'running', lease_owner = %(owner)s,"
    " lease_expires_at = %(exp)s::timestamptz, attempts = greatest(attempts, 1),"
    f" updated_at = {NOW}, message = %(message)s,"
    f" timings = {add_ms('timings', _WAITED_KEY_SQL, ms_since('stage_entered_at'))},"
    f" stage_entered_at = {NOW}"
    f" WHERE id = %(id)s AND state = 'pending' AND run_after <= {NOW}",
    [("'pending'", "state", "%(message)s")],
)

ADMIT_SQL = (
    "INSERT INTO jobs (id, priority, max_attempts, kind, payload, payload_hash, message, run_after,"
    " deadline_at, created_at, updated_at, stage_entered_at, owner)"
    " SELECT %(id)s, %(priority)s, %(max_attempts)s, %(kind)s, %(payload)s::json, %(hash)s,"
    f" 'Request accepted', {NOW}, %(deadline)s::timestamptz, {NOW}, {NOW}, {NOW}, %(job_owner)s"
    " WHERE (SELECT sum(unfinished) FROM queue_stats) < %(max)s"
    " ON CONFLICT (id) DO NOTHING"
)
ADMIT = with_events(ADMIT_SQL, [("NULL::text", "state", "'Request accepted'")])
_SECRETS = ", s AS (INSERT INTO job_secrets (job_id, data) SELECT id, %(secrets)s::jsonb FROM j)"
# The same, with the job's secrets written beside it.
ADMIT_WITH_SECRETS = with_events(
    ADMIT_SQL, [("NULL::text", "state", "'Request accepted'")], also=_SECRETS
)
# Admitted and claimed at once by an idle preprocess worker of this instance (``go``) unless a
# claimable job of equal or higher priority waits (ahead in claim order): as a claim right
# after would write it, 0 ms queued; the acceptance event as ADMIT writes it.
_ADMIT_CLAIMED_SQL = (
    "INSERT INTO jobs (id, priority, max_attempts, kind, payload, payload_hash, message, run_after,"
    " deadline_at, created_at, updated_at, stage_entered_at, owner,"
    " state, lease_owner, lease_expires_at, attempts, timings)"
    " SELECT %(id)s, %(priority)s, %(max_attempts)s, %(kind)s, %(payload)s::json, %(hash)s,"
    f" CASE WHEN go THEN %(message)s ELSE 'Request accepted' END, {NOW},"
    f" %(deadline)s::timestamptz, {NOW}, {NOW}, {NOW}, %(job_owner)s,"
    " CASE WHEN go THEN 'running' ELSE 'pending' END, CASE WHEN go THEN %(owner)s END,"
    " CASE WHEN go THEN %(exp)s::timestamptz END, CASE WHEN go THEN 1 ELSE 0 END,"
    """ CASE WHEN go THEN '{"queued_ms": 0.0}'::jsonb ELSE '{}'::jsonb END"""
    " FROM (SELECT NOT EXISTS (SELECT 1 FROM jobs WHERE state = 'pending'"
    f" AND stage = 'preprocess' AND priority >= %(priority)s AND run_after <= {NOW}) AS go) g"
    " WHERE (SELECT sum(unfinished) FROM queue_stats) < %(max)s"
    " ON CONFLICT (id) DO NOTHING"
)
_ADMIT_CLAIMED_EVENTS: list[tuple[str, ...]] = [
    ("NULL::text", "'pending'", "'Request accepted'", "0"),
    ("'pending'", "state", "%(message)s", "attempts", "state = 'running'"),
]
ADMIT_CLAIMED = with_events(_ADMIT_CLAIMED_SQL, _ADMIT_CLAIMED_EVENTS)
ADMIT_CLAIMED_WITH_SECRETS = with_events(_ADMIT_CLAIMED_SQL, _ADMIT_CLAIMED_EVENTS, also=_SECRETS)
