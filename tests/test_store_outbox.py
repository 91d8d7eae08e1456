"""The webhook outbox contract, on both adapters: a job that ends writes its delivery in the same
commit; each delivery is leased to one claimer however many instances claim at once; attempts are
recorded with the delivery's next state; a lease that runs out makes the delivery due again."""

from __future__ import annotations

import asyncio
from typing import Any

from support.store import StoreFactory, database, engine, make_store, raw, store

from comfyq.clock import ManualClock
from comfyq.store import Attempt, JobStore, NewJob
from comfyq.store.model import Stage, State

__all__ = ["database", "engine", "make_store", "store"]  # fixtures

HOOK = {"url": "http://hooks.example:8080/in?token=t"}


def hooked(i: int) -> NewJob:
    return NewJob(
        id=f"j{i}",
        payload={"input": {"n": i, "webhook": HOOK}},
        payload_hash=f"h{i}",
        secrets={"webhook_secret": "whsec_x"},
    )


async def _end(store: JobStore, n: int) -> None:
    for i in range(n):
        await store.create(hooked(i), 1000)
    got = await store.claim(Stage.PREPROCESS, n, 30, "p")
    for job in got:
        await store.finish(job.id, State.FAILED, "boom", error={"type": "x", "message": "boom"})


async def test_each_delivery_is_leased_to_one_claimer(make_store: StoreFactory) -> None:
    clock = ManualClock()
    a, b = make_store(clock=clock, owner="a"), make_store(clock=clock, owner="b")
    await a.open()
    await b.open()
    await _end(a, 40)
    assert raw(a, "SELECT count(*) FROM webhook_deliveries") == [(40,)]
    seen: list[str] = []

    async def claimer(s: JobStore) -> None:
        while rows := await s.outbox_claim(3, 1000, 60.0):
            seen.extend(r["id"] for r in rows)

    await asyncio.gather(*(claimer(s) for s in (a, b) for _ in range(4)))
    assert len(seen) == 40 and len(set(seen)) == 40


async def test_attempts_are_recorded_and_an_expired_lease_is_due_again(store: JobStore) -> None:
    await _end(store, 2)
    first, second = await store.outbox_claim(10, 10, 60.0)
    assert first["secret"] == "whsec_x" and first["host"] == "hooks.example:8080"
    now = store.clock.now()
    delivered = Attempt("delivered", 204, None, now, 12)
    assert await store.outbox_record(first, delivered)
    assert not await store.outbox_record(first, delivered)  # not leased any more
    retry = Attempt("retry", 500, "HTTP 500", now, 30, next_at=now + 5)
    assert await store.outbox_record(second, retry)
    assert await store.outbox_claim(10, 10, 60.0) == []  # not due before next_at
    assert await store.outbox_next_due() is not None
    store.clock.advance(5)  # type: ignore[attr-defined]
    (again,) = await store.outbox_claim(10, 10, 60.0)
    assert again["id"] == second["id"] and again["attempts"] == 2
    # Its sender dies mid-attempt: the lease runs out and the delivery is due again.
    store.clock.advance(61)  # type: ignore[attr-defined]
    assert await store.outbox_recover(max_attempts=5) == 1
    deliveries, attempts = await store.webhook_history(second["job_id"])
    (d,) = deliveries
    assert d["state"] == "pending" and d["attempts"] == 2
    assert [a["outcome"] for a in attempts] == ["retry", "retry"]
    ended, _ = await store.webhook_history(first["job_id"])
    assert ended[0]["state"] == "delivered"
    rows: list[Any] = raw(store, "SELECT count(*) FROM webhook_deliveries WHERE secret IS NULL")
    assert rows == [(1,)]  # the delivered one's secret is gone; the pending one keeps it
    stats = await store.stats()
    assert stats.webhook_deliveries["delivered"] == 1 and stats.webhook_attempts["retry"] == 2
