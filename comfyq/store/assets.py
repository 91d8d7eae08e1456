"""The Comfy API v2 part of the store: blobs, assets, the uploaded assets jobs use, single-use
idempotency keys, and the asset identity of job outputs (migration 0003 on either engine).

``AssetStore`` is the interface (``JobStore.assets()`` gives the adapter's); it speaks the domain
(put_asset, mint_from_hash, create_job_keyed, ...), never SQL. The records are shared here.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from comfyq.errors import ComfyqError
from comfyq.store.model import Job, NewJob, loads

IDEMPOTENCY_TTL = 24 * 3600.0


class KeyReused(ComfyqError):
    """An Idempotency-Key was already presented (single use, no replay)."""

    type = "idempotency_key_reuse"
    http_status = 422


@dataclass(frozen=True)
class Blob:
    """Bytes the server holds once, named by their blake3 hash."""

    hash: str
    size_bytes: int
    path: str


@dataclass(frozen=True)
class AssetRecord:
    """An asset as the store knows it: an uploaded file or a job's output."""

    id: str
    hash: str | None
    size_bytes: int
    content_type: str
    file_path: str | None
    created_at: str
    expires_at: str | None
    owner: str
    path: str | None  # the local file, when the bytes are here
    url: str | None  # an external URL (an output uploaded to S3), when they are not
    job_id: str | None = None
    node_id: str | None = None
    output_type: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewAsset:
    """An asset to mint over a blob."""

    id: str
    owner: str
    content_type: str
    file_path: str | None
    tags: list[str]
    expires_at: float | None


def asset_record(row: Any) -> AssetRecord:
    return AssetRecord(
        id=row["id"],
        hash=row["hash"],
        size_bytes=int(row["size_bytes"] or 0),
        content_type=row["content_type"],
        file_path=row["file_path"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        owner=row["owner"],
        path=row["path"],
        url=None,
        tags=tuple(loads(row["tags"]) or ()),
    )


def output_asset(row: Any) -> AssetRecord:
    url = row["url"]
    external = isinstance(url, str) and url.startswith(("http://", "https://"))
    return AssetRecord(
        id=row["asset_id"],
        hash=f"blake3:{row['blake3']}" if row["blake3"] else None,
        size_bytes=int(row["size"] or 0),
        content_type=row["mimetype"],
        file_path=row["filename"],
        created_at=row["created_at"],
        expires_at=None,  # the job's: the caller maps it
        owner="",
        path=row["local_path"],
        url=url if external else None,
        job_id=row["job_id"],
        node_id=row["node_id"],
        output_type=row["output_type"],
    )


class AssetStore(abc.ABC):
    """Assets, blobs and idempotency keys of one store (each adapter writes its own SQL)."""

    @abc.abstractmethod
    async def put_asset(
        self, blob: Blob, new: NewAsset, key: str | None = None
    ) -> tuple[AssetRecord, bool]:
        """Record a stored blob and mint an asset over it; ``(asset, blob_was_new)``."""

    @abc.abstractmethod
    async def mint_from_hash(
        self, hash_: str, new: NewAsset, scope: str | None
    ) -> AssetRecord | None:
        """A new asset over bytes ``scope`` (None: anyone) already has; None when there are none."""

    @abc.abstractmethod
    async def delete_asset(self, asset_id: str, scope: str | None) -> tuple[str, str | None]:
        """Delete an uploaded asset of ``scope`` (None: anyone's): ``deleted`` (with a blob file
        to remove), ``missing`` or ``in_use``."""

    @abc.abstractmethod
    async def create_job_keyed(
        self,
        new: NewJob,
        max_queue: int,
        *,
        owner: str,
        key: str | None,
        asset_ids: Sequence[str],
    ) -> Job:
        """Durably admit a job with its Idempotency-Key and the assets it uses."""

    @abc.abstractmethod
    async def prune_assets(self) -> list[str]:
        """Remove expired assets and keys; the blob files to delete."""

    @abc.abstractmethod
    async def asset(self, asset_id: str) -> AssetRecord | None:
        """An uploaded asset or a job's output, by id."""

    @abc.abstractmethod
    async def assets(self, ids: Sequence[str]) -> dict[str, AssetRecord]:
        """Uploaded assets by id (those that exist)."""

    @abc.abstractmethod
    async def blob_for(self, hash_: str, scope: str | None) -> Blob | None:
        """The blob with this hash, when ``scope`` (an owner; None: anyone) has an asset over it."""

    @abc.abstractmethod
    async def blob(self, hash_: str) -> Blob | None:
        """The blob with this hash, whoever holds it (dedup of uploads)."""

    @abc.abstractmethod
    async def job_outputs(self, job_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Output rows (with asset id and blake3) of some jobs, in the order they were recorded."""
