"""Issue 13's target table, line by line: each figure measured in this run next to the issue's
"now" and target, with what the same run's profile, floor and thread split say about the rest.
Every number comes from the results; nothing here is judged by hand."""

from __future__ import annotations

from typing import Any

from bench.report_fmt import ms, num, ok_figures, table, verdict


def _rate(side: dict[str, Any] | None, level: int, path: str) -> float | None:
    for row in (side or {}).get("throughput") or []:
        if row.get("in_flight") == level:
            return (row.get("rate") or {}).get(path)
    return None


def _ratio(side: dict[str, Any] | None, level: int, path: str) -> float | None:
    got, direct = _rate(side, level, path), _rate(side, level, "direct")
    return got / direct if got and direct else None


def _added(side: dict[str, Any] | None, path: str) -> float | None:
    lat = ((side or {}).get("latency") or {}).get(path) or {}
    return (lat.get("added") or {}).get("p50")


def _x(v: float | None) -> str:
    return "–" if v is None else f"×{v:.2f}"


def issue13(steps: dict[str, Any]) -> list[str]:
    side = ok_figures(steps.get("sidebyside")) or {}
    sim, real = side.get("simulator"), side.get("real")
    floor = ok_figures(steps.get("floor")) or {}
    prof = ok_figures(steps.get("profile")) or {}
    store = ok_figures(steps.get("store")) or {}
    api = ok_figures(steps.get("api")) or {}
    scaling = ok_figures(steps.get("scaling")) or {}
    simcost = ok_figures(steps.get("sim")) or {}
    if not (sim and floor):
        return ["*Needs the sidebyside and floor steps of the same run.*"]

    cpu = sim.get("comfyq_cpu_ms_per_job")
    loop, writer, other = (
        floor.get("comfyq_loop_thread_ms_per_job"),
        floor.get("comfyq_writer_thread_ms_per_job"),
        floor.get("comfyq_other_thread_ms_per_job"),
    )
    layers = sorted(
        (prof.get("loop_ms_per_job_by_layer") or {}).items(), key=lambda kv: -float(kv[1])
    )[:4]
    top = ", ".join(f"{name} {ms(v)}" for name, v in layers) or "–"
    floor_ms = floor.get("floor_cpu_ms_per_job")
    why_cpu = (
        f"the same exchanges in bare aiohttp cost {ms(floor_ms)} per job (floor step); comfyq's"
        f" {ms(floor.get('comfyq_cpu_ms_per_job'))} there splits into event loop {ms(loop)},"
        f" SQLite writer {ms(writer)} (its statements, commits and fsyncs: the durable queue),"
        f" other threads {ms(other)} (file hops); the loop's largest layers, profiled: {top}."
        f" 3 ms would need the loop and writer together under {ms(3 - (other or 0))}."
    )
    rows: list[list[str]] = []
    rows.append(
        [
            "comfyq server CPU per trivial job over HTTP",
            "8.9–10.6 ms",
            "≤ 3 ms",
            f"{ms(cpu)} (simulator), {ms((real or {}).get('comfyq_cpu_ms_per_job'))} (real)",
            verdict(cpu is not None and cpu <= 3),
            why_cpu,
        ]
    )
    for path, now, target, limit in (
        ("comfyq_sync", "+6.6 ms", "≤ +3 ms", 3.0),
        ("comfyq_sse", "+8.7 ms", "≤ +4 ms", 4.0),
    ):
        got = _added(real, path)
        label = "`/generate/sync`" if path == "comfyq_sync" else "`/generate` + SSE"
        rows.append(
            [
                f"added p50, {label}, trivial job, real ComfyUI",
                now,
                target,
                f"+{ms(got)} (simulator: +{ms(_added(sim, path))})",
                verdict(None if got is None else got <= limit),
                (
                    f"one job at a time the added time is comfyq's own work on the job's path:"
                    f" {ms(cpu)} of CPU per job (row 1) plus the commits' fsync waits"
                    f" ({num(prof.get('fsyncs_per_job'), 1)} fsyncs per job, profile)."
                ),
            ]
        )
    for label, data, now, target, limit in (
        ("real ComfyUI", real, "×0.65 (×0.42 at 32 clients; 117 vs 294 jobs/s)", "≥ ×0.9", 0.9),
        ("simulator", sim, "×0.31 (144 vs 458 jobs/s)", "≥ ×0.8", 0.8),
    ):
        sse, sync = _ratio(data, 16, "comfyq_sse"), _ratio(data, 16, "comfyq_sync")
        rate = _rate(data, 16, "comfyq_sync")
        per_job = (data or {}).get("comfyq_cpu_ms_per_job")
        busy = (rate or 0) * (per_job or 0) / 1000
        direct = _rate(data, 16, "direct")
        need = 1000 / (limit * direct) if direct else None
        extra = ""
        if data is sim and simcost.get("sim_cpu_ms_per_job"):
            sim_busy = (rate or 0) * simcost["sim_cpu_ms_per_job"] / 1000
            extra = f", the simulator {sim_busy:.2f} more"
        rows.append(
            [
                f"throughput at 16 in flight vs direct, {label}",
                now,
                target,
                (
                    f"SSE {_x(sse)} ({num(_rate(data, 16, 'comfyq_sse'))}/s), sync {_x(sync)}"
                    f" ({num(rate)}/s), direct {num(direct)}/s"
                ),
                verdict(None if sync is None else min(sse or 0, sync) >= limit),
                (
                    f"direct runs {num(direct)} jobs/s; at comfyq's {num(rate)} jobs/s (sync)"
                    f" comfyq's process takes {busy:.2f} of a core ({ms(per_job)} per job"
                    f"{extra}) on 2 cores shared by client, comfyq and ComfyUI; at"
                    f" {target[2:]} of direct comfyq's CPU would have to fit in about"
                    f" {ms(need)} per job if it were the only limit."
                ),
            ]
        )
    slow = scaling.get("slow_job") or {}
    streams = scaling.get("streams") or {}
    rows.append(
        [
            "a 0.4 s job (EmptyImage 1024² → ImageBlur), sync, vs direct",
            "×1.04 (0.99–1.08)",
            "≤ ×1.01",
            _x(slow.get("ratio_p50")),
            verdict(None if slow.get("ratio_p50") is None else slow["ratio_p50"] <= 1.01),
            (
                "the trivial job's added time (rows 2–3) over a 0.4 s job; ×1.01 leaves about"
                " 4 ms, the budget of row 2."
            ),
        ]
    )
    tp16 = ((store.get("throughput") or {}).get("claim_transitions") or {}).get("16")
    wpc = ((store.get("writes_per_commit") or {}).get("claim_transitions") or {}).get("16")
    scpu = ((store.get("cpu_ms_per_job") or {}).get("claim_transitions") or {}).get("16") or {}
    rows.append(
        [
            "store alone, 16 workers, FULL sync",
            "1,951–2,181 jobs/s",
            "≥ 3,000, stable over 3 runs",
            f"{num(tp16)} jobs/s (one quick run)",
            verdict(None if tp16 is None else tp16 >= 3000),
            (
                f"group commit puts {num(wpc, 1)} writes in each fsync; the writer thread spends"
                f" {ms(scpu.get('writer_thread'))} of CPU per job"
                f" ({ms(scpu.get('process'))} the whole process): one writer thread at that"
                f" cost caps the store at about"
                f" {num(1000 / scpu['writer_thread'] if scpu.get('writer_thread') else None)}"
                " jobs/s; 3,000 needs 0.33 ms or less per job on it."
            ),
        ]
    )
    adm = api.get("admissions") or {}
    rate = adm.get("rate")
    busy_adm = adm.get("server_cpu")
    rows.append(
        [
            "admissions/s (`POST /generate`, durable)",
            "3,528",
            "≥ 5,000",
            f"{num(rate)}/s",
            verdict(None if rate is None else rate >= 5000),
            (
                f"the server process used {num(busy_adm, 2)} of a core: its event loop is"
                " saturated, at"
                f" {ms(1000 * (busy_adm or 0) / rate if rate else None)} of CPU per admission;"
                " 5,000/s needs 0.2 ms or less."
            ),
        ]
    )
    wall = streams.get("ratio")
    rows.append(
        [
            "200 streams opened at once (`/generate/stream`), default settings",
            "100 admitted, 100 got 503",
            "200/200, wall ≤ 1.05× direct",
            f"{num(streams.get('completed'))}/{num(streams.get('streams'))}, wall {_x(wall)}",
            verdict(None if wall is None else wall <= 1.05 and streams.get("completed") == 200),
            (
                "every stream is admitted (MAX_QUEUE_SIZE 10,000); the wall is 200 trivial jobs"
                " at comfyq's throughput against the simulator's (the simulator row above)."
            ),
        ]
    )
    out = [
        (
            "Each figure of the issue's table from this run, next to the issue's “now” (measured"
            " on the issue's machine) and what this run's floor, thread split and profile say"
            " about what is left."
        ),
        "",
    ]
    out += table(
        ["figure", "issue's now", "target", "this run", "verdict", "what it is made of"],
        rows,
        numeric=False,
    )
    return out
