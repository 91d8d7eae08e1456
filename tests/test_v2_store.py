"""The v2 part of the store (AssetStore), on both adapters, with time moved by a manual clock:
assets over shared blobs, single-use keys that expire after 24 h, admission atomic with the key,
holds, and pruning."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support.store import StoreFactory, database, engine, make_store, raw

from comfyq.clock import ManualClock
from comfyq.errors import QueueFull
from comfyq.store import JobStore
from comfyq.store.assets import IDEMPOTENCY_TTL, AssetStore, Blob, KeyReused, NewAsset
from comfyq.store.model import NewJob

__all__ = ["database", "engine", "make_store"]  # fixtures

H1 = "blake3:" + "1" * 64
H2 = "blake3:" + "2" * 64
NOW = 1_800_000_000.0


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[JobStore]:
    s = make_store(clock=ManualClock(NOW), owner="w1")
    await s.open()
    yield s


def at(store: JobStore, t: float) -> AssetStore:
    """The store's assets, its clock set to ``t``."""
    clock = store.clock
    assert isinstance(clock, ManualClock)
    clock.t = t
    return store.assets()


def asset(i: str, owner: str = "", expires: float | None = None) -> NewAsset:
    return NewAsset(i, owner, "image/png", f"{i}.png", ["input"], expires)


def job(i: str) -> NewJob:
    return NewJob(id=i, payload={"input": {"workflow_json": {}}}, payload_hash=i)


async def test_blobs_are_shared_and_dropped_with_their_last_asset(store: JobStore) -> None:
    a = at(store, NOW)
    rec, new = await a.put_asset(Blob(H1, 10, "/b/11/1"), asset("a1"))
    assert new and rec.hash == H1 and rec.size_bytes == 10 and rec.path == "/b/11/1"
    rec2, new2 = await a.put_asset(Blob(H1, 10, "/b/11/other"), asset("a2"))
    assert not new2 and rec2.path == "/b/11/1"  # the bytes already held are used
    assert await a.mint_from_hash(H1, asset("a3", "k_b"), "k_b") is None  # not k_b's
    minted = await a.mint_from_hash(H1, asset("a3"), None)
    assert minted is not None and minted.hash == H1
    assert await a.delete_asset("a1", "k_b") == ("missing", None)  # another owner's
    assert await a.delete_asset("a1", None) == ("deleted", None)
    assert await a.delete_asset("a2", "") == ("deleted", None)
    assert await a.delete_asset("a3", "") == ("deleted", "/b/11/1")  # the last one
    assert await a.delete_asset("a3", "") == ("missing", None)


async def test_keys_are_single_use_for_24_hours_and_atomic_with_the_job(store: JobStore) -> None:
    a = at(store, NOW)
    j = await a.create_job_keyed(job("j1"), 10, owner="k_a", key="key-1", asset_ids=[])
    assert j.id == "j1"
    with pytest.raises(KeyReused):
        await at(store, NOW + 60).create_job_keyed(
            job("j2"), 10, owner="k_a", key="key-1", asset_ids=[]
        )
    a = at(store, NOW)
    # Another owner's key of the same value is its own.
    await a.create_job_keyed(job("j3"), 10, owner="k_b", key="key-1", asset_ids=[])
    # A full queue refuses the job and leaves the key unclaimed.
    with pytest.raises(QueueFull):
        await a.create_job_keyed(job("j4"), 2, owner="k_a", key="key-2", asset_ids=[])
    await a.create_job_keyed(job("j4"), 10, owner="k_a", key="key-2", asset_ids=[])
    # After 24 hours the key may be used again.
    await at(store, NOW + IDEMPOTENCY_TTL + 1).create_job_keyed(
        job("j5"), 10, owner="k_a", key="key-1", asset_ids=[]
    )


async def test_holds_and_pruning(store: JobStore) -> None:
    a = at(store, NOW)
    await a.put_asset(Blob(H1, 5, "/b/11/1"), asset("a1", expires=NOW + 60))
    await a.put_asset(Blob(H2, 5, "/b/22/2"), asset("a2", expires=NOW + 60))
    await a.create_job_keyed(job("j1"), 10, owner="", key=None, asset_ids=["a1"])
    assert await a.delete_asset("a1", "") == ("in_use", None)  # an unfinished job uses it
    assert await at(store, NOW + 30).prune_assets() == []  # not expired yet
    # Expired: a2 goes with its blob; a1 stays while its job is unfinished.
    assert await at(store, NOW + 61).prune_assets() == ["/b/22/2"]
    raw(store, "DELETE FROM jobs WHERE id = 'j1'")
    assert await at(store, NOW + 62).prune_assets() == ["/b/11/1"]


async def test_re_uploading_extends_retention_never_shortens_it(store: JobStore) -> None:
    a = at(store, NOW)
    await a.put_asset(Blob(H1, 5, "/b/11/1"), asset("a1", expires=NOW + 60))
    await a.put_asset(Blob(H1, 5, "/b/11/1"), asset("a2", expires=NOW + 600))
    assert await at(store, NOW + 120).prune_assets() == []  # a1 was extended to a2's expiry
    await at(store, NOW).put_asset(Blob(H1, 5, "/b/11/1"), asset("a3", expires=NOW + 90))
    assert await at(store, NOW + 300).prune_assets() == []  # a3 did not shorten the others
    assert await at(store, NOW + 601).prune_assets() == ["/b/11/1"]
