"""The outbox survives restarts: a graceful stop with a delivery pending, and a sender killed with
SIGKILL in the middle of a post (a real subprocess). Each is delivered afterwards, exactly once per
successful receipt."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

from support.webhooks import Receiver, attempts, delivery_ended, hook_job, wait_until

from comfyq.netguard import AddressGuard
from comfyq.store import open_store
from comfyq.webhooks import WebhookConfig, WebhookSender

CFG = WebhookConfig(timeout=5.0, retry_base=0.02, retry_max=0.05, poll_interval=0.2)


async def test_a_pending_delivery_is_sent_after_a_graceful_restart(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    receiver = await Receiver("500").start()
    try:
        store = open_store(db)
        await store.open()
        await store.create(hook_job("j1", receiver.url, secret="s"), 10)
        await store.request_cancel("j1")
        sender = WebhookSender(store, AddressGuard(["127.0.0.1"]), CFG)
        await sender.start()
        await receiver.wait_hits(2)
        await sender.stop()
        await store.close()

        receiver.default = "ok"
        store = open_store(db)  # comfyq starts again on the same file
        await store.open()
        sender = WebhookSender(store, AddressGuard(["127.0.0.1"]), CFG)
        await sender.start()
        d = await wait_until(lambda: delivery_ended(store, "j1"))
        assert d["state"] == "delivered" and d["secret"] is None
        await sender.stop()
        assert await sender.deliver_due() == 0  # nothing left to send: no second receipt
        await sender.stop()
        assert len(receiver.ok_hits()) == 1
        assert len({h.headers["webhook-id"] for h in receiver.hits}) == 1
        outcomes = [a["outcome"] for a in await attempts(store, "j1")]
        assert outcomes[-1] == "delivered" and set(outcomes[:-1]) == {"retry"}
        await store.close()
    finally:
        await receiver.stop()


SENDER_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from comfyq.netguard import AddressGuard
    from comfyq.store import open_store
    from comfyq.webhooks import WebhookConfig, WebhookSender

    async def main():
        store = open_store(sys.argv[1])
        await store.open()
        sender = WebhookSender(
            store, AddressGuard(["127.0.0.1"]), WebhookConfig(timeout=60, poll_interval=0.2)
        )
        await sender.start()
        await asyncio.sleep(120)

    asyncio.run(main())
""")


async def test_a_sender_killed_mid_post_resends_after_restart(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    receiver = await Receiver().start()
    receiver.plan.append("hang")  # the first post never gets an answer: the sender dies waiting
    store = open_store(db)
    await store.open()
    proc: asyncio.subprocess.Process | None = None
    try:
        await store.create(hook_job("j1", receiver.url, secret="s"), 10)
        await store.request_cancel("j1")
        await store.close()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER_SCRIPT, str(db), env=env
        )
        await receiver.wait_hits(1, timeout=30)
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)

        store = open_store(db)
        await store.open()
        sender = WebhookSender(store, AddressGuard(["127.0.0.1"]), CFG)
        await sender.start()
        d = await wait_until(lambda: delivery_ended(store, "j1"))
        await sender.stop()
        assert d["state"] == "delivered" and d["attempts"] == 2
        rows = await attempts(store, "j1")
        assert [a["outcome"] for a in rows] == ["retry", "delivered"]
        assert "interrupted" in rows[0]["error"]
        assert [h.action for h in receiver.hits] == ["hang", "ok"]
        assert len({h.headers["webhook-id"] for h in receiver.hits}) == 1  # the receiver can dedupe
        await store.close()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await receiver.stop()
