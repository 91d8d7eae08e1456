"""The chaos run's accounting: what the client saw accepted, what the database, the webhook
receiver's file, the simulator's prompt log and the bucket say happened, and what does not add up.

Everything here reads records that outlive the processes that wrote them (SQLite, append-only
JSON-lines files, the S3 server), never the memory of a process that was killed.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfyq.clock import parse_iso
from comfyq.sim.promptlog import read_prompt_log

TERMINAL = ("completed", "failed", "cancelled")
_IDS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{16,}\b")


def reason(error: dict[str, Any] | None) -> str:
    """``type: message`` of a job's error, with ids blanked so that equal causes count together."""
    if not error:
        return "(no error recorded)"
    return f"{error.get('type')}: {_IDS.sub('<id>', str(error.get('message', '')))}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass
class DbView:
    """The parts of the database the accounting needs."""

    jobs: dict[str, dict[str, Any]]
    events: dict[str, list[dict[str, Any]]]
    deliveries: dict[str, list[dict[str, Any]]]
    outputs: dict[str, list[dict[str, Any]]]


def read_db(path: Path) -> DbView:
    """Jobs, their events, webhook deliveries and outputs, keyed by job id."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        jobs = {
            r["id"]: dict(r)
            for r in conn.execute(
                "SELECT id, state, stage, attempts, max_attempts, error, comfy_prompt_id,"
                " finished_at FROM jobs"
            )
        }
        for j in jobs.values():
            j["error"] = json.loads(j["error"]) if j["error"] else None
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in conn.execute(
            "SELECT job_id, at, from_state, to_state, stage, attempt, message FROM job_events"
            " ORDER BY id"
        ):
            events[r["job_id"]].append(dict(r))
        deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in conn.execute(
            "SELECT id, job_id, event, state, attempts, last_error FROM webhook_deliveries"
        ):
            deliveries[r["job_id"]].append(dict(r))
        outputs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in conn.execute(
            "SELECT job_id, filename, sha256, size, url, upload_error FROM outputs"
        ):
            outputs[r["job_id"]].append(dict(r))
    finally:
        conn.close()
    return DbView(jobs, dict(events), dict(deliveries), dict(outputs))


@dataclass
class Inputs:
    """What the run collected besides the files: the client's view and the chaos timeline."""

    jobs: int
    accepted: dict[
        str, int
    ]  # job id -> HTTP status of the answer that accepted it (202, or 200: existing)
    rejected: dict[str, str]
    api_final: dict[str, str]  # job id -> status as GET /jobs/{id} told at the end ("?" if unknown)
    s3_url: str
    bucket: str
    timeline: list[dict[str, Any]]
    submit_stats: dict[str, int]
    duration_s: float
    s3_access: tuple[str, str] = ("chaos", "chaos-secret")  # moto takes any keys
    extra: dict[str, Any] = field(default_factory=dict)


def job_of_prompt(prompt: dict[str, Any]) -> str | None:
    """The job a logged prompt belongs to: the run names each job's SaveImage prefix after it."""
    for node in (prompt or {}).values():
        if isinstance(node, dict) and node.get("class_type") == "SaveImage":
            prefix = (node.get("inputs") or {}).get("filename_prefix")
            return str(prefix) if prefix else None
    return None


def _why_extra_prompts(
    job_id: str,
    prompts: list[dict[str, Any]],
    events: list[dict[str, Any]],
    timeline: list[dict[str, Any]],
) -> str:
    """A best-effort explanation of why a job has more prompts than attempts."""
    notes = []
    boots = [p["boot"] for p in prompts]
    same_boot = len(boots) - len(set(boots))
    if same_boot:
        notes.append(
            f"{same_boot} resubmission(s)"
            " to the same simulator incarnation (it still knew the prompt)"
        )
    for a, b in itertools.pairwise(prompts):
        between = [e["kind"] for e in timeline if a["at"] <= e["t_abs"] <= b["at"]]
        if between:
            notes.append(
                f"between prompts at {a['at']:.1f} and {b['at']:.1f}: {', '.join(between)}"
            )
    resumed = sum(1 for e in events if e["message"].startswith("Resumed in generate"))
    if resumed:
        notes.append(f"resumed {resumed}x in generate after a comfyq restart (no attempt counted)")
    notes.append(_story(events))
    return "; ".join(notes)


def check_s3(inp: Inputs, db: DbView, completed: list[str]) -> dict[str, Any]:
    """Every output of a completed job must be in the bucket as ``{job}/{file}``, byte for byte."""
    import hashlib

    import boto3  # type: ignore[import-untyped]
    from botocore.exceptions import ClientError

    url, bucket = inp.s3_url, inp.bucket
    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=inp.s3_access[0],
        aws_secret_access_key=inp.s3_access[1],
    )
    expected = {f"{j}/{o['filename']}": o for j in completed for o in db.outputs.get(j, [])}
    in_bucket: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        in_bucket.update(obj["Key"] for obj in page.get("Contents", []))
    missing, mismatch = [], []
    for key, row in sorted(expected.items()):
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError:
            missing.append(key)
            continue
        if hashlib.sha256(body).hexdigest() != row["sha256"]:
            mismatch.append(key)
    no_url = sorted(
        f"{j}/{o['filename']}"
        for j in completed
        for o in db.outputs.get(j, [])
        if o["upload_error"] or not str(o["url"]).startswith(f"{url}/{bucket}/{j}/")
    )
    return {
        "expected": len(expected),
        "present": len(expected) - len(missing),
        "missing": missing,
        "mismatch": mismatch,
        "no_s3_url": no_url,
        "in_bucket": len(in_bucket),
        "extra": sorted(in_bucket - set(expected)),
        "completed_without_outputs": sorted(j for j in completed if not db.outputs.get(j)),
    }


def _story(events: list[dict[str, Any]]) -> str:
    """A job's retries and resumptions, in short."""
    parts: Counter[str] = Counter()
    for e in events:
        m = re.match(r"Attempt \d+ failed \((\w+)\)", e["message"])
        if m:
            parts[f"retry after {m.group(1)} in {e['stage']}"] += 1
        elif e["message"].startswith("Resumed in"):
            parts[f"resumed in {e['stage']} after a comfyq restart"] += 1
    return ", ".join(f"{k} x{n}" for k, n in parts.items()) or "no retries"


def charged_lookups(events: list[dict[str, Any]], prompts: list[dict[str, Any]]) -> tuple[int, int]:
    """Generate runs that submitted nothing yet were charged an attempt for prompt_lost (the run
    only looked up the prompt id an earlier run left, and ComfyUI did not know it): how many, and
    how many of them came right after a run already charged (one prompt, two attempts)."""
    sent = [p["at"] for p in prompts]
    lookups = doubles = 0
    start: float | None = None
    prev_charged = False  # the run before this one ended with a counted retry
    for e in events:
        if e["to_state"] == "running" and e["stage"] == "generate":
            start = parse_iso(e["at"])
        elif start is not None:
            charged = e["message"].startswith("Attempt ") or e["message"].startswith(
                "Lease expired"
            )
            if "(prompt_lost)" in e["message"] and not any(
                start <= t <= parse_iso(e["at"]) for t in sent
            ):
                lookups += 1
                doubles += prev_charged
            prev_charged, start = charged, None
    return lookups, doubles


def account(db_path: Path, receiver_log: Path, prompt_log: Path, inp: Inputs) -> dict[str, Any]:
    """The whole report as a dict (the JSON written by --json is this)."""
    db = read_db(db_path)
    accepted = inp.accepted
    known = {j: db.jobs[j] for j in accepted if j in db.jobs}
    missing_in_db = sorted(j for j in accepted if j not in db.jobs)
    not_final = sorted(j for j, row in known.items() if row["state"] not in TERMINAL)
    api_bad = sorted(j for j in accepted if inp.api_final.get(j) not in TERMINAL)
    lost_ids = sorted(set(missing_in_db) | set(not_final) | set(api_bad))
    unacknowledged = sorted(j for j in db.jobs if j not in accepted)
    states = Counter(row["state"] for row in known.values())
    failed_reasons = Counter(
        reason(row["error"]) for row in known.values() if row["state"] == "failed"
    )
    cancelled_reasons = Counter(
        reason(row["error"]) for row in known.values() if row["state"] == "cancelled"
    )
    ended_twice = sorted(
        j for j in known if sum(e["to_state"] in TERMINAL for e in db.events.get(j, [])) > 1
    )
    timeouts = sum(1 for row in known.values() if (row["error"] or {}).get("type") == "timeout")

    # --- webhooks: one owed per job that ended; the receiver's file says what arrived with a 2xx.
    received = read_jsonl(receiver_log)
    ok = [r for r in received if isinstance(r.get("answered"), int) and 200 <= r["answered"] < 300]
    ok_by_id: Counter[str] = Counter(r["webhook_id"] for r in ok)
    ids_by_job: dict[str, set[str]] = defaultdict(set)
    for r in ok:
        ids_by_job[str(r.get("job_id"))].add(r["webhook_id"])
    owed = sorted(j for j, row in known.items() if row["state"] in TERMINAL)
    hook_lost = sorted(j for j in owed if not ids_by_job.get(j))
    db_ids = {d["id"]: d for ds in db.deliveries.values() for d in ds}
    unknown_ids = sorted(w for w in ok_by_id if w not in db_ids)
    wrong_event = sorted(
        r["webhook_id"]
        for r in ok
        if r.get("job_id") in known and r.get("event") != known[r["job_id"]]["state"]
    )
    delivery_states = Counter(d["state"] for d in db_ids.values())

    # --- prompts: the simulator's durable log vs the attempts comfyq counted.
    prompts_by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    foreign_prompts = 0
    for p in read_prompt_log(prompt_log):
        job = job_of_prompt(p.get("prompt") or {})
        if job in accepted:
            prompts_by_job[job].append(p)
        else:
            foreign_prompts += 1
    t0 = inp.extra.get("t0_abs", 0.0)
    timeline = [{**e, "t_abs": t0 + e["t"]} for e in inp.timeline]
    gt = []
    for j, row in sorted(known.items()):
        n = len(prompts_by_job.get(j, []))
        if n > row["attempts"]:
            gt.append(
                {
                    "job": j,
                    "prompts": n,
                    "attempts": row["attempts"],
                    "state": row["state"],
                    "why": _why_extra_prompts(j, prompts_by_job[j], db.events.get(j, []), timeline),
                }
            )
    lookups = {j: charged_lookups(db.events.get(j, []), prompts_by_job.get(j, [])) for j in known}
    lt = [
        {
            "job": j,
            "prompts": len(prompts_by_job.get(j, [])),
            "attempts": row["attempts"],
            "state": row["state"],
            "story": _story(db.events.get(j, []))
            + ("; charged twice for one failed submission" if lookups[j][1] else ""),
        }
        # One attempt and no prompt: a job that ended before it needed one (cancelled, or refused
        # by ComfyUI).
        for j, row in sorted(known.items())
        if len(prompts_by_job.get(j, [])) < row["attempts"] > 1
    ]
    plan = inp.extra.get("plan") or {}
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for j, row in known.items():
        p = plan.get(j) or {}
        group = (
            "rejected workflow"
            if p.get("bad")
            else "cancel requested"
            if p.get("cancel_after") is not None
            else "plain"
        )
        outcomes[group][row["state"]] += 1
    completed = [j for j, row in known.items() if row["state"] == "completed"]
    s3 = check_s3(inp, db, completed)
    final_prompt_unlogged = sorted(
        j
        for j in completed
        if known[j]["comfy_prompt_id"] not in {p["prompt_id"] for p in prompts_by_job.get(j, [])}
    )
    per_job = Counter(len(prompts_by_job.get(j, [])) for j in known)

    kills = [e for e in inp.timeline if e["kind"] == "comfyq kill -9"]
    crashes = [e for e in inp.timeline if e["kind"] == "simulator kill -9"]
    return {
        "jobs": inp.jobs,
        "accepted": len(accepted),
        "accepted_by_retry_200": sum(1 for s in accepted.values() if s == 200),
        "rejected": inp.rejected,
        "completed": states.get("completed", 0),
        "failed": states.get("failed", 0),
        "failed_reasons": dict(failed_reasons.most_common()),
        "cancelled": states.get("cancelled", 0),
        "cancelled_reasons": dict(cancelled_reasons.most_common()),
        "timeouts": timeouts,
        "lost": len(lost_ids),
        "lost_jobs": {
            "missing_in_db": missing_in_db,
            "not_final_in_db": not_final,
            "not_final_via_api": {j: inp.api_final.get(j, "?") for j in api_bad},
        },
        "unacknowledged_jobs_in_db": unacknowledged,
        "jobs_ended_twice": ended_twice,
        "outcomes_by_kind": {k: dict(v) for k, v in sorted(outcomes.items())},
        "webhooks_owed": len(owed),
        "webhooks_delivered": sum(1 for j in owed if ids_by_job.get(j)),
        "webhooks_delivered_ids": len(ok_by_id),
        "webhooks_duplicate": sum(c - 1 for c in ok_by_id.values()),
        "webhooks_duplicate_ids": sorted(w for w, c in ok_by_id.items() if c > 1),
        "webhooks_lost": len(hook_lost),
        "webhooks_lost_jobs": hook_lost,
        "webhooks_posts_received": len(received),
        "webhooks_answered_non_2xx": len(received) - len(ok),
        "webhooks_bad_signature": sum(1 for r in received if not r.get("sig_ok")),
        "webhooks_unknown_ids": unknown_ids,
        "webhooks_wrong_event": wrong_event,
        "webhooks_jobs_with_several_ids": sorted(
            j for j, ids in ids_by_job.items() if len(ids) > 1
        ),
        "webhook_delivery_states": dict(delivery_states),
        "s3": s3,
        "prompts_submitted": sum(len(v) for v in prompts_by_job.values()),
        "prompts_per_job": {str(k): v for k, v in sorted(per_job.items())},
        "prompts_foreign": foreign_prompts,
        "attempts_total": sum(row["attempts"] for row in known.values()),
        "jobs_prompts_gt_attempts": len(gt),
        "jobs_prompts_gt_attempts_list": gt,
        "jobs_prompts_lt_attempts": lt,
        "attempts_charged_for_lookup_only": sum(n for n, _ in lookups.values()),
        "attempts_charged_twice": sum(d for _, d in lookups.values()),
        "jobs_charged_twice": sorted(j for j, (_, d) in lookups.items() if d),
        "jobs_on_last_attempt": sum(
            1 for row in known.values() if row["attempts"] >= row["max_attempts"]
        ),
        "completed_without_logged_prompt": final_prompt_unlogged,
        "comfyq_kills": len(kills),
        "comfyq_kills_with_work_in_flight": sum(1 for e in kills if e.get("busy")),
        "comfyq_kills_during_start": sum(1 for e in kills if e.get("during_start")),
        "simulator_crashes_with_work_in_flight": sum(1 for e in crashes if e.get("busy")),
        "simulator_crashes": len(crashes),
        "simulator_freezes": sum(1 for e in inp.timeline if e["kind"] == "simulator SIGSTOP"),
        "submit": inp.submit_stats,
        "duration_s": round(inp.duration_s, 1),
        **inp.extra,
    }


def lost_anything(r: dict[str, Any]) -> bool:
    """True when a job, a webhook or an uploaded object went missing."""
    s3 = r["s3"]
    return bool(
        r["lost"]
        or r["webhooks_lost"]
        or s3["missing"]
        or s3["mismatch"]
        or s3["completed_without_outputs"]
    )


def render(r: dict[str, Any]) -> str:
    """The human-readable report."""
    s3 = r["s3"]
    out = [
        (
            f"chaos run: {r['jobs']} jobs, seed {r.get('seed')},"
            f" {r['comfyq_kills']} comfyq kill -9,"
            f" {r['simulator_crashes']} simulator kill -9 + restart,"
            f" wall time {r['duration_s']:.0f} s"
        ),
        (
            f"  (3 simulated nodes of {r.get('node_duration')} s a job;"
            " the webhook receiver answers 503 to"
            f" {100 * r.get('webhook_error_rate', 0):.0f}% of posts and takes up to"
            f" {r.get('webhook_delay')} s)"
        ),
        "",
        "jobs",
        (
            f"  accepted   {r['accepted']:5d}"
            f"   ({r['accepted_by_retry_200']} of them answered 200 on a retry:"
            f" the first POST was committed but its answer was lost to a kill)"
        ),
        f"  completed  {r['completed']:5d}",
        f"  failed     {r['failed']:5d}",
    ]
    out += [f"      {n:4d} x {why}" for why, n in r["failed_reasons"].items()]
    out.append(f"  cancelled  {r['cancelled']:5d}   timeouts {r['timeouts']}")
    out += [f"      {n:4d} x {why}" for why, n in r["cancelled_reasons"].items()]
    out.append(f"  LOST       {r['lost']:5d}" + (f"   {r['lost_jobs']}" if r["lost"] else ""))
    if set(r["outcomes_by_kind"]) - {"plain"}:
        out.append(f"  by kind of job: {r['outcomes_by_kind']}")
    if r["rejected"]:
        out.append(f"  rejected by the API (4xx): {r['rejected']}")
    if r["jobs_ended_twice"]:
        out.append(f"  ended twice: {r['jobs_ended_twice']}")
    if r["unacknowledged_jobs_in_db"]:
        out.append(
            "  in the database but never acknowledged to the client:"
            f" {r['unacknowledged_jobs_in_db']}"
        )
    sub = r["submit"]
    out.append(
        f"  submission: {sub.get('posts', 0)} POSTs,"
        f" {sub.get('connection_errors', 0)} connection errors,"
        f" {sub.get('http_5xx', 0)} 5xx ({sub.get('queue_full', 0)} queue full)"
    )
    out += [
        "",
        "webhooks (at least once; receivers deduplicate on webhook-id)",
        f"  owed       {r['webhooks_owed']:5d}   (one per finished job)",
        (
            f"  delivered  {r['webhooks_delivered']:5d}   (jobs with a 2xx-answered delivery;"
            f" {r['webhooks_delivered_ids']} distinct webhook-ids)"
        ),
        (
            f"  duplicates {r['webhooks_duplicate']:5d}"
            "   (same webhook-id answered 2xx again: allowed by the"
            " at-least-once design,"
            " e.g. comfyq killed after the receiver answered but before it recorded it)"
        ),
        f"  LOST       {r['webhooks_lost']:5d}"
        + (f"   {r['webhooks_lost_jobs']}" if r["webhooks_lost"] else ""),
        (
            f"  posts received {r['webhooks_posts_received']},"
            f" answered non-2xx {r['webhooks_answered_non_2xx']},"
            f" bad signatures {r['webhooks_bad_signature']},"
            f" delivery rows {r['webhook_delivery_states']}"
        ),
    ]
    for key, label in (
        ("webhooks_unknown_ids", "webhook-ids the database does not know"),
        ("webhooks_wrong_event", "deliveries whose status differs from the job's"),
        ("webhooks_jobs_with_several_ids", "jobs reported under several webhook-ids"),
    ):
        if r[key]:
            out.append(f"  {label}: {r[key]}")
    out += [
        "",
        "S3",
        (
            f"  objects expected {s3.get('expected', 0)} (outputs of completed jobs),"
            f" present {s3.get('present', 0)},"
            f" missing {len(s3.get('missing', []))},"
            f" content mismatches {len(s3.get('mismatch', []))},"
            f" completed jobs without an S3 URL {len(s3.get('no_s3_url', []))},"
            f" completed jobs without outputs {len(s3.get('completed_without_outputs', []))}"
        ),
        f"  objects in the bucket {s3.get('in_bucket', 0)} (extra: {s3.get('extra', [])[:5]})",
        "",
        "prompts (the simulator's durable log) vs attempts (jobs.attempts)",
        (
            f"  prompts submitted {r['prompts_submitted']}, attempts {r['attempts_total']},"
            f" prompts per job {r['prompts_per_job']}"
        ),
        f"  jobs with prompts > attempts: {r['jobs_prompts_gt_attempts']}",
    ]
    out += [
        f"      {g['job']}: {g['prompts']} prompts,"
        f" {g['attempts']} attempts ({g['state']}): {g['why']}"
        for g in r["jobs_prompts_gt_attempts_list"]
    ]
    out.append(
        f"  jobs with prompts < attempts: {len(r['jobs_prompts_lt_attempts'])}"
        " (an attempt that never reached ComfyUI:"
        " e.g. comfyq killed between recording the prompt id and"
        " sending it, or ComfyUI down when it was sent)"
    )
    out += [
        f"      {g['job']}: {g['prompts']} prompts,"
        f" {g['attempts']} attempts ({g['state']}): {g['story']}"
        for g in r["jobs_prompts_lt_attempts"]
    ]
    out.append(
        "  attempts charged for a lookup only (a run that submitted nothing;"
        " ComfyUI did not know the"
        f" prompt id an earlier run left): {r['attempts_charged_for_lookup_only']},"
        " of which right after"
        f" an attempt already charged for the same failure: {r['attempts_charged_twice']}"
        + (" [bench/chaos_repro_attempts.py]" if r["attempts_charged_twice"] else "")
    )
    out.append(f"  jobs that used all their attempts: {r['jobs_on_last_attempt']}")
    if r["completed_without_logged_prompt"]:
        out.append(
            "  completed jobs whose final prompt is not in the log:"
            f" {r['completed_without_logged_prompt']}"
        )
    out += [
        "",
        (
            "chaos:"
            f" comfyq kill -9 {r['comfyq_kills']}"
            f" ({r['comfyq_kills_with_work_in_flight']} with jobs or"
            " webhooks in flight,"
            f" {r['comfyq_kills_during_start']} while it was starting, before /health;"
            f" restart to /health: median {r.get('restart_median_s', 0):.1f} s),"
            f" simulator kill -9 {r['simulator_crashes']}"
            f" ({r['simulator_crashes_with_work_in_flight']} with work"
            f" in flight), simulator SIGSTOP {r['simulator_freezes']}"
        ),
        (
            f"  comfyq starts that died before /health:"
            f" {r.get('comfyq_failed_starts', 0)};"
            f" final graceful stop exit code {r.get('comfyq_exit_code')}"
        ),
        f"wall time {r['duration_s']:.1f} s",
        "",
        "RESULT: " + ("LOST SOMETHING" if lost_anything(r) else "nothing lost"),
    ]
    return "\n".join(out)
