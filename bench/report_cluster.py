"""BENCHMARKS.md sections of several instances: the Postgres store alone, end to end with 1..3
instances beside SQLite, the cross-instance event delay, and the multi-instance chaos run."""

from __future__ import annotations

from typing import Any

from bench.report_fmt import ms, num, table

Charts = dict[str, str]


def pgstore(f: dict[str, Any], charts: Charts) -> list[str]:
    """Store alone on Postgres: jobs/s per instance count, statements per job, claim latency."""
    out = [
        "Complete jobs per second (claim → every transition → completed), each instance a process:",
        "",
    ]
    rows = []
    for t in f["throughput"]:
        rt = t.get("statements_per_job_lifecycle")
        adm = t.get("statements_per_admission")
        rows.append(
            [
                f"{t['instances']} × {t['workers_per_instance']} workers",
                num(t["jobs_per_s"]),
                num(t["jobs_per_s"] / t["instances"]),
                num(t["admit_jobs_per_s"]),
                num((rt or 0) + (adm or 0), 1) if rt else "–",
            ]
        )
    out += table(
        ["instances", "jobs/s", "per instance", "admissions/s", "statements per job"], rows
    )
    out += ["", "Claim latency (one job per claim):", ""]
    out += table(
        ["finished jobs in the table", "p50", "p99"],
        [
            [f"{c['rows']:,}", ms(c["claim_ms"]["p50"]), ms(c["claim_ms"]["p99"])]
            for c in f["claim"]
        ],
    )
    return out


def cluster(f: dict[str, Any], charts: Charts) -> list[str]:
    """End to end over HTTP with real processes; the cross-instance event delay."""
    out = ["Zero-time simulators, one per instance; jobs posted round robin over HTTP:", ""]
    out += table(
        ["engine", "instances", "jobs/s", "comfyq CPU ms per job"],
        [
            [e["engine"], str(e["instances"]), num(e["jobs_per_s"]), num(e["cpu_ms_per_job"], 2)]
            for e in f["e2e"]
        ],
    )
    ev = f.get("events")
    if ev:
        d = ev["delay_ms"]
        out += [
            "",
            (
                "Cross-instance event delay (committed on one instance → SSE event read on"
                f" another): p50 {ms(d['p50'])}, p99 {ms(d['p99'])} over {num(d['n'])} state"
                " events,"
                " measured from the transition's own timestamp (taken before its transaction)"
                " to the client's read; the SSE writer also reads queue positions first."
            ),
        ]
        once = ev.get("delay_ms_at_once")
        if once:
            out += [
                "",
                (
                    "That is with the default `COMFYQ_SSE_COALESCE_MS=20` (events other than the"
                    " final one wait up to 20 ms to leave together). With 0, every event at once:"
                    f" p50 {ms(once['p50'])}, p99 {ms(once['p99'])}."
                ),
            ]
        link = ev.get("link_delay_ms")
        if link:
            out += [
                "",
                (
                    "The link alone (the writer's commit returned → the other instance's listeners"
                    f" called): p50 {ms(link['p50'])}, p99 {ms(link['p99'])}."
                ),
            ]
    return out


def chaos(f: dict[str, Any], charts: Charts) -> list[str]:
    """The multi-instance chaos run's account."""
    bad = {k: v for k, v in f["problem_counts"].items() if v}
    out = [
        f"{num(f['accepted'])} jobs accepted through 3 instances, {len(f['kills'])} kill -9 rounds"
        + (", the database stopped and started mid-run" if f.get("database_restarted") else "")
        + f", {num(f['seconds'])} s.",
        "",
    ]
    out += table(
        ["measure", "value"],
        [
            ["final states", ", ".join(f"{k} {v}" for k, v in sorted(f["states"].items()))],
            [
                "webhook posts (beyond one per job: 503 retries, posts cut by kills)",
                f"{f['webhook_posts']} ({f['webhook_posts_beyond_one_per_job']})",
            ],
            [
                "finals seen on a survivor for jobs admitted through an instance killed later",
                str(f["finals_of_jobs_admitted_by_a_killed_instance"]),
            ],
            ["admission retries (same request_id)", str(f["admission_retries"])],
            ["stream resumes on another instance", str(f["stream_resumes"])],
            ["problems", ", ".join(f"{k} {v}" for k, v in bad.items()) or "none"],
        ],
        numeric=False,
    )
    return out
