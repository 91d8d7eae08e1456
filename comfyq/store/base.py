"""The store interface: what stages, the API, webhooks, the CLI and the benches may ask of a store.

It speaks the domain (admit, claim, advance, finish, rescue, cancel, renew, list, outbox claim and
record, prune), never SQL. Two adapters implement it, each owning its SQL and its migrations:
``comfyq.store.sqlite`` (one file, one writer thread with group commit; the default) and
``comfyq.store.postgres`` (many instances on one database). ``open_store(database)``
(``factory.py``) picks the adapter from the database setting: a ``postgresql://`` URL or a path.

Every state change commits its ``job_events`` row in the same transaction, and the listeners are
told only after the commit, so nothing downstream acts on a change that is not durable. Time is a
parameter: adapters read ``self.clock``, which tests replace.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from comfyq.clock import Clock, iso
from comfyq.errors import ComfyqError
from comfyq.store.assets import AssetStore
from comfyq.store.model import Job, NewJob, Stage, State, Transition

log = logging.getLogger("comfyq.store")

Listener = Callable[[list[Transition]], None]

# The statuses a client may filter a job list by, as (state, stage) pairs (stage None: any).
STATUS_FILTERS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "queued": (("pending", "preprocess"),),
    "processing": (("running", "preprocess"), ("pending", "generate")),
    "generating": (("running", "generate"),),
    "postprocessing": (("pending", "postprocess"), ("running", "postprocess")),
    "completed": (("completed", None),),
    "failed": (("failed", None),),
    "cancelled": (("cancelled", None),),
    "pending": (("pending", None),),
    "running": (("running", None),),
}


def status_sql(status: str, params: list[Any], mark: str) -> str:
    """A WHERE term for one client status (STATUS_FILTERS), its values appended to ``params``;
    ``mark`` is the adapter's placeholder (``?`` or ``%s``)."""
    terms = []
    for state, stage in STATUS_FILTERS[status]:
        if stage is None:
            terms.append(f"state = {mark}")
            params.append(state)
        else:
            terms.append(f"(state = {mark} AND stage = {mark})")
            params.extend((state, stage))
    return "(" + " OR ".join(terms) + ")"


def is_postgres_url(database: str | os.PathLike[str]) -> bool:
    """True when the database setting names a PostgreSQL server rather than a file."""
    return isinstance(database, str) and database.startswith(("postgresql://", "postgres://"))


class StoreError(Exception):
    """The store failed for a reason of its own (not the job's): connection, schema, lock."""


class StoreUnavailable(StoreError, ComfyqError):
    """The database cannot be reached right now; the operation may succeed when it returns.
    A request that hits it is answered 503 with Retry-After; stage workers wait and retry."""

    type = "store_unavailable"
    http_status = 503
    retryable = True


class MigrationError(StoreError):
    """The database and the migration files disagree."""


class DatabaseLocked(StoreError):
    """Another comfyq server holds this database file (SQLite: one server per file)."""


@dataclass
class Attempt:
    """The outcome of one webhook POST: ``delivered``, ``retry`` or ``gave_up``."""

    outcome: str
    status: int | None
    error: str | None
    started: float
    duration_ms: int | None = None
    next_at: float | None = None


@dataclass
class Stats:
    """Row counts for the metrics scrape."""

    jobs: dict[str, int]
    webhook_deliveries: dict[str, int]
    webhook_attempts: dict[str, int]


class Intake(Protocol):
    """An idle worker of the first stage (preprocess) offered to admission by the stage runner
    (``JobStore.intake``): ``create`` then admits a job already claimed by this process, in the
    same commit (one commit instead of two, both events written), when no claimable job of
    equal or higher priority waits ahead of it."""

    @property
    def lease(self) -> float: ...

    @property
    def message(self) -> str: ...

    def take(self) -> object | None:
        """Reserve an idle worker: a ticket, or None when none is idle (or claims are paused)."""

    def hand(self, ticket: object, job: Job | None) -> None:
        """After the commit: give the worker the job claimed for it, or give the worker back
        (``job`` None: the job was admitted waiting, or not at all)."""


class JobReads(abc.ABC):
    """Fresh reads for request handlers and streams: each sees every commit announced before it
    was issued, and they do not queue behind the pipeline's own reads."""

    @abc.abstractmethod
    async def job(self, job_id: str) -> Job | None:
        """The whole job row."""

    @abc.abstractmethod
    async def head(self, job_id: str) -> Job | None:
        """The few columns a stream needs (not the payload or workflow)."""

    @abc.abstractmethod
    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's event rows after event id ``after``, oldest first (``data`` decoded)."""

    @abc.abstractmethod
    async def outputs(self, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Output rows of some jobs, in the order they were recorded."""

    @abc.abstractmethod
    async def output_file(self, job_id: str, filename: str) -> dict[str, Any] | None:
        """``local_path``, ``mimetype`` and the job's ``owner`` of one recorded output, or None."""

    @abc.abstractmethod
    async def page(
        self,
        statuses: list[str],
        limit: int,
        cursor: tuple[str, str] | None,
        owners: list[str] | None = None,
        id_prefix: str = "",
    ) -> list[Job]:
        """Jobs newest first, filtered by client statuses (keys of STATUS_FILTERS); ``cursor`` is
        (created_at, id) of the last job of the previous page; ``owners``: only jobs created by
        these API key ids (None: every job); ``id_prefix``: only ids starting with it."""

    @abc.abstractmethod
    async def status_counts(self, owners: list[str] | None) -> dict[tuple[str, str], int]:
        """Jobs per (state, stage), stage '' for finished jobs, only those created by ``owners``
        (None: every job); cheap on a big table (indexes, not a pass over finished rows)."""

    @abc.abstractmethod
    async def finished_between(
        self, start: float, end: float, limit: int
    ) -> list[tuple[str, float]]:
        """(state, seconds from admission to the end) of at most ``limit`` jobs that finished in
        [start, end) (epoch seconds)."""

    @abc.abstractmethod
    async def summary(self, job_id: str) -> Job | None:
        """The job without its documents (payload, prepared, result), plus ``v2_metadata`` (the
        payload's ``v2.metadata`` as JSON text) and ``nodes_total`` (nodes in its workflow)."""

    @abc.abstractmethod
    async def summaries(
        self,
        states: Sequence[State] | None,
        owners: list[str] | None,
        cursor: tuple[str, str] | None,
        limit: int,
    ) -> list[Job]:
        """``summary`` of jobs newest first, in some states (None: any), created by some API key
        ids (None: anyone's), after ``cursor`` (created_at, id)."""

    @abc.abstractmethod
    async def workflow(self, job_id: str) -> dict[str, Any] | None:
        """The API-format graph that ran (assets resolved) or, before it is prepared, the one
        submitted; None for a job that does not exist."""

    @abc.abstractmethod
    async def queue_snapshot(self) -> list[tuple[str, str, str, int]]:
        """(id, stage, state, position) of every unfinished job; position 1-based among the
        waiting jobs of its stage in claim order, 0 for running ones."""

    def queue_snapshot_now(self) -> list[tuple[str, str, str, int]] | None:
        """:meth:`queue_snapshot` answered right away on the caller's thread when that is cheap
        (an adapter with local reads and a short queue); None: await :meth:`queue_snapshot`."""
        return None

    @abc.abstractmethod
    async def completed_timings(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """(kind, timings) of the most recently completed jobs, newest first."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection these reads hold, if any."""


class JobStore(abc.ABC):
    """Jobs, their events, outputs, secrets and webhook deliveries, behind one interface.

    ``open_store(database, clock=..., owner=...)`` returns the adapter the database setting
    names; adapters may also be built directly.
    """

    engine: str = ""
    # Whether several servers use the database at once (Postgres) or one owns it (SQLite).
    shared: bool = False

    def __init__(
        self, database: str | os.PathLike[str], *, clock: Clock | None = None, owner: str = ""
    ) -> None:
        self.clock = clock or Clock()
        # Leases name the process that holds them: host, pid and a random part (pids are reused).
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self._listeners: list[Listener] = []
        # Set by the stage runner: admission may hand a new job to an idle preprocess worker.
        self.intake: Intake | None = None

    # --- lifecycle and listeners -----------------------------------------------------------------

    @abc.abstractmethod
    async def open(self, *, exclusive: bool = False) -> None:
        """Connect and apply pending migrations. ``exclusive``: this process is a server (SQLite
        then takes its one-server-per-file lock; Postgres is shared by many servers)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish every write already asked for, then disconnect."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations (``open`` does too; this needs no ``open``); the versions
        applied."""

    def listen(self, fn: Listener) -> None:
        """Call ``fn(transitions)`` after every commit that changed job states."""
        self._listeners.append(fn)

    def _notify(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        for fn in self._listeners:
            try:
                fn(transitions)
            except Exception:  # a listener bug must not undo a committed write
                log.exception("store listener failed")

    async def _admitting(
        self,
        plain: Callable[[], Awaitable[tuple[Job, Transition | None]]],
        claimed: Callable[[str, float, str], Awaitable[tuple[Job, list[Transition]]]],
    ) -> tuple[Job, bool]:
        """An admission (``create``, a v2 keyed create): ``claimed(owner, lease, message)`` when
        the intake has an idle worker, which is handed the job claimed for it after the commit
        (or given back), else ``plain()``; the listeners are told first. ``(job, created)``."""
        intake = self.intake
        ticket = intake.take() if intake is not None else None
        if intake is None or ticket is None:
            job, tr = await plain()
            trs = [] if tr is None else [tr]
        else:
            try:
                job, trs = await claimed(self.owner, intake.lease, intake.message)
            except BaseException:
                intake.hand(ticket, None)
                raise
        self._notify(trs)
        if intake is not None and ticket is not None:
            intake.hand(ticket, trs[1].job if len(trs) == 2 else None)
        return job, bool(trs)

    def now_iso(self) -> str:
        return iso(self.clock.now())

    @abc.abstractmethod
    def describe(self) -> str:
        """The database, for logs and /health: a file path, or a URL without its password."""

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """A stable name of this database (the same in every process using it)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Prove the store can write now (raise otherwise)."""

    @abc.abstractmethod
    async def maintain(self) -> str:
        """Periodic housekeeping of the engine (SQLite: WAL checkpoint); a line for the log."""

    @abc.abstractmethod
    def reads(self) -> JobReads:
        """A reader for request handlers and streams (close it when done)."""

    @abc.abstractmethod
    def assets(self) -> AssetStore:
        """The Comfy API v2 assets, blobs and idempotency keys kept in this store."""

    # --- job writes --------------------------------------------------------------------------

    @abc.abstractmethod
    async def create(self, new: NewJob, max_queue: int) -> tuple[Job, bool]:
        """Admit a job durably; ``(job, False)`` when an identical request already exists.

        With an ``intake`` that has an idle worker and no claimable job of equal or higher
        priority waiting, the job is written already claimed by that worker (its two events,
        accepted and claimed, in the same commit) and handed to it after the commit; the job
        returned is then as the acceptance event describes it (waiting in preprocess).

        Raises QueueFull past ``max_queue`` unfinished jobs, Conflict for a reused id whose
        payload differs."""

    @abc.abstractmethod
    async def claim(
        self, stage: Stage, n: int, lease: float, message: str, prompt_backend: str | None = None
    ) -> list[Job]:
        """Claim up to ``n`` waiting jobs of ``stage`` for this process, by priority then age.

        ``prompt_backend`` (generate claims): each claimed job that has no ComfyUI prompt id gets
        a fresh one (a UUID made by the database), this backend and the message
        ``prompt_message(id)`` in the claim's commit, so the generate stage need not store them
        itself before submitting; a job that has one keeps it (it may have reached ComfyUI)."""

    @abc.abstractmethod
    async def advance(
        self,
        job_id: str,
        message: str,
        fields: dict[str, Any] | None = None,
        outputs: list[dict[str, Any]] | None = None,
    ) -> Transition:
        """Finish this process's stage of a job: next stage, or completed after postprocess."""

    @abc.abstractmethod
    async def advance_and_claim(
        self,
        job_id: str,
        message: str,
        fields: dict[str, Any] | None,
        lease: float,
        claim_message: str,
        outputs: list[dict[str, Any]] | None = None,
        claim_fields: dict[str, Any] | None = None,
    ) -> list[Transition]:
        """Advance a job and claim it for its next stage in one commit (both events written).

        ``claim_fields``: columns set only when the claim happens in that commit (the ComfyUI
        prompt id and backend the generate stage will submit under); a ``message`` among them is
        the job's message after the claim, while the claim event keeps ``claim_message``."""

    @abc.abstractmethod
    async def finish(
        self,
        job_id: str,
        state: State,
        message: str,
        *,
        error: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> Transition:
        """End a job this process holds as completed, failed or cancelled."""

    @abc.abstractmethod
    async def retry_later(self, job_id: str, delay: float, error: dict[str, Any]) -> Transition:
        """A retryable failure: waiting again in the same stage after ``delay``, or failed when
        its attempts are spent."""

    @abc.abstractmethod
    async def release(self, job_id: str, message: str) -> Transition:
        """Give a held job back to its stage's queue without counting an attempt."""

    @abc.abstractmethod
    async def update(self, job_id: str, fields: dict[str, Any]) -> Job:
        """Set columns of a job this process holds (the ComfyUI prompt id before submitting)."""

    @abc.abstractmethod
    async def renew(self, lease: float) -> int:
        """Extend the lease of every job this process holds; return how many."""

    @abc.abstractmethod
    async def request_cancel(self, job_id: str) -> tuple[Job, Transition | None]:
        """Cancel a waiting job at once; mark a running one for its worker; leave a finished one."""

    @abc.abstractmethod
    async def reap(self, grace: float) -> list[Transition]:
        """Requeue (or fail, attempts spent) jobs whose lease expired; fail jobs past deadline."""

    @abc.abstractmethod
    async def recover(self) -> list[Transition]:
        """At start: jobs a dead process of this store left running go back to their stage."""

    @abc.abstractmethod
    async def retry_job(self, job_id: str) -> Transition:
        """Run a failed or cancelled job again from the start."""

    @abc.abstractmethod
    async def delete_finished(self, job_id: str) -> bool:
        """Delete one finished job with its events, outputs and deliveries; False when it does
        not exist or has not finished."""

    @abc.abstractmethod
    async def prune(self, older_than: float, limit: int = 500) -> list[str]:
        """Delete up to ``limit`` jobs finished more than ``older_than`` seconds ago; their ids."""

    @abc.abstractmethod
    async def put_output(self, job_id: str, row: dict[str, Any]) -> None:
        """Record (or replace) one output file of a job."""

    # --- job reads ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job, or None."""

    @abc.abstractmethod
    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's event rows after event id ``after``, oldest first."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        states: Sequence[State] | None = None,
        limit: int = 50,
        cursor: tuple[str, str] | None = None,
    ) -> list[Job]:
        """Jobs newest first; ``cursor`` = (created_at, id) of the last job of the previous page."""

    @abc.abstractmethod
    async def overview(self, statuses: list[str] | None, limit: int) -> list[dict[str, Any]]:
        """Rows of the ``jobs_overview`` view (newest first), filtered by state or status."""

    @abc.abstractmethod
    async def counts(self) -> dict[Stage, dict[str, int]]:
        """Waiting and running jobs per stage."""

    async def counts_at(self) -> tuple[dict[Stage, dict[str, int]], int | None]:
        """:meth:`counts` and the highest ``job_events`` id they include (every change with a
        higher id committed after them), for keeping counts from transitions; None when the
        adapter cannot tell (commits of several servers interleave): re-count after changes."""
        return await self.counts(), None

    async def waiting_at(self) -> tuple[list[tuple[str, str, int, str]], int] | None:
        """(id, stage, priority, created_at) of every waiting job and the highest
        ``job_events`` id the read includes, as :meth:`counts_at`; None when the adapter
        cannot tell."""
        return None

    @abc.abstractmethod
    async def position(self, job: Job) -> tuple[int, int]:
        """(1-based position among waiting jobs of its stage, waiting jobs in that stage)."""

    @abc.abstractmethod
    async def outputs(self, job_id: str) -> list[dict[str, Any]]:
        """The job's output rows, in the order they were recorded."""

    @abc.abstractmethod
    async def secrets(self, job_id: str) -> dict[str, Any]:
        """The job's per-request secrets (webhook secret, S3 keys); {} once it has ended."""

    @abc.abstractmethod
    async def cancel_requested(self) -> list[str]:
        """Ids of jobs this process runs that someone asked to cancel."""

    @abc.abstractmethod
    async def next_run_after(self, stage: Stage) -> str | None:
        """The earliest ``run_after`` among waiting jobs of ``stage`` (for retry timers)."""

    @abc.abstractmethod
    async def stats(self) -> Stats:
        """Jobs by state, webhook deliveries by state, webhook attempts by outcome."""

    # --- webhook outbox ----------------------------------------------------------------------

    @abc.abstractmethod
    async def outbox_claim(
        self, n: int, per_host: int, lease: float, per_endpoint: int | None = None
    ) -> list[dict[str, Any]]:
        """Lease up to ``n`` due deliveries, oldest first, within per-endpoint and per-host caps."""

    @abc.abstractmethod
    async def outbox_record(self, delivery: dict[str, Any], attempt: Attempt) -> bool:
        """Store one attempt and the delivery's next state; False when the lease was lost."""

    @abc.abstractmethod
    async def outbox_recover(self, max_attempts: int) -> int:
        """Deliveries left mid-attempt by a dead process (or an expired lease) are due again."""

    @abc.abstractmethod
    async def outbox_next_due(self) -> str | None:
        """When the next waiting delivery (not due yet) falls due, or None."""

    @abc.abstractmethod
    async def webhook_history(
        self, job_id: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A job's deliveries (with URLs, without secrets) and all their attempts, oldest first."""


def database_path(database: str | os.PathLike[str]) -> Path | None:
    """The file of a SQLite database setting; None for a server URL."""
    return None if is_postgres_url(database) else Path(database)
