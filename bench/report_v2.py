"""The Markdown section of ``bench_v2``: comfyq's Comfy API v2 beside the official proxy."""

from __future__ import annotations

from typing import Any

from bench.report_fmt import ms, num, table

LABELS = {
    "direct": "direct ComfyUI client",
    "proxy_poll": "comfy-api-proxy, polling",
    "proxy_sse": "comfy-api-proxy, SSE",
    "comfyq_poll": "comfyq /api/v2, polling",
    "comfyq_sse": "comfyq /api/v2, SSE",
    "comfyq_own_sse": "comfyq /generate + SSE (its own API)",
}


def _run(run: dict[str, Any]) -> list[str]:
    lat, cpu, tp = run["latency"], run["cpu_ms_per_job"], run["throughput_16"]
    rows = []
    for name, f in lat.items():
        added = f.get("added") or {}
        rows.append(
            [
                LABELS.get(name, name),
                ms(f["p50"]),
                ms(f["p90"]),
                ms(added.get("p50")) if added else "–",
                ms(added.get("p90")) if added else "–",
                ms(cpu.get(name)) if name in cpu else "–",
                num(tp["rate"].get(name), 1),
                f"×{tp['ratio_to_direct'][name]:.2f}" if name in tp["ratio_to_direct"] else "–",
            ]
        )
    head = ["path", "p50", "p90", "added p50", "added p90", "server CPU / job"]
    head += ["jobs/s at 16 in flight", "÷ direct"]
    out = table(head, rows)
    srows = []
    for name, s in run["streams"].items():
        srows.append(
            [
                name,
                f"{s['served_to_terminal']}/{s['streams']}",
                num(s["refused"]),
                num(s["stalled"]),
                num(s["false_terminal"]),
            ]
        )
    out += ["", f"{run['streams']['comfyq']['streams']} event streams opened at once:", ""]
    out += table(
        ["server", "served to terminal", "refused (429)", "stalled", "false terminal"], srows
    )
    ft = run.get("false_terminal", {})
    out += [
        "",
        (
            f"False terminal states seen by the polling and SSE clients during the run: comfyq"
            f" {ft.get('comfyq', '–')}, proxy {ft.get('proxy', '–')}; streams the proxy refused"
            f" (the client polled instead): {run.get('streams_refused', {}).get('proxy', '–')}."
            f" Poll interval {num(run.get('poll_ms'), 0)} ms."
        ),
    ]
    return out


def v2(f: dict[str, Any], charts: dict[str, str]) -> list[str]:
    """Simulator, then the real ComfyUI (or why not)."""
    out = [
        (
            "The same trivial job (EmptyImage → ImageInvert → SaveImage) straight to ComfyUI,"
            " through the official comfy-api-proxy 0.1.6 (`--state-dir`) and through comfyq's"
            " `/api/v2`, each waited on by polling `GET /api/v2/jobs/{id}` or by its SSE stream,"
            " then the output downloaded; paths taken in turn job by job, *added* paired"
            " against direct."
        ),
        "",
        "### Against the simulator (zero-time nodes)",
        "",
    ]
    out += _run(f["simulator"])
    real = f.get("real") or {}
    out += ["", "### Against a real ComfyUI", ""]
    out += _run(real) if "latency" in real else [f"Not run: {real.get('skipped', 'no figures')}."]
    return out
