"""The chaos run's accounting finds what is missing: a lost job, a job that never ended, an owed
webhook that never arrived, a duplicate delivery, an extra prompt, an object the bucket lacks.

The records are real: a comfyq database written through JobStore, JSON-lines files like the ones
the receiver and the simulator write, and moto's S3 server.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no types
from support.s3 import make_bucket

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # bench/ is a folder of the checkout

from bench.chaos_client import workflow
from bench.chaos_report import Inputs, account, charged_lookups, lost_anything, render
from comfyq.clock import parse_iso
from comfyq.store import JobStore, NewJob, open_store
from comfyq.store.model import Stage

PNG = b"\x89PNG\r\n\x1a\n not really, but bytes with a hash"


def new_job(job_id: str) -> NewJob:
    payload = {
        "input": {
            "workflow_json": workflow(job_id, 1),
            "webhook": {"url": "http://127.0.0.1:9/hook"},
        }
    }
    return NewJob(id=job_id, payload=payload, payload_hash=job_id)


async def complete(store: JobStore, job_id: str) -> None:
    for stage in Stage:
        [job] = await store.claim(stage, 1, 30.0, "test")
        assert job.id == job_id
        outputs = None
        if stage == "postprocess":
            outputs = [
                {
                    "filename": "out.png",
                    "sha256": hashlib.sha256(PNG).hexdigest(),
                    "size": len(PNG),
                    "local_path": "/nowhere/out.png",
                    "url": "http://127.0.0.1:1/bench-outputs/ok/out.png",
                }
            ]
        await store.advance(job_id, f"{stage} done", None, outputs)


def jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


async def test_accounting_finds_every_kind_of_loss(tmp_path: Path, moto_url: str) -> None:
    store = open_store(tmp_path / "q.db")
    await store.open()
    for job_id in ("ok", "cancelled", "stuck"):
        await store.create(new_job(job_id), 100)
    await complete(store, "ok")
    await store.request_cancel("cancelled")
    await store.close()

    conn = sqlite3.connect(tmp_path / "q.db")
    hooks = dict(conn.execute("SELECT job_id, id FROM webhook_deliveries").fetchall())
    conn.close()
    assert set(hooks) == {"ok", "cancelled"}  # the outbox owes one delivery per ended job
    now = time.time()
    # "ok" delivered twice under one id (a duplicate), "cancelled" only answered 503: lost
    receiver = [
        {
            "at": now,
            "webhook_id": hooks["ok"],
            "job_id": "ok",
            "event": "completed",
            "answered": 204,
            "sig_ok": True,
        },
        {
            "at": now,
            "webhook_id": hooks["ok"],
            "job_id": "ok",
            "event": "completed",
            "answered": 204,
            "sig_ok": True,
        },
        {
            "at": now,
            "webhook_id": hooks["cancelled"],
            "job_id": "cancelled",
            "event": "cancelled",
            "answered": 503,
            "sig_ok": True,
        },
    ]
    jsonl(tmp_path / "webhooks.jsonl", receiver)
    prompts = [
        {"at": now, "boot": b, "prompt_id": f"p{b}", "prompt": workflow("ok", 1)}
        for b in ("a", "b")
    ]
    jsonl(tmp_path / "prompts.jsonl", prompts)

    make_bucket(moto_url, "bench-outputs")
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    s3.put_object(Bucket="bench-outputs", Key="ok/out.png", Body=PNG)
    s3.put_object(Bucket="bench-outputs", Key="stray/x.png", Body=b"x")

    inp = Inputs(
        jobs=4,
        accepted={"ok": 202, "cancelled": 202, "stuck": 200, "missing": 202},
        rejected={},
        api_final={"ok": "completed", "cancelled": "cancelled", "stuck": "queued"},
        s3_url=moto_url,
        bucket="bench-outputs",
        timeline=[],
        submit_stats={},
        duration_s=1.0,
    )
    r = account(tmp_path / "q.db", tmp_path / "webhooks.jsonl", tmp_path / "prompts.jsonl", inp)

    assert r["lost"] == 2
    assert r["lost_jobs"]["missing_in_db"] == ["missing"] and r["lost_jobs"]["not_final_in_db"] == [
        "stuck"
    ]
    assert (r["completed"], r["cancelled"], r["failed"]) == (1, 1, 0)
    assert r["accepted_by_retry_200"] == 1
    assert (r["webhooks_owed"], r["webhooks_delivered"], r["webhooks_lost"]) == (2, 1, 1)
    assert r["webhooks_lost_jobs"] == ["cancelled"]
    assert r["webhooks_duplicate"] == 1 and r["webhooks_duplicate_ids"] == [hooks["ok"]]
    assert r["prompts_submitted"] == 2 and r["attempts_total"] == 1 + 0 + 0
    assert (
        r["jobs_prompts_gt_attempts"] == 1 and r["jobs_prompts_gt_attempts_list"][0]["job"] == "ok"
    )
    assert r["s3"]["expected"] == r["s3"]["present"] == 1 and r["s3"]["extra"] == ["stray/x.png"]
    assert r["s3"]["no_s3_url"] == ["ok/out.png"]  # its URL does not point at this bucket
    assert lost_anything(r)
    text = render(r)
    assert "LOST           2" in text and "RESULT: LOST SOMETHING" in text

    s3.put_object(Bucket="bench-outputs", Key="ok/out.png", Body=b"other bytes")
    r = account(tmp_path / "q.db", tmp_path / "webhooks.jsonl", tmp_path / "prompts.jsonl", inp)
    assert r["s3"]["mismatch"] == ["ok/out.png"]
    s3.delete_object(Bucket="bench-outputs", Key="ok/out.png")
    r = account(tmp_path / "q.db", tmp_path / "webhooks.jsonl", tmp_path / "prompts.jsonl", inp)
    assert r["s3"]["missing"] == ["ok/out.png"] and r["s3"]["present"] == 0


def test_a_lookup_charged_right_after_a_charged_failure_is_a_double_charge() -> None:
    def ev(at: str, to: str, msg: str) -> dict[str, Any]:
        return {
            "at": f"2026-01-01T00:00:{at}Z",
            "to_state": to,
            "stage": "generate",
            "message": msg,
        }

    events = [
        ev("00.000", "running", "Waiting for ComfyUI"),  # run 1: its POST /prompt fails
        ev("03.000", "pending", "Attempt 1 failed (comfyui_unreachable); retrying in 0.5s"),
        ev("04.000", "running", "Waiting for ComfyUI"),  # run 2: only looks the prompt id up
        ev("04.500", "pending", "Attempt 2 failed (prompt_lost); retrying in 0.5s"),
        ev("05.000", "running", "Waiting for ComfyUI"),  # run 3: submits, and completes
        ev("07.000", "pending", "Generation complete. Queued for post-processing."),
    ]
    sent_at_5_1 = [{"at": parse_iso("2026-01-01T00:00:05.100Z")}]
    assert charged_lookups(events, sent_at_5_1) == (1, 1)
    resumed = [
        ev("00.000", "running", "Waiting for ComfyUI"),
        ev("01.000", "pending", "Resumed in generate after a restart"),
        *events[2:],
    ]  # the run before the lookup was comfyq's restart: not charged, so no double
    assert charged_lookups(resumed, sent_at_5_1) == (1, 0)
    assert charged_lookups(events, [{"at": parse_iso("2026-01-01T00:00:04.200Z")}]) == (
        0,
        0,
    )  # run 2 did submit
