"""The folded writes, on both adapters (real SQLite files, a real PostgreSQL server): a job
admitted straight to an idle preprocess worker (``JobStore.intake``: create + claim in one
commit), a hand-off that stores the next stage's columns (``claim_fields``: the ComfyUI prompt
id) and a generate claim that gives each job its prompt id (``prompt_backend``), in the same
commit. The story in the database is the one the unfolded writes tell."""

from __future__ import annotations

import uuid

import pytest
from support.store import StoreFactory, database, engine, make_store, raw, store

from comfyq.errors import QueueFull
from comfyq.store import Job, JobStore, NewJob
from comfyq.store.assets import KeyReused
from comfyq.store.model import Stage, State, Transition, prompt_message
from comfyq.store.sqlite import SqliteStore

__all__ = ["database", "engine", "make_store", "store"]  # fixtures


def new(i: int | str, priority: int = 0) -> NewJob:
    return NewJob(
        id=str(i),
        payload={"input": {"n": i}},
        payload_hash=f"h{i}",
        priority=priority,
        kind="workflow",
    )


class Worker:
    """An idle preprocess worker offered to admission (comfyq.store.base.Intake), as the stage
    runner's first stage is; ``idle`` False: none is idle."""

    lease = 30.0
    message = "Preprocessing"

    def __init__(self, idle: bool = True) -> None:
        self.idle = idle
        self.taken = 0
        self.handed: list[tuple[object, Job | None]] = []

    def take(self) -> object | None:
        if not self.idle:
            return None
        self.taken += 1
        return f"ticket-{self.taken}"

    def hand(self, ticket: object, job: Job | None) -> None:
        self.handed.append((ticket, job))


def story(events: list[dict]) -> list[tuple]:  # type: ignore[type-arg]
    return [
        (e["from_state"], e["to_state"], e["stage"], e["attempt"], e["message"]) for e in events
    ]


async def test_an_admission_to_an_idle_worker_is_claimed_in_the_same_commit(
    store: JobStore,
) -> None:
    told: list[list[Transition]] = []
    store.listen(told.append)
    worker = Worker()
    store.intake = worker
    job, created = await store.create(new(1), 10)
    # The caller gets the job as accepted (what the acceptance event says), the worker the
    # job claimed for it.
    assert created and job.state == State.PENDING and job.status == "queued"
    assert job.attempts == 0 and job.message == "Request accepted" and job.timings == {}
    ((ticket, claimed),) = worker.handed
    assert ticket == "ticket-1" and claimed is not None
    assert (claimed.state, claimed.stage, claimed.lease_owner) == ("running", "preprocess", "w1")
    assert claimed.attempts == 1 and claimed.message == "Preprocessing"
    assert claimed.timings == {"queued_ms": 0.0} and claimed.lease_expires_at is not None
    # Both events, as create then claim write them, told to the listeners in one call.
    expected = [
        (None, "pending", "preprocess", 0, "Request accepted"),
        ("pending", "running", "preprocess", 1, "Preprocessing"),
    ]
    assert story(await store.events("1")) == expected
    (trs,) = told
    assert [(t.from_state, t.to_state, t.stage, t.attempt, t.message) for t in trs] == expected
    assert [t.event_id for t in trs] == [e["id"] for e in await store.events("1")]
    (row,) = raw(store, "SELECT status, tries, events FROM jobs_overview WHERE id = '1'")
    assert row == ("processing", "1/3", 2)
    # It runs on like any claimed job.
    await store.advance("1", "preprocess done")
    assert (await store.get("1")).state == State.PENDING  # type: ignore[union-attr]


async def test_the_same_story_as_create_then_claim(store: JobStore) -> None:
    await store.create(new("a"), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "Preprocessing")
    store.intake = Worker()
    await store.create(new("b"), 10)
    cols = "state, stage, attempts, message, lease_owner, timings, created_at = updated_at"
    a = raw(store, f"SELECT {cols} FROM jobs WHERE id = 'a'")
    b = raw(store, f"SELECT {cols} FROM jobs WHERE id = 'b'")
    assert a == b
    assert story(await store.events("a")) == story(await store.events("b"))


async def test_not_claimed_when_a_job_of_equal_or_higher_priority_waits(store: JobStore) -> None:
    await store.create(new("old", priority=5), 10)  # waiting, claimable: ahead in claim order
    worker = Worker()
    store.intake = worker
    job, created = await store.create(new("same", priority=5), 10)
    assert created and job.state == State.PENDING
    assert worker.handed == [("ticket-1", None)]  # the worker is given back
    assert [e["to_state"] for e in await store.events("same")] == ["pending"]
    # A higher priority than anything waiting goes straight to the idle worker.
    job, _ = await store.create(new("urgent", priority=9), 10)
    assert job.state == State.PENDING
    claimed = worker.handed[-1][1]
    assert claimed is not None and claimed.id == "urgent" and claimed.state == State.RUNNING
    # The claim order of the rest is untouched.
    got = await store.claim(Stage.PREPROCESS, 5, 30, "p")
    assert [j.id for j in got] == ["old", "same"]


async def test_a_job_waiting_for_a_retry_does_not_hold_admissions_back(store: JobStore) -> None:
    await store.create(new("r"), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.retry_later("r", 60, {"type": "comfyui_unreachable", "message": "x"})
    worker = Worker()
    store.intake = worker
    await store.create(new("n"), 10)
    assert worker.handed[-1][1] is not None  # the waiting one is not claimable for a minute


async def test_repeats_and_refusals_give_the_worker_back(store: JobStore) -> None:
    worker = Worker()
    store.intake = worker
    await store.create(new(1), 2)
    again, created = await store.create(new(1), 2)
    assert not created and again.id == "1" and worker.handed[-1] == ("ticket-2", None)
    await store.create(new(2), 2)
    with pytest.raises(QueueFull):  # a full queue admits nothing
        await store.create(new(3), 2)
    assert worker.handed[-1] == ("ticket-4", None)
    assert len(worker.handed) == 4 and await store.get("3") is None


async def test_no_idle_worker_admits_as_before(store: JobStore) -> None:
    worker = Worker(idle=False)
    store.intake = worker
    job, created = await store.create(new(1), 10)
    assert created and job.state == State.PENDING and worker.handed == []
    assert [e["to_state"] for e in await store.events("1")] == ["pending"]


async def test_secrets_are_kept_with_a_claimed_admission(store: JobStore) -> None:
    store.intake = Worker()
    n = new(1)
    n.secrets = {"webhook_secret": "whsec"}
    await store.create(n, 10)
    assert await store.secrets("1") == {"webhook_secret": "whsec"}


async def test_a_crash_after_a_claimed_admission_is_recovered_as_a_claimed_job(
    make_store: StoreFactory,
) -> None:
    dead = make_store(owner="dead")
    await dead.open()
    dead.intake = Worker()
    await dead.create(new(1), 10)
    await dead.close()  # the process dies with the job claimed by it
    alive = make_store(owner="alive")
    if not isinstance(alive, SqliteStore):

        async def dead_owners() -> list[str]:
            return ["dead"]

        alive.dead_owners = dead_owners  # type: ignore[attr-defined]
    await alive.open()
    try:
        (tr,) = await alive.recover()
        assert (tr.job_id, tr.to_state, tr.stage, tr.attempt) == ("1", "pending", "preprocess", 1)
        assert [e["to_state"] for e in await alive.events("1")] == [
            "pending",
            "running",
            "pending",
        ]
        (claimed,) = await alive.claim(Stage.PREPROCESS, 1, 30, "p")
        assert claimed.id == "1" and claimed.attempts == 1
    finally:
        await alive.close()


async def test_an_expired_claimed_admission_is_reaped(store: JobStore) -> None:
    store.intake = Worker()
    await store.create(new(1), 10)
    store.intake = None
    store.clock.advance(31)  # type: ignore[attr-defined]
    (tr,) = await store.reap(grace=30)
    assert (tr.to_state, tr.stage, tr.attempt) == ("pending", "preprocess", 2)
    assert "Lease expired" in tr.message


async def test_a_hand_off_stores_the_next_stages_columns(store: JobStore) -> None:
    await store.create(new(1), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    trs = await store.advance_and_claim(
        "1",
        "Preprocessing complete",
        {"prepared": {"workflow": {}}},
        30,
        "Waiting for ComfyUI",
        claim_fields={
            "comfy_prompt_id": "pid-1",
            "comfy_backend": "http://127.0.0.1:8188",
            "message": "Generation started (ComfyUI job: pid-1)",
        },
    )
    assert [(t.to_state, t.stage, t.message) for t in trs] == [
        ("pending", "generate", "Preprocessing complete"),
        ("running", "generate", "Waiting for ComfyUI"),
    ]
    claimed = trs[1].job
    assert claimed is not None
    assert (claimed.comfy_prompt_id, claimed.comfy_backend) == ("pid-1", "http://127.0.0.1:8188")
    assert claimed.message == "Generation started (ComfyUI job: pid-1)"
    assert claimed.prepared == {"workflow": {}}
    stored = await store.get("1")
    assert stored is not None and stored.comfy_prompt_id == "pid-1"
    assert stored.message == claimed.message and stored.state == State.RUNNING
    assert [e["message"] for e in await store.events("1")][-2:] == [
        "Preprocessing complete",
        "Waiting for ComfyUI",
    ]


async def test_claim_fields_are_not_written_unless_claimed_in_that_commit(
    store: JobStore,
) -> None:
    await store.create(new(1), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.request_cancel("1")  # the slow path: the job ends cancelled, nothing claimed
    (tr,) = await store.advance_and_claim(
        "1", "done", None, 30, "c", claim_fields={"comfy_prompt_id": "pid-x"}
    )
    assert tr.to_state == State.CANCELLED
    stored = await store.get("1")
    assert stored is not None and stored.comfy_prompt_id is None


async def test_a_hand_off_runs_no_state_trigger(store: JobStore) -> None:
    """The job is running before and after a hand-off: the unfinished count stays right."""
    store.intake = Worker()
    await store.create(new(1), 10)
    store.intake = None
    for stage in ("preprocess", "generate"):
        await store.advance_and_claim("1", f"{stage} done", None, 30, "c")
    assert (await store.counts())[Stage.POSTPROCESS] == {"waiting": 0, "running": 1}
    await store.advance("1", "done")
    assert (await store.get("1")).state == State.COMPLETED  # type: ignore[union-attr]
    await store.create(new(2), 1)  # the count went back to 0: one more fits under a limit of 1


async def test_a_generate_claim_gives_each_job_a_fresh_prompt_id(store: JobStore) -> None:
    for i in range(4):
        await store.create(new(i), 10)
        await store.claim(Stage.PREPROCESS, 1, 30, "p")
        await store.advance(str(i), "prepared")
    # One of them already has a prompt id (its submission may have reached ComfyUI): it keeps it.
    await store.claim(Stage.GENERATE, 1, 30, "g")
    await store.update("0", {"comfy_prompt_id": "kept", "comfy_backend": "http://a"})
    await store.retry_later("0", 0, {"type": "comfyui_unreachable", "message": "x"})
    got = await store.claim(Stage.GENERATE, 4, 30, "Waiting for ComfyUI", "http://b")
    assert sorted(j.id for j in got) == ["0", "1", "2", "3"]
    by_id = {j.id: j for j in got}
    assert (by_id["0"].comfy_prompt_id, by_id["0"].comfy_backend) == ("kept", "http://a")
    assert by_id["0"].message == "Waiting for ComfyUI"
    fresh = [by_id[i] for i in "123"]
    ids = [j.comfy_prompt_id for j in fresh]
    assert len(set(ids)) == 3
    for j in fresh:
        assert j.comfy_prompt_id is not None and j.comfy_backend == "http://b"
        parsed = uuid.UUID(j.comfy_prompt_id)
        assert parsed.version == 4 and str(parsed) == j.comfy_prompt_id  # canonical
        assert j.message == prompt_message(j.comfy_prompt_id)
        stored = await store.get(j.id)
        assert stored is not None and stored.comfy_prompt_id == j.comfy_prompt_id
        # The claim event is the one a claim writes.
        assert (await store.events(j.id))[-1]["message"] == "Waiting for ComfyUI"


async def test_a_claim_without_a_backend_assigns_nothing(store: JobStore) -> None:
    await store.create(new(1), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.advance("1", "prepared")
    (job,) = await store.claim(Stage.GENERATE, 1, 30, "g")
    assert job.comfy_prompt_id is None and job.comfy_backend is None and job.message == "g"


async def test_a_v2_admission_to_an_idle_worker_is_claimed_too(store: JobStore) -> None:
    worker = Worker()
    store.intake = worker
    assets = store.assets()
    job = await assets.create_job_keyed(new("v"), 10, owner="k_a", key="key-1", asset_ids=["a1"])
    assert job.state == State.PENDING and job.message == "Request accepted"
    ((_, claimed),) = worker.handed
    assert claimed is not None and claimed.id == "v" and claimed.state == State.RUNNING
    assert [e["to_state"] for e in await store.events("v")] == ["pending", "running"]
    assert raw(store, "SELECT asset_id FROM job_assets WHERE job_id = 'v'") == [("a1",)]
    # A reused key refuses the job and gives the worker back.
    with pytest.raises(KeyReused):
        await assets.create_job_keyed(new("w"), 10, owner="k_a", key="key-1", asset_ids=[])
    assert worker.handed[-1] == ("ticket-2", None) and await store.get("w") is None
