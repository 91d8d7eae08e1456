"""The v2 store methods on a real SQLite file, with time passed in: assets over shared blobs,
single-use keys that expire after 24 h, admission atomic with the key, holds, and pruning."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfyq.errors import QueueFull
from comfyq.store.assets import (
    IDEMPOTENCY_TTL,
    Blob,
    KeyReused,
    NewAsset,
    create_job_keyed,
    delete_asset,
    mint_from_hash,
    prune_assets,
    put_asset,
)
from comfyq.store.jobs import open_migrated
from comfyq.store.model import NewJob
from comfyq.store.writer import Writer

H1 = "blake3:" + "1" * 64
H2 = "blake3:" + "2" * 64
NOW = 1_800_000_000.0


@pytest.fixture
def w(tmp_path: Path) -> Writer:
    db = tmp_path / "s.db"
    open_migrated(db)
    return Writer(db)


def asset(i: str, owner: str = "", expires: float | None = None) -> NewAsset:
    return NewAsset(i, owner, "image/png", f"{i}.png", ["input"], expires)


def job(i: str) -> NewJob:
    return NewJob(id=i, payload={"input": {"workflow_json": {}}}, payload_hash=i)


def test_blobs_are_shared_and_dropped_with_their_last_asset(w: Writer) -> None:
    rec, new = w.run_sync(put_asset, Blob(H1, 10, "/b/11/1"), asset("a1"), NOW, None)
    assert new and rec.hash == H1 and rec.size_bytes == 10 and rec.path == "/b/11/1"
    rec2, new2 = w.run_sync(put_asset, Blob(H1, 10, "/b/11/other"), asset("a2"), NOW, None)
    assert not new2 and rec2.path == "/b/11/1"  # the bytes already held are used
    assert w.run_sync(mint_from_hash, H1, asset("a3", "k_b"), NOW, "k_b") is None  # not k_b's
    minted = w.run_sync(mint_from_hash, H1, asset("a3"), NOW, None)
    assert minted is not None and minted.hash == H1
    assert w.run_sync(delete_asset, "a1", "k_b") == ("missing", None)  # another owner's
    assert w.run_sync(delete_asset, "a1", None) == ("deleted", None)
    assert w.run_sync(delete_asset, "a2", "") == ("deleted", None)
    assert w.run_sync(delete_asset, "a3", "") == ("deleted", "/b/11/1")  # the last one
    assert w.run_sync(delete_asset, "a3", "") == ("missing", None)


def test_keys_are_single_use_for_24_hours_and_atomic_with_the_job(w: Writer) -> None:
    j, tr = w.run_sync(create_job_keyed, job("j1"), NOW, 10, "k_a", "key-1", [])
    assert tr is not None and j.id == "j1"
    with pytest.raises(KeyReused):
        w.run_sync(create_job_keyed, job("j2"), NOW + 60, 10, "k_a", "key-1", [])
    # Another owner's key of the same value is its own.
    w.run_sync(create_job_keyed, job("j3"), NOW, 10, "k_b", "key-1", [])
    # A full queue refuses the job and leaves the key unclaimed.
    with pytest.raises(QueueFull):
        w.run_sync(create_job_keyed, job("j4"), NOW, 2, "k_a", "key-2", [])
    w.run_sync(create_job_keyed, job("j4"), NOW, 10, "k_a", "key-2", [])
    # After 24 hours the key may be used again.
    w.run_sync(create_job_keyed, job("j5"), NOW + IDEMPOTENCY_TTL + 1, 10, "k_a", "key-1", [])


def test_holds_and_pruning(w: Writer) -> None:
    w.run_sync(put_asset, Blob(H1, 5, "/b/11/1"), asset("a1", expires=NOW + 60), NOW, None)
    w.run_sync(put_asset, Blob(H2, 5, "/b/22/2"), asset("a2", expires=NOW + 60), NOW, None)
    w.run_sync(create_job_keyed, job("j1"), NOW, 10, "", None, ["a1"])
    assert w.run_sync(delete_asset, "a1", "") == ("in_use", None)  # an unfinished job uses it
    assert w.run_sync(prune_assets, NOW + 30) == []  # not expired yet
    # Expired: a2 goes with its blob; a1 stays while its job is unfinished.
    assert w.run_sync(prune_assets, NOW + 61) == ["/b/22/2"]
    w.run_sync(lambda c: c.execute("DELETE FROM jobs WHERE id = 'j1'"))
    assert w.run_sync(prune_assets, NOW + 62) == ["/b/11/1"]


def test_re_uploading_extends_retention_never_shortens_it(w: Writer) -> None:
    w.run_sync(put_asset, Blob(H1, 5, "/b/11/1"), asset("a1", expires=NOW + 60), NOW, None)
    w.run_sync(put_asset, Blob(H1, 5, "/b/11/1"), asset("a2", expires=NOW + 600), NOW, None)
    assert w.run_sync(prune_assets, NOW + 120) == []  # a1 was extended to a2's expiry
    w.run_sync(put_asset, Blob(H1, 5, "/b/11/1"), asset("a3", expires=NOW + 90), NOW, None)
    assert w.run_sync(prune_assets, NOW + 300) == []  # a3 did not shorten the others
    assert w.run_sync(prune_assets, NOW + 601) == ["/b/11/1"]
