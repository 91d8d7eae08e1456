"""The event bus: fan-out to subscribers; with nobody subscribed nothing is built, but what later
subscribers and Results rely on (latest progress, last event row) is still kept."""

from __future__ import annotations

import asyncio

from comfyq.events import ALL, EventBus
from comfyq.store.model import Stage, State, Transition


def tr(event_id: int, job_id: str, to_state: State, stage: Stage = Stage.GENERATE) -> Transition:
    return Transition(
        event_id,
        job_id,
        State.PENDING,
        to_state,
        stage,
        1,
        f"to {to_state}",
        "2027-01-01T00:00:00.000000Z",
    )


async def test_unwatched_jobs_keep_progress_and_row_ids_for_later_subscribers() -> None:
    bus = EventBus()
    bus.on_transitions([tr(7, "a", State.RUNNING)])
    bus.live("a", "progress", {"value": 1, "max": 4})
    assert bus.progress["a"] == {"value": 1, "max": 4} and bus.published == 2
    sub = bus.subscribe("a")
    bus.live("a", "progress", {"value": 2, "max": 4})
    ev = await sub.get(1)
    assert (
        ev is not None
        and ev.kind == "progress"
        and ev.id.startswith("7.")
        and ev.data["value"] == 2
    )
    bus.on_transitions([tr(8, "a", State.PENDING, Stage.POSTPROCESS)])
    ev = await sub.get(1)
    assert ev is not None and (ev.id, ev.kind, ev.data["state"], ev.final) == (
        "8",
        "state",
        "pending",
        False,
    )
    assert "a" not in bus.progress  # a job back in a queue has no live progress
    sub.close()
    bus.on_transitions([tr(9, "a", State.COMPLETED, Stage.POSTPROCESS)])
    assert bus.published == 5 and "a" not in bus._last_row


async def test_a_subscriber_to_every_job_gets_everything_in_order() -> None:
    bus = EventBus()
    other = bus.subscribe("b")
    every = bus.subscribe(ALL)
    bus.on_transitions([tr(1, "a", State.RUNNING), tr(2, "b", State.RUNNING)])
    bus.live("a", "preview", {"node": "3"}, b"png")
    got = [await every.get(1) for _ in range(3)]
    assert [(e.job_id, e.kind) for e in got if e is not None] == [
        ("a", "state"),
        ("b", "state"),
        ("a", "preview"),
    ]
    assert got[2] is not None and got[2].payload == b"png"
    only_b = await other.get(1)
    assert only_b is not None and only_b.job_id == "b" and await other.get(0.01) is None


async def test_a_wait_until_a_deadline_keeps_one_timer_for_that_deadline() -> None:
    loop = asyncio.get_running_loop()
    bus = EventBus()
    sub = bus.subscribe("a")
    deadline = loop.time() + 0.2
    bus.live("a", "progress", {"value": 1})
    # An event already buffered is returned at once, whatever the deadline.
    ev = await sub.get(deadline=loop.time() - 1)
    assert ev is not None and ev.data == {"value": 1}
    # Events arriving before the deadline end the wait; the deadline's timer stays for the next.
    loop.call_later(0.02, bus.live, "a", "progress", {"value": 2})
    ev = await sub.get(deadline=deadline)
    assert ev is not None and ev.data == {"value": 2} and list(sub._alarms) == [deadline]
    loop.call_later(0.02, bus.live, "a", "progress", {"value": 3})
    ev = await sub.get(deadline=deadline)
    assert ev is not None and ev.data == {"value": 3} and list(sub._alarms) == [deadline]
    # Nothing more: None once the loop's clock reaches the deadline, and the timer is gone.
    assert await sub.get(deadline=deadline) is None
    assert loop.time() >= deadline and not sub._alarms
    # A deadline already passed: None at once, and no timer.
    assert await sub.get(deadline=deadline) is None and not sub._alarms
    # Closing cancels a timer still armed (the bus's, when nobody else waits for it).
    later = loop.time() + 30
    loop.call_later(0.01, bus.live, "a", "progress", {"value": 4})
    assert await sub.get(deadline=later) is not None
    alarm = bus.alarms._timer
    assert alarm is not None and bus.alarms.pending() == 1
    sub.close()
    assert alarm.cancelled() and not sub._alarms and bus.alarms.pending() == 0


async def test_subscriptions_waiting_for_one_deadline_share_the_bus_timer() -> None:
    loop = asyncio.get_running_loop()
    bus = EventBus()
    subs = [bus.subscribe(str(i)) for i in range(5)]
    later = loop.time() + 30
    deadline = loop.time() + 0.05
    waits = [asyncio.ensure_future(s.get(deadline=later)) for s in subs[:2]]
    waits += [asyncio.ensure_future(s.get(deadline=deadline)) for s in subs[2:]]
    await asyncio.sleep(0)
    # Two deadlines, one timer: armed for the earlier one.
    timer = bus.alarms._timer
    assert timer is not None and timer.when() == deadline and bus.alarms.pending() == 2
    assert await asyncio.gather(*waits[2:]) == [None, None, None]
    assert loop.time() >= deadline and not waits[0].done()
    # Then armed for the later one; a closed subscription no longer waits for it.
    timer = bus.alarms._timer
    assert timer is not None and timer.when() == later
    subs[0].close()
    assert bus.alarms._timer is timer and bus.alarms.pending() == 1
    bus.live("1", "progress", {"value": 1})
    assert (await waits[1]) is not None
    subs[1].close()
    assert timer.cancelled() and bus.alarms._timer is None and bus.alarms.pending() == 0
    waits[0].cancel()


async def test_an_urgent_wait_until_a_deadline_holds_all_but_the_final_event() -> None:
    loop = asyncio.get_running_loop()
    bus = EventBus()
    sub = bus.subscribe("a")
    start = loop.time()
    loop.call_later(0.01, bus.on_transitions, [tr(1, "a", State.RUNNING)])
    # A non-final event does not end an urgent wait: it is returned at the deadline.
    ev = await sub.get(urgent=True, deadline=start + 0.15)
    assert ev is not None and ev.kind == "state" and loop.time() >= start + 0.15
    loop.call_later(0.01, bus.on_transitions, [tr(2, "a", State.COMPLETED)])
    ev = await sub.get(urgent=True, deadline=loop.time() + 30)
    assert ev is not None and ev.final  # the final event ends it at once
    sub.close()
