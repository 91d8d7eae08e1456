"""Upload a job's output files to S3 (or any S3-protocol store) and hand back presigned GET URLs.

Which bucket and keys: a request's ``s3`` block falls back field by field to the operator's
settings, as in the original wrapper, with one rule added: the operator's credentials are only
ever used with the operator's own endpoint and bucket. A request that names another bucket or
endpoint must bring its own keys, and a request's endpoint must pass the address guard (the
operator's is trusted). Keys are deterministic (``{prefix}/{job id}/{file name}``), so a stage that
runs again overwrites instead of duplicating, and an object already there with the same sha256 is
not sent twice. Files stream from disk: one ``put_object`` below the multipart threshold, else
parts of ``part_size`` with a few in flight, so memory stays flat whatever the file size.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yarl import URL

from comfyq.errors import ComfyqError, OutputError
from comfyq.fileio import read_range
from comfyq.netguard import AddressGuard

if TYPE_CHECKING:
    from aiobotocore.session import AioSession, ClientCreatorContext
    from botocore.exceptions import BotoCoreError, ClientError
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("comfyq.outputs")

MiB = 1024 * 1024
MAX_PARTS = 10_000  # S3's limit per multipart upload


class S3ConfigError(OutputError):
    """The job's S3 settings cannot be used (missing fields, or another bucket without keys)."""


@dataclass(frozen=True)
class S3Settings:
    """The operator's S3 settings and the upload tuning."""

    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    bucket: str = ""
    endpoint_url: str = ""
    region: str = ""
    prefix: str = ""
    presign_expiry: int = 7 * 24 * 3600
    connect_timeout: float = 60.0
    read_timeout: float = 120.0
    attempts: int = (
        3  # per S3 request, transient errors (5xx, throttling, resets) retried by botocore
    )
    multipart_threshold: int = 16 * MiB
    part_size: int = 8 * MiB
    part_concurrency: int = 4
    file_concurrency: int = 4

    @property
    def configured(self) -> bool:
        return bool(self.access_key_id and self.secret_access_key and self.bucket)


@dataclass(frozen=True)
class S3Target:
    """Where one job's outputs go; the keys never appear in repr (logs, tracebacks)."""

    bucket: str
    endpoint_url: str
    region: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    operator_endpoint: bool  # the operator's endpoint: trusted, not checked by the address guard
    connect_timeout: float = 60.0
    attempts: int = 3


def _norm_endpoint(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        return ""
    try:
        u = URL(url.strip())
    except (ValueError, TypeError):
        return url.strip()
    return str(u.with_path(u.path.rstrip("/"))).rstrip("/")


def resolve(
    request: dict[str, Any] | None, keys: dict[str, Any] | None, op: S3Settings
) -> S3Target | None:
    """The S3 target of a job (its payload's ``s3`` block, its secret keys), or None: no upload."""
    req = request if isinstance(request, dict) else {}
    keys = keys if isinstance(keys, dict) else {}
    ak, sk = str(keys.get("access_key_id") or ""), str(keys.get("secret_access_key") or "")
    if bool(ak) != bool(sk):
        raise S3ConfigError(
            "s3: access_key_id and secret_access_key go together; give both or neither"
        )
    req_bucket = str(req.get("bucket_name") or "")
    req_endpoint = _norm_endpoint(req.get("endpoint_url"))
    op_endpoint = _norm_endpoint(op.endpoint_url)
    if not (ak or req_bucket or req_endpoint):
        # The request names nowhere of its own: the operator's bucket when it is configured.
        if not op.configured:
            return None
        req_bucket, req_endpoint = "", ""
    bucket = req_bucket or op.bucket
    endpoint = req_endpoint or op_endpoint
    if not ak:
        foreign = []
        if req_bucket and req_bucket != op.bucket:
            foreign.append(f"bucket {req_bucket!r}")
        if req_endpoint and req_endpoint != op_endpoint:
            foreign.append("endpoint_url")
        if foreign:
            raise S3ConfigError(
                f"s3: {' and '.join(foreign)} differ from the server's own,"
                " so the request must bring its"
                " own access_key_id and secret_access_key (the server's keys are only"
                " used with its own"
                " bucket and endpoint)"
            )
        ak, sk = op.access_key_id, op.secret_access_key
    missing = [
        name
        for name, v in (("bucket_name", bucket), ("access_key_id", ak), ("secret_access_key", sk))
        if not v
    ]
    if missing:
        raise S3ConfigError(
            f"s3: no {', '.join(missing)} in the request and none configured on the server"
        )
    timeout = req.get("connect_timeout")
    attempts = req.get("connect_attempts")
    return S3Target(
        bucket=bucket,
        endpoint_url=endpoint,
        region=str(req.get("region") or op.region or ""),
        access_key_id=ak,
        secret_access_key=sk,
        operator_endpoint=endpoint == op_endpoint,
        connect_timeout=float(timeout)
        if isinstance(timeout, int | float) and timeout > 0
        else op.connect_timeout,
        attempts=int(attempts) if isinstance(attempts, int) and attempts > 0 else op.attempts,
    )


@dataclass
class Upload:
    """What became of one file: a presigned URL, or the reason it is not in the bucket."""

    key: str
    url: str | None = None
    error: str | None = None
    skipped: bool = False  # the same content was already there (a stage that ran again)


@dataclass(frozen=True)
class LocalFile:
    name: str
    path: Path
    mimetype: str
    size: int
    sha256: str


class S3Uploader:
    """Uploads files of one job at a time to its :class:`S3Target`."""

    def __init__(self, settings: S3Settings, guard: AddressGuard | None = None) -> None:
        self.settings = settings
        self.guard = guard or AddressGuard()
        # aiobotocore is imported on first use: it adds ~15 MB to an idle server.
        self._session: AioSession | None = None

    @classmethod
    def from_settings(cls, settings: Any, guard: AddressGuard | None = None) -> S3Uploader:
        """Built from comfyq's Settings (``s3_*`` fields)."""
        return cls(
            S3Settings(
                access_key_id=settings.s3_access_key_id,
                secret_access_key=settings.s3_secret_access_key,
                bucket=settings.s3_bucket_name,
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                prefix=settings.s3_prefix,
                presign_expiry=settings.s3_presign_expiry,
            ),
            guard,
        )

    def target(
        self, request: dict[str, Any] | None, keys: dict[str, Any] | None
    ) -> S3Target | None:
        return resolve(request, keys, self.settings)

    def key_for(self, job_id: str, filename: str) -> str:
        """The object key of one output: ``{prefix}/{job id}/{file name}``."""
        prefix = self.settings.prefix.strip("/")
        return f"{prefix}/{job_id}/{filename}" if prefix else f"{job_id}/{filename}"

    async def check_endpoint(self, target: S3Target) -> None:
        """Refuse a request's endpoint that the address guard would refuse for a download."""
        if target.operator_endpoint or not target.endpoint_url:
            return
        try:
            url = self.guard.check_url_syntax(target.endpoint_url)
            assert url.raw_host is not None and url.port is not None  # checked by the guard
            await self.guard.resolve_checked(url.raw_host, url.port)
        except ComfyqError as exc:
            raise S3ConfigError(f"s3: endpoint_url refused: {exc.message}") from None

    def _client(self, target: S3Target) -> ClientCreatorContext[S3Client]:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        if self._session is None:
            self._session = get_session()
        cfg = AioConfig(
            connect_timeout=target.connect_timeout,
            read_timeout=self.settings.read_timeout,
            signature_version="s3v4",  # presigned URLs too (SigV2 is refused by newer AWS regions)
            retries={"total_max_attempts": max(1, target.attempts), "mode": "standard"},
            # Custom endpoints (MinIO, R2, moto...) rarely resolve bucket subdomains.
            s3={"addressing_style": "path"} if target.endpoint_url else None,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return self._session.create_client(
            "s3",
            endpoint_url=target.endpoint_url or None,
            region_name=target.region or None,
            aws_access_key_id=target.access_key_id,
            aws_secret_access_key=target.secret_access_key,
            config=cfg,
        )

    async def upload_all(
        self, target: S3Target, job_id: str, files: list[LocalFile]
    ) -> list[Upload]:
        """Upload every file (a few at a time); one :class:`Upload` per file, in order."""
        results = [Upload(self.key_for(job_id, f.name)) for f in files]
        if not files:
            return results
        try:
            async with self._client(target) as client:
                sem = asyncio.Semaphore(self.settings.file_concurrency)

                async def one(f: LocalFile, res: Upload) -> None:
                    async with sem:
                        try:
                            res.skipped = await self._upload(client, target.bucket, res.key, f)
                            res.url = await client.generate_presigned_url(
                                "get_object",
                                Params={"Bucket": target.bucket, "Key": res.key},
                                ExpiresIn=self.settings.presign_expiry,
                            )
                            # Never the presigned URL: its query string is a credential.
                            log.debug(
                                "job %s: %s %s to s3://%s/%s (%d bytes)",
                                job_id,
                                "found" if res.skipped else "uploaded",
                                f.name,
                                target.bucket,
                                res.key,
                                f.size,
                            )
                        except Exception as exc:  # noqa: BLE001 - one file's failure is that output's upload_error
                            res.error = _describe(exc)
                            log.warning(
                                "job %s: upload of %s failed: %s", job_id, f.name, res.error
                            )

                await asyncio.gather(*(one(f, r) for f, r in zip(files, results, strict=True)))
                done = [r for r in results if r.url is not None]
                if done:
                    log.info(
                        "job %s: %d of %d output(s) in s3://%s/%s",
                        job_id,
                        len(done),
                        len(files),
                        target.bucket,
                        done[0].key.rsplit("/", 1)[0] + "/",
                    )
        except (*_boto_errors(), ValueError) as exc:  # the client itself could not be made
            for r in results:
                r.error = r.error or f"S3 client: {_describe(exc)}"
            log.warning("job %s: no upload to S3: %s", job_id, results[0].error)
        return results

    async def _upload(self, client: S3Client, bucket: str, key: str, f: LocalFile) -> bool:
        """Put one file; True when an identical object was already there."""
        if await self._same_object(client, bucket, key, f):
            return True
        meta = {"sha256": f.sha256}
        if f.size < self.settings.multipart_threshold:
            body = await asyncio.to_thread(f.path.read_bytes)
            await client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType=f.mimetype, Metadata=meta
            )
            return False
        created = await client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType=f.mimetype, Metadata=meta
        )
        upload_id = created["UploadId"]
        try:
            parts = await self._parts(client, bucket, key, upload_id, f)
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with suppress(Exception):  # best effort: a lifecycle rule cleans up what this misses
                await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        return False

    async def _parts(
        self, client: S3Client, bucket: str, key: str, upload_id: str, f: LocalFile
    ) -> list[CompletedPartTypeDef]:
        part_size = max(self.settings.part_size, math.ceil(f.size / MAX_PARTS))
        done: list[CompletedPartTypeDef] = []
        inflight: set[asyncio.Task[None]] = set()

        async def send(number: int, chunk: bytes) -> None:
            r = await client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
            )
            done.append({"PartNumber": number, "ETag": r["ETag"]})

        try:
            number = 0
            # One thread hop per part reads it (open, seek, read, close): no handle across awaits.
            while chunk := await asyncio.to_thread(
                read_range, f.path, number * part_size, part_size
            ):
                number += 1
                # At most part_concurrency parts in memory besides the one just read.
                while len(inflight) >= self.settings.part_concurrency:
                    finished, inflight = await asyncio.wait(
                        inflight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for t in finished:
                        t.result()
                inflight.add(asyncio.create_task(send(number, chunk)))
                del chunk
            for outcome in await asyncio.gather(*inflight, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
            inflight = set()
        finally:
            for t in inflight:
                t.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        return sorted(done, key=lambda p: p["PartNumber"])

    async def _same_object(self, client: S3Client, bucket: str, key: str, f: LocalFile) -> bool:
        try:
            head = await client.head_object(Bucket=bucket, Key=key)
        except _boto_errors()[1]:
            return False  # absent, or no permission to look: upload
        return bool(
            head.get("ContentLength") == f.size
            and (head.get("Metadata") or {}).get("sha256") == f.sha256
        )


def _boto_errors() -> tuple[type[BotoCoreError], type[ClientError]]:
    """(BotoCoreError, ClientError), imported when first needed."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, _boto_errors()[1]):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code}: {err.get('Message') or exc}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
