"""SQL text of the store's transitions, built once at import.

Fast paths are single UPDATEs that read the job's stage from the row (CASE stage ...), so one
statement serves every stage; ``ops`` falls back to a read and a guarded UPDATE when they match
nothing, to say why (lease lost, cancelled, not found).
"""

from __future__ import annotations

from functools import cache

from comfyq.store.model import PROMPT_MESSAGE, Stage


def ms_since(col: str, now_param: str) -> str:
    return f"round((julianday({now_param}) - julianday({col})) * 86400000.0)"


def add_timing(key: str) -> str:
    """SQL that adds the time spent since stage_entered_at to timings.<key>."""
    return (
        f"json_set(timings, '$.{key}', coalesce(json_extract(timings, '$.{key}'), 0) + "
        f"{ms_since('stage_entered_at', ':now')})"
    )


# The time a stage took goes to timings.<stage key>; the SQL reads the stage from the row.
_STAGE_KEY_SQL = (
    "'$.' || CASE stage WHEN 'preprocess' THEN 'preprocess_ms' WHEN 'generate' THEN 'generation_ms'"
    " ELSE 'postprocess_ms' END"
)
_STAGE_DONE = (
    f"json_set(timings, {_STAGE_KEY_SQL}, coalesce(json_extract(timings, {_STAGE_KEY_SQL}), 0)"
    f" + {ms_since('stage_entered_at', ':now')})"
)
# A held, uncancelled job (anything else takes the slow path, which says what is wrong).
HELD = " WHERE id = :id AND state = 'running' AND lease_owner = :owner AND cancel_requested = 0"
# End of a stage: pending in the next one, or completed after postprocess (as ``finish`` does).
ADVANCE = (
    "UPDATE jobs SET state = CASE stage WHEN 'postprocess' THEN 'completed' ELSE 'pending' END,"
    " stage = CASE stage WHEN 'preprocess' THEN 'generate' ELSE 'postprocess' END,"
    " lease_owner = NULL, lease_expires_at = NULL, message = :message, updated_at = :now,"
    " run_after = CASE stage WHEN 'postprocess' THEN run_after ELSE :now END,"
    " finished_at = CASE stage WHEN 'postprocess' THEN :now END,"
    " error = CASE stage WHEN 'postprocess' THEN NULL ELSE error END,"
    f" timings = CASE stage WHEN 'postprocess' THEN json_set({_STAGE_DONE}, '$.total_ms',"
    f" {ms_since('created_at', ':now')}) ELSE {_STAGE_DONE} END, stage_entered_at = :now"
)
# End of a stage and claim of the next (hand-off), as ``advance`` then ``claim`` would write it;
# the claim comes the instant the job enters the stage, so it adds 0 ms of waiting.
_WAIT_KEY_SQL = (
    "'$.' || CASE stage WHEN 'preprocess' THEN 'generate_wait_ms' ELSE 'postprocess_wait_ms' END"
)
# The wait key is never the stage key, so it is read from the old timings: one JSON walk less.
# The job is running before and after (HELD): ``state`` is not assigned, so none of the triggers
# on UPDATE OF state (legal transition, unfinished count, webhook outbox) runs.
HAND_OFF = (
    "UPDATE jobs SET"
    " stage = CASE stage WHEN 'preprocess' THEN 'generate' ELSE 'postprocess' END,"
    " lease_owner = :owner, lease_expires_at = :exp, attempts = max(attempts, 1),"
    " message = :message,"
    f" updated_at = :now, run_after = :now, timings = json_set({_STAGE_DONE}, {_WAIT_KEY_SQL},"
    f" coalesce(json_extract(timings, {_WAIT_KEY_SQL}), 0) + 0.0), stage_entered_at = :now"
)


@cache  # a handful of (stage, which) pairs; built once, not per claim
def claim_sql(stage: Stage, which: str) -> str:
    wait_key = "queued_ms" if stage == Stage.PREPROCESS else f"{stage}_wait_ms"
    return (
        "UPDATE jobs SET state = 'running', lease_owner = :owner, lease_expires_at = :exp,"
        " attempts = max(attempts, 1), updated_at = :now, message = :message,"
        f" timings = {add_timing(wait_key)}, stage_entered_at = :now WHERE {which} RETURNING *"
    )


# A version 4 UUID in its canonical text (what ComfyUI takes as a prompt id).
UUID4 = (
    "lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2)"
    " || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || substr(hex(randomblob(2)), 2) || '-'"
    " || hex(randomblob(6)))"
)
_BEFORE, _AFTER = (f"'{part}'" for part in PROMPT_MESSAGE.split("{}"))


# The first claimable job of a stage, in claim order: a scalar subquery, which SQLite runs once
# before the UPDATE's one pass. ``id IN (... LIMIT :n)`` instead builds an ephemeral index for
# the list and updates in two passes through another ephemeral table (each a b-tree opened, two
# zeroed pages, a few mallocs): for the usual claim of one job (n = 1) this form does neither.
FIRST_CLAIMABLE = (
    "id = (SELECT id FROM jobs WHERE state = 'pending' AND stage = :stage AND run_after <= :now"
    " ORDER BY priority DESC, created_at, id LIMIT 1)"
)


@cache
def claim_one_assign_sql(stage: Stage) -> str:
    """``claim_assign_sql`` of one job (n = 1): the prompt id ``:pid`` comes from the caller, so
    the UPDATE needs no FROM subquery (materialized in an ephemeral table) to use it twice."""
    wait_key = "queued_ms" if stage == Stage.PREPROCESS else f"{stage}_wait_ms"
    fresh = "comfy_prompt_id IS NULL"
    return (
        "UPDATE jobs SET state = 'running', lease_owner = :owner, lease_expires_at = :exp,"
        " attempts = max(attempts, 1), updated_at = :now,"
        f" message = CASE WHEN {fresh} THEN {_BEFORE} || :pid || {_AFTER} ELSE :message END,"
        f" comfy_backend = CASE WHEN {fresh} THEN :backend ELSE comfy_backend END,"
        " comfy_prompt_id = coalesce(comfy_prompt_id, :pid),"
        f" timings = {add_timing(wait_key)}, stage_entered_at = :now"
        f" WHERE {FIRST_CLAIMABLE} RETURNING *"
    )


@cache
def claim_assign_sql(stage: Stage) -> str:
    """``claim_sql`` of the claimable jobs of ``stage`` that also gives each one without a prompt
    id a fresh one, the backend ``:backend`` and the message that names it (``JobStore.claim``).
    SET expressions read the row as it was, so ``comfy_prompt_id IS NULL`` is the old value."""
    wait_key = "queued_ms" if stage == Stage.PREPROCESS else f"{stage}_wait_ms"
    fresh = "comfy_prompt_id IS NULL"
    return (
        "UPDATE jobs SET state = 'running', lease_owner = :owner, lease_expires_at = :exp,"
        " attempts = max(attempts, 1), updated_at = :now,"
        f" message = CASE WHEN {fresh} THEN {_BEFORE} || p.pid || {_AFTER} ELSE :message END,"
        f" comfy_backend = CASE WHEN {fresh} THEN :backend ELSE comfy_backend END,"
        " comfy_prompt_id = coalesce(comfy_prompt_id, p.pid),"
        f" timings = {add_timing(wait_key)}, stage_entered_at = :now"
        f" FROM (SELECT id AS pick, {UUID4} AS pid FROM jobs WHERE state = 'pending'"
        " AND stage = :stage AND run_after <= :now ORDER BY priority DESC, created_at, id"
        " LIMIT :n) AS p WHERE jobs.id = p.pick RETURNING *"
    )
