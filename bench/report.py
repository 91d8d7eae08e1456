"""BENCHMARKS.md from a results document (``python -m bench`` writes one, ``--render-only`` reads).

Rendering never measures anything, so the report can be re-rendered from stored figures."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import report_cluster, report_issue13, report_scaling, report_v2
from bench import report_sections as sec
from bench.report_fmt import (
    PATH_LABELS,
    ms,
    not_run,
    num,
    ok_figures,
    sized_verdict,
    table,
    verdict,
)

Row = list[str]
FLAT_MIN_MB = 256  # below this a body fits in the buffers anyway: "flat" cannot be told apart


def _flat(growth: float, size: float) -> str:
    # "Flat" has no figure in the issues; we call it flat when the peak growth stays under a fifth
    # of the bytes moved (streaming keeps a few parts in memory, a whole-file read keeps them all).
    if size < FLAT_MIN_MB:
        return f"n/a: {size:,.0f} MB is too small to tell (the target names a bigger file)"
    return verdict(growth < size / 5)


TARGET_STEPS = {
    "store": "#2 store",
    "e2e": "#3 end to end",
    "api": "#4 API",
    "preprocess": "#5 inputs",
    "outputs": "#6 outputs",
    "chaos": "#7 chaos",
}


def targets(steps: dict[str, Any]) -> list[Row]:
    """[issue, target (the issue's words), measured, verdict] for every target the run can judge."""
    rows: list[Row] = []
    for name, issue in TARGET_STEPS.items():
        step = steps.get(name) or {"status": "skipped", "reason": "not in this run"}
        if ok_figures(step) is None:
            why = "skipped" if step["status"] == "skipped" else "step failed"
            rows.append(
                [
                    issue,
                    "every target of this step",
                    "–",
                    f"not measured ({why}: {step.get('reason')})",
                ]
            )
    if f := ok_figures(steps.get("store")):
        r16 = f["throughput"]["claim_transitions"].get("16")
        rows.append(
            [
                "#2 store",
                "≥ 2,000 complete jobs/s with 16 workers",
                f"{num(r16)} jobs/s",
                verdict(r16 >= 2000 if r16 is not None else None),
            ]
        )
        big = int(f["args"]["big"])
        c = f["claim_latency"]
        rows.append(
            [
                "#2 store",
                "claim p99 the same within 2× at 10k and 1M rows",
                (
                    f"{ms(c['10000']['p99'])} vs {ms(c[str(big)]['p99'])} at {big:,} rows:"
                    f" ×{f['claim_p99_ratio']:.2f}"
                ),
                sized_verdict(f["claim_p99_ratio"] <= 2, big, 1_000_000, "rows"),
            ]
        )
    if f := ok_figures(steps.get("e2e")):
        for n, rate in f["throughput"].items():
            rows.append(
                [
                    "#3 end to end",
                    f"≥ 1,000 jobs/s end to end ({n} backend{'s' if n != '1' else ''})",
                    f"{num(rate)} jobs/s",
                    verdict(rate >= 1000),
                ]
            )
        if lat := f.get("latency"):
            a = lat["added"]["p50"]
            rows.append(
                [
                    "#3 end to end",
                    "added latency p50 ≤ 3 ms (in-process client)",
                    ms(a),
                    verdict(a <= 3),
                ]
            )
    if (f := ok_figures(steps.get("sidebyside"))) and "latency" in f.get("simulator", {}):
        for path in ("comfyq_sse", "comfyq_sync"):
            if path in f["simulator"]["latency"]:
                a = f["simulator"]["latency"][path]["added"]["p50"]
                rows.append(
                    [
                        "#3 target, over HTTP",
                        f"added latency p50 ≤ 3 ms ({PATH_LABELS[path]})",
                        ms(a),
                        verdict(a <= 3),
                    ]
                )
    if f := ok_figures(steps.get("api")):
        s, n = f["subscribers"], f["args"]["subscribers"]
        rows += [
            [
                "#4 API",
                "≥ 3,000 admissions/s",
                f"{num(f['admissions']['rate'])}/s",
                verdict(f["admissions"]["rate"] >= 3000),
            ],
            [
                "#4 API",
                "idle RSS under 60 MB",
                f"{num(f['idle_rss_mb'], 1)} MB",
                verdict(f["idle_rss_mb"] < 60),
            ],
            [
                "#4 API",
                "1,000 subscribers under 150 MB RSS",
                f"peak {num(s['rss_peak_mb'], 1)} MB with {n:,}",
                sized_verdict(s["rss_peak_mb"] < 150, n, 1000, "subscribers"),
            ],
            [
                "#4 API",
                "1,000 subscribers: p99 delay under 50 ms",
                f"{ms(s['delay_ms']['p99'])} with {n:,}",
                sized_verdict(s["delay_ms"]["p99"] < 50, n, 1000, "subscribers"),
            ],
        ]
    if (f := ok_figures(steps.get("preprocess"))) and (d := f.get("download")):
        rows.append(
            [
                "#5 inputs",
                "memory while downloading a 1 GB file must stay flat",
                f"+{num(d['rss_growth_mib'], 1)} MiB for {num(d['mib'])} MiB",
                _flat(d["rss_growth_mib"], d["mib"]),
            ]
        )
    if f := ok_figures(steps.get("outputs")):
        ups = (f.get("upload") or {}).get("streaming") or []
        if ups:
            u = ups[-1]
            rows.append(
                [
                    "#6 outputs",
                    "upload memory for a 500 MB output must stay flat",
                    f"+{num(u['rss_growth_mib'])} MiB for {num(u['mb'])} MB",
                    _flat(u["rss_growth_mib"], u["mb"]),
                ]
            )
        hang = f.get("hanging") or []
        if hang:
            base = hang[0]["job_ms"]["p50"]
            for h in hang[1:]:
                p = h["job_ms"]["p50"]
                # "None" judged as: job p50 within 20 % (+1 ms of timer noise) of the run without
                # hangs.
                rows.append(
                    [
                        "#6 outputs",
                        f"effect of a hanging receiver on other jobs: none ({h['label']})",
                        f"job p50 {ms(p)} vs {ms(base)}",
                        verdict(p <= base * 1.2 + 1),
                    ]
                )
    if f := ok_figures(steps.get("chaos")):
        rows.append(
            ["#7 chaos", "jobs lost: must be 0", num(f.get("lost")), verdict(f.get("lost") == 0)]
        )
        rows.append(
            [
                "#7 chaos",
                "webhooks owed vs delivered: no loss",
                (
                    f"{num(f.get('webhooks_delivered'))} of {num(f.get('webhooks_owed'))},"
                    f" {num(f.get('webhooks_lost'))} lost"
                ),
                verdict(f.get("webhooks_lost") == 0),
            ]
        )
    rows.sort(key=lambda r: r[0][:2])  # issue order; stable within an issue
    return rows


def machine(m: dict[str, Any]) -> list[str]:
    """The machine section."""
    disk = m.get("data_disk") or {}
    where = (
        f"{m.get('data_dir')}: {disk.get('fstype', '?')} on {disk.get('device', '?')}"
        f" (mounted at {disk.get('mount', '?')}"
    )
    where += f", sysfs rotational={disk['rotational']}" if "rotational" in disk else ""
    where += f", {disk.get('free_gib', '?')} GiB free)"
    load = m.get("load_avg_at_start") or []
    return table(
        ["", ""],
        numeric=False,
        rows=[
            ["CPU", f"{m.get('cpu')}, {m.get('cores')} cores"],
            ["RAM", f"{num(m.get('ram_gib'), 1)} GiB"],
            ["OS / kernel", f"{m.get('os')} / {m.get('kernel')}"],
            ["Python", m.get("python", "?")],
            ["SQLite (Python's sqlite3)", m.get("sqlite", "?")],
            [
                "aiohttp / aiosqlite / msgspec",
                f"{m.get('aiohttp')} / {m.get('aiosqlite')} / {m.get('msgspec')}",
            ],
            ["comfyq (git)", f"{m.get('comfyq')} ({m.get('git_commit')})"],
            ["data dir (databases, outputs)", where],
            ["load average at start (1/5/15 min)", " / ".join(f"{x:.2f}" for x in load)],
        ],
    )


SECTIONS = [
    ("sidebyside", "Side by side: direct ComfyUI client vs comfyq over HTTP", sec.sidebyside),
    ("store", "Store alone (#2)", sec.store),
    ("e2e", "End to end with the in-process client (#3)", sec.e2e),
    ("api", "HTTP API (#4)", sec.api),
    ("preprocess", "Preprocess and inputs (#5)", sec.preprocess),
    ("outputs", "Outputs, S3 and webhooks (#6)", sec.outputs),
    ("ui", "Dashboard (#14)", sec.ui),
    ("hostile", "Hostile bodies (#19)", sec.hostile),
    ("profile", "Where a job's CPU goes (#13, `--profile`)", sec.profile),
    ("queue_depth", "A deep queue and the MAX_QUEUE_SIZE default (#13)", sec.queue_depth),
    ("scaling", "How the cost per job grows (#13)", report_scaling.scaling),
    ("sim", "The simulator's own cost (#13)", sec.sim),
    ("floor", "comfyq next to its floor: the same exchanges in bare aiohttp (#13)", sec.floor),
    ("pgstore", "PostgreSQL store alone (#12)", report_cluster.pgstore),
    ("cluster", "Several instances end to end (#12)", report_cluster.cluster),
    ("chaos_cluster", "Multi-instance chaos run (#12)", report_cluster.chaos),
    ("v2", "Comfy API v2: direct vs the official proxy vs comfyq (#18)", report_v2.v2),
]


def build(
    results: dict[str, Any], chart_paths: dict[str, str], results_path: str, charts_note: str = ""
) -> str:
    """The whole Markdown document."""
    steps = results["steps"]
    quick = results.get("mode") == "quick"
    when = datetime.fromisoformat(results["started"])
    command = ("COMFYUI_TEST_URL=… " if results.get("comfyui_test_url") else "") + str(
        results.get("command")
    )
    out = [
        "# comfyq benchmarks",
        "",
        f"> Generated by `python -m bench` on {when:%Y-%m-%d %H:%M} UTC; do not edit by hand.",
        f"> Reproduce: `make bench` (or `.venv/bin/python -m bench`). This run: `{command}`.",
        (
            f"> Raw figures: [`{results_path}`]({results_path}); re-render without re-running:"
            f" `.venv/bin/python -m bench --render-only {results_path}`."
        ),
        "",
    ]
    if quick:
        out += [
            (
                "**This run used `--quick`: small sizes that check the plumbing,"
                " not the issues' sizes."
                " Its figures are not the project's benchmark figures.**"
            ),
            "",
        ]
    m = results.get("machine") or {}
    load, cores = (m.get("load_avg_at_start") or [0.0])[0], m.get("cores") or 1
    if load > cores / 2:  # others' work on the machine skews every figure; say so up front
        out += [
            (
                f"**The machine was busy when this run started (load average {load:.2f} on"
                f" {cores} cores):"
                " treat every figure as noisy.**"
            ),
            "",
        ]
    out += [
        (
            f"One run, {when:%Y-%m-%d}, {num(results.get('duration_s', 0) / 60, 1)} minutes in all."
            " Every benchmark runs in a process of its own;"
            " figures come from a shared machine unless"
            " the load average below says otherwise. Nothing here is a pass/fail test."
        ),
        "",
        "## Targets",
        "",
    ]
    out += table(
        ["issue", "target (the issue's words)", "measured", "verdict"],
        targets(steps),
        numeric=False,
    )
    out += [
        "",
        (
            "“Flat” memory has no figure in the issues:"
            " it is judged met when the peak RSS growth stays under"
            f" a fifth of the bytes moved, and not judged (n/a) for bodies under {FLAT_MIN_MB} MB."
            " “None” for hanging receivers is judged met when the job p50 stays within 20 % (+1 ms)"
            " of the run without them."
        ),
        "",
    ]
    if charts_note:
        out += [f"*{charts_note}*", ""]
    out += ["## Issue 13's table, line by line", ""]
    out += report_issue13.issue13(steps)
    out += ["", "## Machine", ""]
    out += machine(results.get("machine", {}))
    out += ["", "## Steps", ""]
    out += table(
        ["step", "what", "status", "time", "command"],
        [
            [
                name,
                s.get("title", ""),
                s["status"] + (f" ({s['reason']})" if s.get("reason") else ""),
                f"{num(s.get('duration_s'))} s" if "duration_s" in s else "–",
                f"`{s['command']}`" if s.get("command") else "–",
            ]
            for name, s in steps.items()
        ],
        numeric=False,
    )
    for name, title, render in SECTIONS:
        out += ["", f"## {title}", ""]
        f = ok_figures(steps.get(name))
        out += render(f, chart_paths) if f is not None else not_run(steps.get(name))
    out += ["", "## Chaos run (#7)", ""]
    f = ok_figures(steps.get("chaos"))
    out += sec.chaos(f, steps["chaos"]) if f is not None else not_run(steps.get("chaos"))
    out += ["", "## Raw output", ""]
    for name, s in steps.items():
        if s.get("output") and not (
            name == "chaos" and ok_figures(s) is not None
        ):  # shown in its section
            out += [
                f"<details><summary>{name}: <code>{s.get('command')}</code></summary>",
                "",
                "```",
                s["output"].rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


def render(results: dict[str, Any], out: Path, charts_dir: Path, results_path: Path) -> None:
    """Draw the charts into ``charts_dir`` and write the Markdown to ``out``."""
    note = ""
    try:
        from bench import charts as chartmod  # matplotlib: the 'bench' extra
    except ImportError:
        made: dict[str, Path] = {}
        note = (
            "No charts: matplotlib is not installed (`pip install -e '.[bench]'`, or `make bench`)."
        )
    else:
        made = chartmod.make_all(results, charts_dir)
    base = out.resolve().parent
    rel = {name: os.path.relpath(p.resolve(), base) for name, p in made.items()}
    text = build(results, rel, os.path.relpath(results_path.resolve(), base), note)
    out.write_text(text)
