"""What every transition writes besides the job row: its ``job_events`` row(s), and the text of
the instants it records."""

from __future__ import annotations

import math
import sqlite3
import time
from typing import Any

from comfyq.clock import iso
from comfyq.store.model import Job, Stage, State, Transition, dumps

# The plain text of each State and Stage. The sqlite3 module binds only exact str cheaply: for a
# str subclass (an enum member) it first looks for an adapter and ``__adapt__``/``__conform__``,
# and each miss formats and discards an AttributeError (~3,000 instructions a parameter, a
# twentieth of the writer's CPU per job in bench_store's path). Plain strings (and None) map to
# themselves: ``PLAIN.get(x, x)``.
PLAIN: dict[Any, Any] = {m: m.value for m in (*State, *Stage)}

# The last two seconds formatted: a claim formats ``now`` and ``now + lease`` in turn, which a
# single entry would miss every time.
_seconds: tuple[tuple[int, str], tuple[int, str]] = ((-1, ""), (-1, ""))


def stamp(t: float) -> str:
    """``clock.iso(t)``, the same text, a few times cheaper (every write formats a few instants):
    date and time of day are formatted once per second, the microseconds are rounded half-even
    from the fraction as ``datetime.fromtimestamp`` rounds them."""
    global _seconds
    if t < 0:
        return iso(t)
    frac, whole = math.modf(t)
    sec, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    # One read: another writer thread may replace it (a tuple, never torn).
    last, other = cached = _seconds
    if last[0] == sec:
        return f"{last[1]}.{us:06d}Z"
    if other[0] == sec:
        _seconds = (other, last)
        return f"{other[1]}.{us:06d}Z"
    entry = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    _seconds = (entry, cached[0])
    return f"{entry[1]}.{us:06d}Z"


def event(
    conn: sqlite3.Connection,
    job: Job,
    from_state: State | None,
    message: str,
    data: dict[str, Any] | None = None,
) -> Transition:
    """Write the ``job_events`` row of ``job``'s change from ``from_state``; the Transition to
    publish."""
    at = job.updated_at
    state, stage, attempts = job.state, job.stage, job.attempts
    cur = conn.execute(
        "INSERT INTO job_events (job_id, at, from_state, to_state, stage, attempt, message, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            job.id,
            at,
            PLAIN.get(from_state, from_state),
            PLAIN.get(state, state),
            PLAIN.get(stage, stage),
            attempts,
            message,
            None if data is None else dumps(data),
        ),
    )
    return Transition(
        cur.lastrowid or 0, job.id, from_state, state, stage, attempts, message, at, data, job
    )


def events(
    conn: sqlite3.Connection, items: list[tuple[Job, State | None, str]]
) -> list[Transition]:
    """``event`` for several (job, from_state, message) at once: one INSERT for all their rows."""
    if len(items) == 1:
        job, from_state, message = items[0]
        return [event(conn, job, from_state, message)]
    rows = [(j.id, j.updated_at, f, j.state, j.stage, j.attempts, m) for j, f, m in items]
    # No RETURNING: with it SQLite materializes the VALUES rows and the returned rows in two
    # ephemeral b-trees (each two zeroed pages and mallocs: more than the rows' own insertion).
    # The rows are inserted in VALUES order, each taking the next AUTOINCREMENT id (one writer,
    # no trigger on job_events), so their ids are the ones ending at lastrowid.
    cur = conn.execute(
        "INSERT INTO job_events (job_id, at, from_state, to_state, stage, attempt, message) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(rows)),
        [PLAIN.get(v, v) for r in rows for v in r],
    )
    first = (cur.lastrowid or 0) - len(rows) + 1
    return [
        Transition(first + k, r[0], r[2], r[3], r[4], r[5], r[6], r[1], None, j)
        for k, (r, (j, _, _)) in enumerate(zip(rows, items, strict=True))
    ]
