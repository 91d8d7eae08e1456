"""One Markdown section per benchmark, from its ``--json`` figures."""

from __future__ import annotations

from typing import Any

from bench.report_fmt import PATH_LABELS, ms, num, table

Charts = dict[str, str]  # chart name -> path relative to the Markdown file
SHORT = {"direct": "direct", "comfyq_sse": "comfyq SSE", "comfyq_sync": "comfyq sync"}


def _img(charts: Charts, name: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({charts[name]})"] if name in charts else []


def sidebyside_run(run: dict[str, Any], charts: Charts, suffix: str = "") -> list[str]:
    """Latency and throughput tables of one ComfyUI target."""
    lat = run["latency"]
    n = lat["direct"]["n"]
    rows = []
    for name, f in lat.items():
        added = f.get("added")
        rows.append(
            [
                PATH_LABELS.get(name, name),
                ms(f["p50"]),
                ms(f["p90"]),
                ms(f["p99"]),
                f"×{f['ratio_p50']:.2f}" if "ratio_p50" in f else "–",
                ms(added["p50"]) if added else "–",
                ms(added["p99"]) if added else "–",
            ]
        )
    out = [
        (
            f"One job at a time, {n:,} jobs per path,"
            " the paths taken in turn job by job. Latency is from the"
            " request to the output bytes in the client's hands. *Added* is the paired"
            " difference with the"
            " direct job next to it."
        ),
        "",
    ]
    out += table(["path", "p50", "p90", "p99", "p50 ÷ direct", "added p50", "added p99"], rows)
    out += [
        "",
        (
            f"comfyq server CPU per job: {num(run.get('comfyq_cpu_ms_per_job'), 1)} ms;"
            f" its RSS after the run: {num(run.get('comfyq_rss_mb'), 1)} MB;"
            " comfyq settings: defaults"
            f" (GENERATION_WORKERS={run.get('generation_workers')} prompts in flight per backend)."
        ),
    ]
    thr = run["throughput"]
    if thr:
        names = list(thr[0]["rate"])
        head = ["jobs in flight", "jobs per path"] + [f"{SHORT.get(p, p)}, jobs/s" for p in names]
        head += [f"{SHORT.get(p, p)} ÷ direct" for p in names if p != "direct"]
        rows = []
        for r in thr:
            row = [str(r["in_flight"]), num(r["jobs"])] + [num(r["rate"][p], 1) for p in names]
            row += [f"×{r['rate'][p] / r['rate']['direct']:.2f}" for p in names if p != "direct"]
            rows.append(row)
        out += [
            "",
            (
                "Throughput:"
                " each path runs its jobs with N in flight (comfyq SSE = POST /generate + SSE,"
                " comfyq sync = POST /generate/sync); rounds alternate which path goes first."
            ),
            "",
        ]
        out += table(head, rows)
    out += _img(charts, f"sidebyside_latency{suffix}", "latency CDF, direct vs comfyq")
    out += _img(charts, f"sidebyside_throughput{suffix}", "throughput vs jobs in flight")
    return out


def sidebyside(f: dict[str, Any], charts: Charts) -> list[str]:
    """Side by side: simulator, then the real ComfyUI (or why not)."""
    out = [
        (
            "The user-visible comparison:"
            " the same workflow (EmptyImage → ImageInvert → SaveImage, a new colour"
            " per job so ComfyUI's cache never skips it)"
            " sent straight to ComfyUI with comfyq's own ComfyClient"
            " (POST /prompt, follow its websocket to the end, GET /view)"
            " and through `comfyq serve` over HTTP"
            " (POST /generate then the job's SSE stream to `final_result`,"
            " or POST /generate/sync; then GET"
            " /outputs/…). Client, comfyq and ComfyUI are three processes on the same machine."
        ),
        "",
    ]
    sim = f.get("simulator") or {}
    out += ["### Against the simulator (zero-time nodes)", ""]
    out += sidebyside_run(sim, charts) if "latency" in sim else ["*No figures.*"]
    real = f.get("real") or {}
    out += ["", "### Against a real ComfyUI", ""]
    if "latency" in real:
        out += [
            (
                f"ComfyUI {real.get('comfyui_version') or '(version unknown)'} at {real['url']}"
                " (COMFYUI_TEST_URL), model-free nodes. The charts above have a panel for it."
            ),
            "",
        ]
        out += sidebyside_run(real, {})
    else:
        out += [
            (
                "*Not measured:"
                f" {real.get('skipped', 'no figures')}. Set COMFYUI_TEST_URL to a ComfyUI"
                " (CPU is enough) and run again.*"
            )
        ]
    return out


def store(f: dict[str, Any], charts: Charts) -> list[str]:
    """Store alone: throughput per worker count, claim latency per table size."""
    labels = {
        "claim_transitions": "claim → transitions → done (pre-filled)",
        "create_claim_transitions": "create → claim → transitions → done",
        "stage_runner": "the real stage runner, no-op stages (workers per stage)",
    }
    thr = f["throughput"]
    ws = sorted({w for per in thr.values() for w in per}, key=int)
    out = [
        f"synchronous=FULL, WAL, {num(f['args']['jobs'])} jobs per run; complete jobs per second.",
        "",
    ]
    out += table(
        ["measurement"] + [f"{w} worker{'s' if w != '1' else ''}" for w in ws],
        [[labels.get(k, k)] + [num(per.get(w)) for w in ws] for k, per in thr.items()],
    )
    wpc = f.get("writes_per_commit", {}).get("claim_transitions", {})
    if wpc:
        out += [
            "",
            "Group commit, writes per fsync (pre-filled run): "
            + ", ".join(f"{w} workers {wpc[w]:.1f}" for w in sorted(wpc, key=int))
            + ".",
        ]
    cpu = f.get("cpu_ms_per_job", {})
    if cpu:
        out += ["", "CPU per complete job (writer thread / whole process, ms):", ""]
        out += table(
            ["measurement"] + [f"{w} worker{'s' if w != '1' else ''}" for w in ws],
            [
                [labels.get(k, k)]
                + [
                    f"{per[w]['writer_thread']:.2f} / {per[w]['process']:.2f}" if w in per else "–"
                    for w in ws
                ]
                for k, per in cpu.items()
            ],
        )
    per_job = f.get("per_job", {})
    if per_job:
        names = {
            "claim_advance": "create, then claim + advance for each of 3 stages",
            "hand_off": "create, claim, 2 hand-offs, end",
            "hand_off_prompt": "the stage runner's path before the folds: the same + the"
            " generate stage's prompt id write",
            "folded": "the stage runner's path, idle workers: create claimed, 2 hand-offs (the"
            " first storing the prompt id), end",
        }
        out += ["", "SQL on the writer connection per job (sqlite3 trace callback):", ""]
        out += table(
            ["path", "SQL statements", "trigger programs", "commits"],
            [
                [
                    names.get(k, k),
                    f"{c['statements']:.1f}",
                    f"{c['trigger_programs']:.1f}",
                    f"{c['commits']:.1f}",
                ]
                for k, c in per_job.items()
            ],
        )
    claim = f["claim_latency"]
    rows = [
        [f"{int(k):,} rows", ms(c["p50"]), ms(c["p99"]), num(c["n"]), f"{c['fill_s']:.1f} s"]
        for k, c in sorted(claim.items(), key=lambda kv: int(kv[0]))
    ]
    out += [
        "",
        (
            "Claim latency (one claim of the oldest,"
            " highest-priority job with 2,000 waiting, then released):"
        ),
        "",
    ]
    out += table(["finished jobs in the table", "p50", "p99", "claims", "fill time"], rows)
    out += [
        "",
        f"Ratio big ÷ 10k rows: p50 ×{f['claim_p50_ratio']:.2f}, p99 ×{f['claim_p99_ratio']:.2f}.",
    ]
    out += _img(charts, "store_throughput", "store throughput vs workers")
    out += _img(charts, "store_claim", "claim latency CDF by table size")
    return out


def e2e(f: dict[str, Any], charts: Charts) -> list[str]:
    """End to end through the in-process services (issue 3's measurement)."""
    out = [
        (
            "Simulator(s) with zero-time nodes in their own processes;"
            " comfyq's services in the benchmark's"
            f" process, {f['args']['generation_workers']} generation workers per backend;"
            f" {num(f['args']['jobs'])} jobs per run."
        ),
        "",
    ]
    out += table(
        ["backends", "jobs/s end to end"], [[k, num(v, 1)] for k, v in f["throughput"].items()]
    )
    lat = f.get("latency")
    if lat:
        out += [
            "",
            (
                f"Sequential latency, {lat['direct']['n']} jobs each,"
                " alternating comfyq and a direct client"
                " (job submitted in-process, no HTTP in front):"
            ),
            "",
        ]
        out += table(
            ["", "p50", "p90", "p99"],
            [
                [k, ms(lat[k]["p50"]), ms(lat[k]["p90"]), ms(lat[k]["p99"])]
                for k in ("direct", "comfyq", "added")
            ],
        )
        out += ["", f"comfyq ÷ direct at p50: ×{lat['comfyq']['p50'] / lat['direct']['p50']:.2f}."]
    return out


def api(f: dict[str, Any], charts: Charts) -> list[str]:
    """HTTP API: idle RSS, admissions, SSE subscribers."""
    a, s = f["admissions"], f["subscribers"]
    args = f["args"]
    out = table(
        ["measurement", "figure"],
        [
            ["idle RSS of a fresh `comfyq serve`", f"{num(f['idle_rss_mb'], 1)} MB"],
            [
                (
                    f"POST /generate admissions/s ({num(args['admissions'])} requests,"
                    f" {args['concurrency']} concurrent)"
                ),
                num(a["rate"]),
            ],
            [
                "admission latency p50 / p99",
                f"{ms(a['latency_ms']['p50'])} / {ms(a['latency_ms']['p99'])}",
            ],
            [
                "CPU busy during admissions: server / client (share of one core)",
                f"{a['server_cpu'] * 100:.0f}% / {a['client_cpu'] * 100:.0f}%",
            ],
            [
                (
                    f"{num(args['subscribers'])} SSE subscribers on {args['jobs']} running jobs:"
                    " RSS idle / connected / peak"
                ),
                (
                    f"{num(s['rss_idle_mb'], 1)} / {num(s['rss_connected_mb'], 1)} /"
                    f" {num(s['rss_peak_mb'], 1)} MB"
                ),
            ],
            [
                "state event delay p50 / p99 (commit to client)",
                (
                    f"{ms(s['delay_ms']['p50'])} / {ms(s['delay_ms']['p99'])}"
                    f" ({num(s['delay_ms']['n'])} samples)"
                ),
            ],
            ["all subscribers connected in", f"{s['connect_s']:.2f} s"],
            ["events received", f"{num(s['received'])} ({num(s['events_per_s'])} events/s)"],
        ],
    )
    out += _img(charts, "api_delay", "SSE event delay histogram")
    return out


def preprocess(f: dict[str, Any], charts: Charts) -> list[str]:
    """Preprocess throughput per scenario and the big download."""
    out = [
        (
            f"`prepare_job` with {num(f['args']['jobs'])} jobs per scenario,"
            f" {f['args']['concurrency']} concurrent;"
            " the file server is a child process."
        ),
        "",
    ]
    out += table(["scenario", "jobs/s"], [[k, num(v)] for k, v in f["rates"].items()])
    out += ["", f"Cached ÷ uncached URL input: ×{f['cached_over_uncached']:.1f}."]
    d = f.get("download")
    if d:
        out += [
            "",
            (
                f"Downloading a {num(d['mib'])} MiB body: {num(d['mib_per_s'])} MiB/s; RSS"
                f" {num(d['rss_before_mib'], 1)} → peak {num(d['rss_peak_mib'], 1)} MiB"
                f" (+{num(d['rss_growth_mib'], 1)} MiB)."
            ),
        ]
    return out


def outputs(f: dict[str, Any], charts: Charts) -> list[str]:
    """S3 upload memory and speed, webhook rates, hanging receivers."""
    up = f.get("upload") or {}
    rows = [
        [
            f"streamed multipart, {num(u['mb'])} MB",
            f"{num(u['mb_per_s'], 1)} MB/s",
            (
                f"{num(u['rss_base_mib'])} → {num(u['rss_peak_mib'])} MiB"
                f" (+{num(u['rss_growth_mib'])})"
            ),
        ]
        for u in up.get("streaming", [])
    ]
    if up.get("whole_file"):
        u = up["whole_file"]
        rows.append(
            [
                f"whole file in memory (the seed wrapper's way), {num(u['mb'])} MB",
                f"{num(u['mb_per_s'], 1)} MB/s",
                (
                    f"{num(u['rss_base_mib'])} → {num(u['rss_peak_mib'])} MiB"
                    f" (+{num(u['rss_growth_mib'])})"
                ),
            ]
        )
    out = [
        "S3 uploads to moto in its own process (a Python server: it bounds the rate, not S3).",
        "",
    ]
    out += table(["upload", "rate", "RSS of the uploading process"], rows)
    out += ["", "Webhook deliveries to a fast receiver (separate process), signed:", ""]
    out += table(
        ["in flight to the receiver", "in flight in total", "deliveries/s"],
        [
            [str(d["per_host"]), str(d["concurrency"]), num(d["rate"])]
            for d in f.get("deliveries", [])
        ],
    )
    out += [
        "",
        (
            f"A receiver that hangs vs other jobs ({f['args']['jobs']} sequential jobs per"
            " scenario, each with a"
            " webhook to a fast receiver):"
        ),
        "",
    ]
    out += table(
        ["scenario", "job p50", "job p99", "webhook after job end p50", "p99"],
        [
            [
                h["label"],
                ms(h["job_ms"]["p50"]),
                ms(h["job_ms"]["p99"]),
                ms(h["webhook_after_end_ms"]["p50"]),
                ms(h["webhook_after_end_ms"]["p99"]),
            ]
            for h in f.get("hanging", [])
        ],
    )
    out += _img(charts, "memory", "peak RSS growth while moving big files")
    return out


CHAOS_FIELDS = [
    ("accepted", "jobs accepted (2xx)"),
    ("completed", "completed"),
    ("failed", "failed"),
    ("lost", "**lost** (must be 0)"),
    ("webhooks_owed", "webhooks owed"),
    ("webhooks_delivered", "webhooks delivered"),
    ("webhooks_duplicate", "webhooks delivered twice (allowed)"),
    ("webhooks_lost", "**webhooks lost** (must be 0)"),
    ("prompts_submitted", "prompts submitted to ComfyUI"),
    ("attempts_total", "attempts counted by comfyq"),
    ("jobs_prompts_gt_attempts", "jobs with more prompts than attempts"),
    ("comfyq_kills", "comfyq kill -9 + restart"),
    ("simulator_crashes", "simulator kill -9 + restart"),
]


def chaos(f: dict[str, Any], step: dict[str, Any]) -> list[str]:
    """The chaos run's account, then its own printed report."""
    out = table(
        ["", "count"], [[label, num(f.get(key))] for key, label in CHAOS_FIELDS if key in f]
    )
    reasons = f.get("failed_reasons") or {}
    if reasons:
        out += [
            "",
            "Failed, by reason: " + "; ".join(f"{why}: {n}" for why, n in reasons.items()) + ".",
        ]
    out += [
        "",
        f"Wall time {num(f.get('duration_s'), 0)} s."
        f" `{step.get('command', 'python -m bench.chaos')}`"
        + (f" ended with {step['reason']}." if step.get("reason") else " exited 0."),
        "",
        "Its printed report:",
        "",
        "```",
        step.get("output", "").rstrip(),
        "```",
    ]
    return out


def profile(f: dict[str, Any], charts: Charts) -> list[str]:
    """The profiled burst: CPU per job by thread and by layer, system calls per job."""
    out = [
        (
            f"{f['jobs']} trivial jobs (POST /generate, SSE to final_result, output downloaded),"
            f" {f['in_flight']} in flight, against the zero-time simulator, with comfyq's "
            f"event-loop"
            " thread sampled by pyinstrument (overhead included: read the split, not the totals)."
            " Call tree: [`bench/results/profile.html`](bench/results/profile.html)"
            " ([text](bench/results/profile.txt))."
        ),
        "",
    ]
    out += table(
        ["figure", "value"],
        [
            ["server CPU per job", ms(f["cpu_ms_per_job"])],
            ["event-loop thread", ms(f["loop_thread_cpu_ms_per_job"])],
            ["other threads (SQLite writer, file hops)", ms(f["other_threads_cpu_ms_per_job"])],
            ["jobs/s while profiled", num(f["jobs_per_s"])],
            ["socket sends per job", num(f.get("socket_sends_per_job"))],
            ["fsyncs per job (≈ commits)", num(f.get("fsyncs_per_job"))],
            ["system calls per job", num(f.get("syscalls_per_job"))],
        ],
        numeric=False,
    )
    out += ["", "The event-loop thread's CPU per job, by layer:", ""]
    out += table(
        ["layer", "ms per job"],
        [[name, ms(v)] for name, v in f["loop_ms_per_job_by_layer"].items()],
        numeric=False,
    )
    top = f.get("top_syscalls_per_job") or {}
    if top:
        out += ["", "System calls per job, most frequent first (strace -c, a separate burst):", ""]
        out += table(["call", "per job"], [[k, num(v)] for k, v in top.items()], numeric=False)
    return out


def ui(f: dict[str, Any], charts: Charts) -> list[str]:
    """The dashboard: commit -> DOM latency, jobs-page reads at many jobs, CPU per dashboard."""
    lat, pages, c = f["latency"], f["pages"], f["cpu"]
    rows = [
        [
            (
                f"state change committed -> DOM updated in the browser, p50 / p99"
                f" ({num(lat['jobs'])} jobs at {num(lat['rate'])}/s, {num(lat['stamps'])} changes)"
            ),
            f"{ms(lat['p50_ms'])} / {ms(lat['p99_ms'])} (target p99 <= 250 ms)",
        ],
    ]
    names = {
        "first_page": "first page of 50",
        "filter_failed": "status filter: failed",
        "filter_queued": "status filter: queued",
        "deep_page_200": "keyset page 200 (10,000 rows deep)",
        "search_id_prefix": "search by id prefix",
        "counts_cold": "status counts (uncached)",
        "v1_jobs_first_page": "GET /jobs first page (Results)",
    }
    for key, label in names.items():
        v = pages.get(key)
        if v:
            rows.append(
                [
                    f"{label}, {num(pages['jobs_in_db'])} jobs in the database, p50 / p99",
                    f"{ms(v['p50_ms'])} / {ms(v['p99_ms'])}"
                    + (" (target first page <= 50 ms)" if key == "first_page" else ""),
                ]
            )
    rows.append(
        [
            (
                f"server CPU at {num(c['rate'])} jobs/s without / with {c['dashboards']}"
                " dashboards (share of one core)"
            ),
            f"{c['server_cores_without'] * 100:.1f}% / {c['server_cores_with'] * 100:.1f}%",
        ]
    )
    rows.append(
        [
            "server CPU per connected dashboard (browsers on the same 2 cores)",
            f"{c['per_dashboard_core_pct']:.2f}% of a core (target <= 5 %)",
        ]
    )
    e = f.get("cpu_emulated")
    if e:
        rows.append(
            [
                (
                    f"server CPU per dashboard, {e['clients']} emulated ones (/ws '*' and the"
                    " page's reads, no browser competing)"
                ),
                (
                    f"{e['per_dashboard_core_pct']:.2f}% of a core"
                    f" ({e['server_cores_without'] * 100:.1f}% ->"
                    f" {e['server_cores_with'] * 100:.1f}%)"
                ),
            ]
        )
    return table(["measurement", "figure"], rows)


def hostile(f: dict[str, Any], charts: Charts) -> list[str]:
    """Hostile bodies (#19): loop lag, /health and RSS while the largest allowed bodies run."""
    rows = []
    for kind, k in f["kinds"].items():
        rows.append(
            [
                f"{kind} ({num(k['body_mb'], 1)} MB, {'/'.join(str(s) for s in k['statuses'])})",
                f"{num(k['loop_lag_max_ms'], 1)} / ≤{num(k['loop_lag_p99_bucket_ms'])} ms",
                " / ".join(num(k[f"health_{q}_ms"], 1) for q in ("p50", "p99", "max")) + " ms",
                f"{num(k['other_requests'])} ({num(k['other_requests_per_s'])}/s)",
                " → ".join(num(k[f"rss_{q}_mb"]) for q in ("idle", "after_burst", "settled"))
                + " MB",
            ]
        )
    intro = (
        f"{f['bodies']} bodies of each kind, one after another, on a fresh server; targets:"
        " loop lag max ≤ 50 ms, /health p99 ≤ 100 ms, RSS back within 20% of idle."
    )
    return [
        intro,
        "",
        *table(
            [
                "body kind (status)",
                "loop lag max / p99",
                "/health p50 / p99 / max",
                "other requests served",
                "RSS idle → burst → settled",
            ],
            rows,
            numeric=False,
        ),
    ]


def queue_depth(f: dict[str, Any], charts: Charts) -> list[str]:
    """Latency of the answers a client gets as the queue deepens, RSS and database size."""
    out = [
        (
            "comfyq in front of a ComfyUI address where nothing listens, so admitted jobs stay"
            " queued and the queue only grows; at each depth, sequential requests (p50 / p99)."
            " MAX_QUEUE_SIZE defaults to 10,000 from these figures."
        ),
        "",
    ]
    rows = []
    for d in f["depths"]:

        def pp(name: str, d: dict[str, Any] = d) -> str:
            return f"{ms(d[name]['p50'])} / {ms(d[name]['p99'])}"

        rows.append(
            [
                num(d["depth"]),
                pp("admit"),
                pp("result_with_position"),
                pp("queue_info"),
                pp("jobs_page"),
                f"{num(d['rss_mb'])} MB",
                f"{num(d['db_mb'], 1)} MB",
            ]
        )
    out += table(
        [
            "jobs waiting",
            "POST /generate",
            "GET /result (position, ETA)",
            "GET /queue-info",
            "GET /jobs",
            "server RSS",
            "database",
        ],
        rows,
        numeric=False,
    )
    return out


def sim(f: dict[str, Any], charts: Charts) -> list[str]:
    """CPU of the zero-time simulator process per trivial job, driven straight by ComfyClient."""
    out = [
        (
            "The zero-time ComfyUI simulator driven straight by comfyq's ComfyClient (websocket"
            " up, POST /prompt, follow, GET /view), EmptyImage 16x16 -> ImageInvert -> SaveImage,"
            " a new colour per job: the part of every end-to-end figure on the simulator that is"
            " not comfyq's (issue 13 asks for at most 0.7 ms)."
        ),
        "",
    ]
    split = "sim_user_ms_per_job" in f
    out += table(
        ["jobs", "in flight", "simulator CPU per job"]
        + (["of which user / system"] if split else [])
        + ["jobs/s"],
        [
            [num(f["jobs"]), num(f["in_flight"]), ms(f["sim_cpu_ms_per_job"])]
            + (
                [f"{ms(f['sim_user_ms_per_job'])} / {ms(f['sim_system_ms_per_job'])}"]
                if split
                else []
            )
            + [num(f["jobs_per_s"])]
        ],
        numeric=False,
    )
    if split:
        out += [
            "",
            (
                "System time is mostly the kernel creating each job's output file (one openat"
                " per job; on this machine's ext4 it varies run to run with how many files were"
                " deleted recently), which a ComfyUI that writes its outputs pays too."
            ),
        ]
    return out


def floor(f: dict[str, Any], charts: Charts) -> list[str]:
    """comfyq's CPU per job next to bench.floor_server's: the same exchanges and nothing else."""
    out = [
        (
            "A trivial job through `POST /generate` + SSE + `GET /outputs` is six HTTP exchanges"
            " and the prompt's websocket messages. `bench/floor_server.py` makes exactly those"
            " exchanges in bare aiohttp (no queue, database, validation, logs or metrics,"
            " outputs in memory), in front of the same simulator, driven by the same client,"
            " rounds alternating; CPU per job of each server process from /proc. The floor is"
            " what no change inside comfyq removes short of fewer exchanges or another HTTP"
            " stack; the rest is comfyq's own: the durable queue (the SQLite writer's"
            " statements and fsyncs), its event loop work and everything it adds."
        ),
        "",
    ]
    out += table(
        [
            "jobs per server",
            "in flight",
            "floor CPU per job",
            "comfyq CPU per job",
            "comfyq ÷ floor",
            "comfyq above the floor",
            "floor jobs/s",
            "comfyq jobs/s",
        ],
        [
            [
                num(f["jobs_per_server"]),
                num(f["in_flight"]),
                ms(f["floor_cpu_ms_per_job"]),
                ms(f["comfyq_cpu_ms_per_job"]),
                f"×{f['cpu_ratio']:.2f}",
                ms(f["above_floor_ms"]),
                num(f["floor_jobs_per_s"]),
                num(f["comfyq_jobs_per_s"]),
            ]
        ],
        numeric=False,
    )
    if "comfyq_loop_thread_ms_per_job" in f:
        out += [
            "",
            (
                "comfyq's CPU per job by thread (from /proc, same rounds): event loop"
                f" {ms(f['comfyq_loop_thread_ms_per_job'])}, SQLite writer"
                f" {ms(f['comfyq_writer_thread_ms_per_job'])}, other threads (file writes and"
                f" serving, reads handed off) {ms(f['comfyq_other_thread_ms_per_job'])}. The"
                " floor's whole process does the exchanges on its event loop."
            ),
        ]
    return out
