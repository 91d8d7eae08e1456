"""PNG charts for BENCHMARKS.md, drawn from the collected figures (never from a live run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.report_fmt import PATH_LABELS

COLOURS = {"direct": "#4c72b0", "comfyq_sse": "#dd8452", "comfyq_sync": "#55a868"}


def _cdf(ax: Axes, samples: list[float], label: str, colour: str | None = None) -> None:
    xs = sorted(samples)
    if not xs:
        return
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label, color=colour)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ok(step: dict[str, Any] | None) -> dict[str, Any] | None:
    if step and step.get("status") == "ok" and isinstance(step.get("figures"), dict):
        return dict(step["figures"])
    return None


def _sbs_runs(f: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    runs = (
        [("simulator (zero-time nodes)", f["simulator"])]
        if "latency" in f.get("simulator", {})
        else []
    )
    if "latency" in f.get("real", {}):
        runs.append((f"real ComfyUI {f['real'].get('comfyui_version') or ''}".strip(), f["real"]))
    return runs


def sidebyside_latency(f: dict[str, Any], path: Path) -> Path | None:
    """CDF of one-at-a-time job latency, per path, one panel per ComfyUI."""
    runs = _sbs_runs(f)
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.2), squeeze=False)
    for ax, (title, run) in zip(axes[0], runs, strict=True):
        hi = 0.0
        for name, lat in run["latency"].items():
            _cdf(ax, lat["samples_ms"], PATH_LABELS.get(name, name), COLOURS.get(name))
            hi = max(hi, lat["p99"] or 0)
        ax.set_xlim(0, hi * 1.15 or None)
        ax.set_xlabel("job latency, submit to output bytes in hand (ms)")
        ax.set_ylabel("share of jobs")
        ax.set_title(f"{title}: one job at a time, paths in turn")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def sidebyside_throughput(f: dict[str, Any], path: Path) -> Path | None:
    """Jobs/s per path against jobs in flight, one panel per ComfyUI."""
    runs = _sbs_runs(f)
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.2), squeeze=False)
    for ax, (title, run) in zip(axes[0], runs, strict=True):
        rows = run["throughput"]
        levels = [r["in_flight"] for r in rows]
        names = list(rows[0]["rate"]) if rows else []
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(levels))]
            ax.bar(
                xs,
                [r["rate"][name] for r in rows],
                width,
                label=PATH_LABELS.get(name, name),
                color=COLOURS.get(name),
            )
        ax.set_xticks(range(len(levels)), [str(c) for c in levels])
        ax.set_xlabel("jobs in flight")
        ax.set_ylabel("jobs/s")
        ax.set_title(f"{title}: throughput")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, max((max(r["rate"].values()) for r in rows), default=1) * 1.3)
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def store_throughput(f: dict[str, Any], path: Path) -> Path | None:
    """Complete jobs/s against concurrent workers, with the 2,000/s target."""
    series = f.get("throughput") or {}
    if not series:
        return None
    labels = {
        "claim_transitions": "claim + transitions (pre-filled)",
        "create_claim_transitions": "create + claim + transitions",
        "stage_runner": "real stage runner, no-op stages",
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, per in series.items():
        ws = sorted(per, key=int)
        ax.plot([int(w) for w in ws], [per[w] for w in ws], marker="o", label=labels.get(key, key))
    ax.axhline(
        2000, color="red", linestyle="--", linewidth=1, label="target at 16 workers: 2,000/s"
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16], ["1", "4", "16"])
    ax.set_xlabel("concurrent workers (per stage for the runner)")
    ax.set_ylabel("complete jobs/s (synchronous=FULL)")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("store: throughput vs workers")
    return _save(fig, path)


def store_claim(f: dict[str, Any], path: Path) -> Path | None:
    """CDF of claim latency with a small and a big table."""
    claim = f.get("claim_latency") or {}
    if not claim:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    hi = 0.0
    for rows, c in sorted(claim.items(), key=lambda kv: int(kv[0])):
        _cdf(ax, c["samples_ms"], f"{int(rows):,} rows (p99 {c['p99']:.2f} ms)")
        hi = max(hi, c["p99"] or 0)
    ax.set_xlim(0, hi * 1.3 or None)
    ax.set_xlabel("claim latency (ms)")
    ax.set_ylabel("share of claims")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("store: claim latency by table size")
    return _save(fig, path)


def api_delay(f: dict[str, Any], path: Path) -> Path | None:
    """Histogram of SSE event delays with the p99 and the 50 ms target."""
    subs = f.get("subscribers") or {}
    delays = subs.get("delays_ms") or []
    if not delays:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.hist(delays, bins=50, color="#4c72b0")
    ax.axvline(
        subs["delay_ms"]["p99"],
        color="black",
        linestyle=":",
        label=f"p99 {subs['delay_ms']['p99']:.1f} ms",
    )
    ax.axvline(50, color="red", linestyle="--", label="target p99 < 50 ms")
    ax.set_xlabel("state event delay, commit to SSE client (ms)")
    ax.set_ylabel("events")
    ax.set_title(
        f"{f['args']['subscribers']:,} SSE subscribers on {f['args']['jobs']} running jobs"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def memory(results: dict[str, Any], path: Path) -> Path | None:
    """Peak RSS growth while moving big files: streamed S3 uploads, whole-file upload, download."""
    bars: list[tuple[str, float, float]] = []
    out = _ok(results["steps"].get("outputs"))
    if out and out.get("upload"):
        for u in out["upload"].get("streaming", []):
            bars.append((f"S3 streamed\n{u['mb']:.0f} MB", u["rss_growth_mib"], u["mb"]))
        if out["upload"].get("whole_file"):
            u = out["upload"]["whole_file"]
            bars.append(
                (f"S3 whole file\n{u['mb']:.0f} MB (seed way)", u["rss_growth_mib"], u["mb"])
            )
    pre = _ok(results["steps"].get("preprocess"))
    if pre and pre.get("download"):
        d = pre["download"]
        bars.append((f"URL download\n{d['mib']:.0f} MiB", d["rss_growth_mib"], d["mib"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(
        range(len(bars)),
        [b[1] for b in bars],
        color=["#c44e52" if "whole" in b[0] else "#4c72b0" for b in bars],
    )
    ax.bar(
        range(len(bars)),
        [b[2] for b in bars],
        fill=False,
        edgecolor="grey",
        linestyle="--",
        label="bytes moved",
    )
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_yscale("log")  # a 1 GiB body next to a few MiB of growth
    ax.set_ylabel("MiB (log scale)")
    ax.set_title("peak RSS growth while moving a big file")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def scaling(f: dict[str, Any], path: Path) -> Path | None:
    """How comfyq's cost per job grows: database size, jobs in flight, SSE subscribers."""
    db, levels, subs = f.get("database") or [], f.get("in_flight") or [], f.get("subscribers") or []
    if not (db or levels or subs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16.5, 4.4))
    ax = axes[0]
    labels = [f"{r['count']:,}\n{r['kind']}" for r in db]
    xs = range(len(db))
    for k, (name, key) in enumerate((("comfyq_sync", "sync"), ("comfyq_sse", "SSE"))):
        ax.bar(
            [x + (k - 0.5) * 0.38 for x in xs],
            [r[name]["added"]["p50"] for r in db],
            0.38,
            label=f"added p50, {key}",
            color=COLOURS[name],
        )
    ax.set_xticks(list(xs), labels, fontsize=8)
    top = max([r[n]["added"]["p50"] for r in db for n in ("comfyq_sync", "comfyq_sse")], default=1)
    ax.set_ylim(0, top * 1.35)  # room for the legends
    ax.set_ylabel("added latency p50 vs direct (ms)")
    ax.set_title("jobs in the database (one job at a time)")
    cpu_ax = ax.twinx()
    cpu_ax.plot(list(xs), [r["cpu_ms_per_job"] for r in db], "k-o", label="server CPU / job")
    cpu_ax.set_ylabel("comfyq server CPU per job (ms)")
    cpu_ax.set_ylim(0, max([r["cpu_ms_per_job"] for r in db], default=1) * 1.4)
    ax.legend(fontsize=8, loc="upper left")
    cpu_ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    cs = [r["in_flight"] for r in levels]
    for name in ("direct", "comfyq_sync"):
        ax.plot(
            cs,
            [r["rate"][name] for r in levels],
            marker="o",
            color=COLOURS[name],
            label=f"{PATH_LABELS[name]} jobs/s",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("jobs in flight")
    ax.set_ylabel("jobs/s")
    ax.set_ylim(0, None)
    ax.set_title("jobs in flight")
    cpu_ax = ax.twinx()
    cpu_ax.plot(cs, [r["cpu_ms_per_job"] for r in levels], "k--s", label="server CPU / job")
    cpu_ax.set_ylabel("comfyq server CPU per job (ms)")
    cpu_ax.set_ylim(0, max([r["cpu_ms_per_job"] for r in levels], default=1) * 1.4)
    ax.legend(fontsize=8, loc="upper left")
    cpu_ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax = axes[2]
    ns = [r["subscribers"] for r in subs]
    ax.plot(ns, [r["cpu_ms_per_job"] for r in subs], "k-o", label="server CPU per job")
    ax.plot(
        ns,
        [r["final_delay_ms"]["p99"] for r in subs],
        marker="s",
        color=COLOURS["comfyq_sse"],
        label="final_result delay p99 (ms)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SSE subscribers on one 0.4 s job")
    ax.set_ylabel("ms")
    ax.set_title("SSE subscribers")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def make_all(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Draw every chart the results allow; {name: PNG path}."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = results["steps"]
    jobs: list[tuple[str, str, Callable[[dict[str, Any], Path], Path | None]]] = [
        ("sidebyside_latency", "sidebyside", sidebyside_latency),
        ("sidebyside_throughput", "sidebyside", sidebyside_throughput),
        ("store_throughput", "store", store_throughput),
        ("store_claim", "store", store_claim),
        ("api_delay", "api", api_delay),
        ("scaling", "scaling", scaling),
    ]
    made: dict[str, Path] = {}
    for name, step, draw in jobs:
        f = _ok(steps.get(step))
        if f is not None and (p := draw(f, folder / f"{name}.png")) is not None:
            made[name] = p
    if (p := memory(results, folder / "memory.png")) is not None:
        made["memory"] = p
    for name in [j[0] for j in jobs] + ["memory"]:
        if name not in made:  # a chart this run cannot draw must not survive from an older run
            (folder / f"{name}.png").unlink(missing_ok=True)
    return made
