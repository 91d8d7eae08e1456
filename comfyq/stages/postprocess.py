"""Postprocess: fetch every output over HTTP into the job's folder, upload it to S3 when the job
has S3 configured, and record it.

An upload failure never loses the file: the output keeps its local URL and carries
``upload_error``. Whether the job then fails or completes with a warning is the operator's call
(``s3_fail_job_on_upload_error``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from comfyq.comfy.backends import BackendPool
from comfyq.errors import ComfyUIUnreachable, OutputError
from comfyq.fileio import write_file
from comfyq.outputs.convert import (
    ConversionError,
    ConvertSpec,
    convert_file,
    converted_name,
    wants,
)
from comfyq.outputs.local import (
    describe_all,
    hashes_and_type,
    job_dir,
    list_outputs,
    safe_name,
)
from comfyq.outputs.recent import RECENT
from comfyq.outputs.s3 import LocalFile, S3Uploader
from comfyq.stages.runner import JobContext, StageDone
from comfyq.store import Job


class Postprocess:
    def __init__(
        self,
        pool: BackendPool,
        output_dir: Path,
        *,
        uploader: S3Uploader | None = None,
        fail_on_upload_error: bool = False,
        convert_default: ConvertSpec | None = None,
    ) -> None:
        self.pool = pool
        self.output_dir = output_dir
        self.uploader = uploader
        self.fail_on_upload_error = fail_on_upload_error
        # Several instances: the name of this instance, recorded with the job as its files' holder.
        self.holder: Callable[[], str] = lambda: ""
        self.convert_default = convert_default

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        result = dict(job.result or {})
        inp = _options(job)
        rows = await self._collect(job, result)
        converted = await self._convert(job, inp, rows, result)
        warnings = (
            await self._upload(job, inp, ctx, rows) if self.uploader is not None and rows else []
        )
        warnings = converted + warnings
        if warnings and self.fail_on_upload_error:
            for row in rows:  # kept for inspection although the job fails
                await ctx.store.put_output(job.id, row)
            first = warnings[0]
            raise OutputError(
                f"upload of {len(warnings)} of {len(rows)} output(s) failed:"
                f" {first['filename']}: {first['message']}",
                details={"upload_errors": warnings},
            )
        # Several instances: the files are on this one; the others ask it for them.
        result["held_by"] = self.holder()
        # The output rows are written in the same commit that completes the job.
        if not warnings:
            return StageDone("Processing complete.", fields={"result": result}, outputs=rows)
        result["warnings"] = [*(result.get("warnings") or []), *warnings]
        return StageDone(
            f"Processing complete with {len(warnings)} warning(s).",
            fields={"result": result},
            outputs=rows,
        )

    async def _collect(self, job: Job, result: dict[str, Any]) -> list[dict[str, Any]]:
        items = list_outputs(result.get("outputs") or {})
        folder = job_dir(self.output_dir, job.id)  # created by the first download or text write
        # Several instances: the backend may be another instance's; its files are fetched as well.
        client = self.pool.client_for(job.comfy_backend) if job.comfy_backend else None
        used: set[str] = set()
        rows: list[dict[str, Any]] = []
        for item in items:
            name = _unique(safe_name(item.filename, item.subfolder), used)
            dest = folder / name
            if item.text is not None:
                # Written and described in one thread hop.
                described = await asyncio.to_thread(_write_text, dest, item.text)
            else:
                if client is None:
                    raise ComfyUIUnreachable("the job records no backend to fetch its outputs from")
                # Written and described (hashes, type) in one thread hop.
                _, fetched = await client.download_then(
                    item.filename, item.subfolder, item.comfy_type, dest, _describe
                )
                assert fetched is not None
                described = fetched
            (sha, b3, size, mime), kept = described
            if kept is not None:  # GET /outputs answers it from memory while it is unchanged
                RECENT.put(str(dest), *kept)
            rows.append(
                {
                    "filename": name,
                    "node_id": item.node_id,
                    "output_type": item.output_type,
                    "comfy_type": item.comfy_type,
                    "subfolder": item.subfolder,
                    "mimetype": mime,
                    "size": size,
                    "sha256": sha,
                    "local_path": str(dest),
                    "url": f"/outputs/{job.id}/{name}",
                    "upload_error": None,
                    "asset_id": str(uuid.uuid4()),  # the output as a Comfy API v2 asset
                    "blake3": b3,
                }
            )
        return rows

    async def _convert(
        self, job: Job, inp: dict[str, Any], rows: list[dict[str, Any]], result: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Convert image rows as the job asks (input.convert, else the default); records each
        original under result["converted"]; one warning per failed conversion (original kept)."""
        spec = ConvertSpec.of(inp.get("convert"), self.convert_default)
        if spec is None:
            return []
        warnings: list[dict[str, Any]] = []
        originals: dict[str, Any] = dict(result.get("converted") or {})
        used = {r["filename"] for r in rows}
        for row in rows:
            if not wants(spec, row["mimetype"]):
                continue
            old_name, src = row["filename"], Path(row["local_path"])
            used.discard(old_name)
            name = _unique(converted_name(old_name, spec), used)
            dest = src.with_name(name)
            try:
                await asyncio.to_thread(convert_file, src, dest, spec)
            except ConversionError as exc:
                used.add(old_name)
                used.discard(name)
                warnings.append(
                    {
                        "type": "conversion_failed",
                        "filename": old_name,
                        "message": f"kept as {row['mimetype']}: {exc}",
                    }
                )
                continue
            RECENT.discard(str(src))  # removed once the converted file is in place
            sha, b3, size, mime = await describe_all(dest)
            originals[name] = {
                "filename": old_name,
                "mimetype": row["mimetype"],
                "size": row["size"],
            }
            row.update(
                filename=name,
                mimetype=mime,
                size=size,
                sha256=sha,
                blake3=b3,
                local_path=str(dest),
                url=f"/outputs/{job.id}/{name}",
            )
        if originals:
            result["converted"] = originals
        return warnings

    async def _upload(
        self, job: Job, inp: dict[str, Any], ctx: JobContext, rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Upload the rows' files; set url or upload_error on each; one warning per failure."""
        assert self.uploader is not None
        if not inp.get("s3") and not self.uploader.settings.configured:
            return []  # nowhere to upload: no request block, no operator bucket
        try:
            # The request's keys live in job_secrets until the job ends; read them only here.
            target = self.uploader.target(
                inp.get("s3"), (await ctx.store.secrets(job.id)).get("s3")
            )
            if target is None:
                return []
            await self.uploader.check_endpoint(target)
        except OutputError as exc:
            for row in rows:
                row["upload_error"] = exc.message
        else:
            files = [
                LocalFile(
                    r["filename"], Path(r["local_path"]), r["mimetype"], r["size"], r["sha256"]
                )
                for r in rows
            ]
            for row, up in zip(
                rows, await self.uploader.upload_all(target, job.id, files), strict=True
            ):
                if up.url is not None:
                    row["url"] = up.url
                else:
                    row["upload_error"] = up.error or "upload failed"
        return [
            {"type": "upload_error", "filename": r["filename"], "message": r["upload_error"]}
            for r in rows
            if r["upload_error"]
        ]


class _Options(msgspec.Struct):
    convert: Any = None
    s3: Any = None


class _OptionsView(msgspec.Struct):
    input: _Options | None = None


def _options(job: Job) -> dict[str, Any]:
    """input.convert and input.s3 of the job's payload (the only parts this stage reads), decoded
    without building the rest (the workflow: thousands of nodes)."""
    try:
        view = job.view("payload", _OptionsView)
    except msgspec.ValidationError:  # not the shape admission writes: read it whole
        inp = (job.payload or {}).get("input")
        return inp if isinstance(inp, dict) else {}
    if view is None or view.input is None:
        return {}
    return {"convert": view.input.convert, "s3": view.input.s3}


Described = tuple[tuple[str, str, int, str], tuple[os.stat_result, bytes] | None]


def _describe(dest: Path, data: bytes | None) -> Described:
    """(sha256, blake3, size, MIME type) of an output just written, and, when it was small
    enough to be downloaded whole, its stat and content to keep in :data:`RECENT` (run in the
    thread hop that wrote it)."""
    described = hashes_and_type(dest, data)
    if data is None or len(data) > RECENT.max_file:
        return described, None
    return described, (os.stat(dest), data)


def _write_text(dest: Path, text: str) -> Described:
    """Write a text output (UTF-8, through a ``.part`` file and a rename as downloads are) and
    describe it; blocking, run it in a thread."""
    data = text.encode()
    write_file(dest.with_name(dest.name + ".part"), data, replace=dest)
    return _describe(dest, data)


def _unique(name: str, used: set[str]) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while candidate in used:
        candidate = f"{stem}_{n}{dot}{ext}"
        n += 1
    used.add(candidate)
    return candidate
