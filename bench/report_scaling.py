"""The Markdown section of ``bench_scaling``: how comfyq's cost per job grows with the work."""

from __future__ import annotations

from typing import Any

from bench.report_fmt import ms, num, table, verdict


def _img(charts: dict[str, str], name: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({charts[name]})"] if name in charts else []


def _database(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        (
            "**Jobs in the database.** One job at a time, direct / `POST /generate` + SSE /"
            " `POST /generate/sync` in turn, against a database seeded with copies of a job the"
            " server really ran (jobs row, events, outputs; written straight into the migrated"
            " SQLite file in one transaction). Queued jobs wait for a `run_after` far in the"
            " future: counted and ahead of every new job, never claimed."
        ),
        "",
    ]
    body = []
    for r in rows:
        seed = r.get("seed") or {}
        body.append(
            [
                f"{num(r['count'])} {r['kind']}",
                f"{num(seed.get('db_mb'))} MB, seeded in {num(seed.get('seconds'), 1)} s",
                ms(r["direct"]["p50"]),
                f"{ms(r['comfyq_sync']['added']['p50'])} / {ms(r['comfyq_sync']['added']['p99'])}",
                f"{ms(r['comfyq_sse']['added']['p50'])} / {ms(r['comfyq_sse']['added']['p99'])}",
                ms(r["cpu_ms_per_job"]),
                ms(r.get("queue_info_ms")),
            ]
        )
    out += table(
        [
            "jobs in the database",
            "database",
            "direct p50",
            "added sync p50 / p99",
            "added SSE p50 / p99",
            "server CPU per job",
            "GET /queue-info",
        ],
        body,
        numeric=False,
    )
    return out


def _in_flight(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "",
        (
            "**Jobs in flight.** Bursts through `POST /generate/sync` and straight to ComfyUI,"
            " rounds alternating (forward, then reversed)."
        ),
        "",
    ]
    body = [
        [
            num(r["in_flight"]),
            num(r["jobs"]),
            f"{num(r['rate']['direct'], 1)}/s",
            f"{num(r['rate']['comfyq_sync'], 1)}/s",
            f"×{num(r['ratio'], 2)}",
            f"{ms(r['latency_ms']['direct']['p50'])} / {ms(r['latency_ms']['comfyq_sync']['p50'])}",
            ms(r["cpu_ms_per_job"]),
        ]
        for r in rows
    ]
    out += table(
        [
            "in flight",
            "jobs per path",
            "direct",
            "comfyq sync",
            "ratio",
            "p50 direct / comfyq",
            "server CPU per job",
        ],
        body,
        numeric=False,
    )
    return out


def _subscribers(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "",
        (
            "**SSE subscribers.** `POST /generate` of a 0.4 s job, then N `GET /jobs/{id}/events`"
            " streams opened at once and read to `final_result` (most attach while the job runs)."
            " CPU per subscriber is the growth over the first row."
        ),
        "",
    ]
    body = [
        [
            num(r["subscribers"]),
            f"{num(r['finals'])}/{num(r['subscribers'] * r['jobs'])}",
            ms(r["cpu_ms_per_job"]),
            ms(r.get("cpu_ms_per_subscriber")),
            f"{ms(r['final_delay_ms']['p50'])} / {ms(r['final_delay_ms']['p99'])}",
            ms(r["wall_ms"]["p50"]),
        ]
        for r in rows
    ]
    out += table(
        [
            "subscribers",
            "final_result received",
            "server CPU per job",
            "CPU per subscriber",
            "final_result delay p50 / p99",
            "job wall p50",
        ],
        body,
        numeric=False,
    )
    return out


def _issue_rows(f: dict[str, Any]) -> list[str]:
    out = ["", "**Issue 13's table rows measured here.**", ""]
    body = []
    st = f.get("streams")
    if st:
        n = st["streams"]
        rounds = st.get("rounds", 1)
        admitted = st["statuses"].get("200", 0)
        total = n * rounds
        body.append(
            [
                (
                    f"{n} streams opened at once (`/generate/stream`), default settings"
                    f" (MAX_QUEUE_SIZE {num(st.get('max_queue_size'))})"
                ),
                f"{n}/{n} admitted, wall ≤ 1.05× direct",
                (
                    f"{num(admitted)}/{num(total)} admitted, {num(st['completed'])} completed"
                    f" ({rounds} rounds of {n}), wall ×{num(st['ratio'], 2)} direct"
                ),
                verdict(admitted == total and st["completed"] == total and st["ratio"] <= 1.05),
            ]
        )
    sj = f.get("slow_job")
    if sj:
        body.append(
            [
                (
                    "a 0.4 s job (EmptyImage 1024² → ImageBlur), sync, vs direct (simulator:"
                    " ImageBlur takes 0.4 s)"
                ),
                "≤ ×1.01",
                (
                    f"p50 {ms(sj['comfyq_sync']['p50'])} vs {ms(sj['direct']['p50'])}:"
                    f" ×{num(sj['ratio_p50'], 3)} ({sj['jobs']} jobs per path)"
                ),
                verdict(sj["ratio_p50"] <= 1.01),
            ]
        )
    out += table(["figure", "target", "measured", "verdict"], body, numeric=False)
    return out


def scaling(f: dict[str, Any], charts: dict[str, str]) -> list[str]:
    """Database size, jobs in flight, SSE subscribers, and two of issue 13's table rows."""
    out = [
        "comfyq (default settings but the queue limit lifted) in front of the simulator"
        " (zero-time nodes but ImageBlur, which takes 0.4 s); a client straight to the same"
        " simulator for comparison. Server CPU is comfyq's process only, from /proc."
        + (" *`--quick` sizes.*" if f.get("size") == "quick" else ""),
        "",
    ]
    if f.get("database"):
        out += _database(f["database"])
    if f.get("in_flight"):
        out += _in_flight(f["in_flight"])
    if f.get("subscribers"):
        out += _subscribers(f["subscribers"])
    out += _issue_rows(f)
    out += _img(charts, "scaling", "how the cost per job grows")
    return out
