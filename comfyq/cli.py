"""The ``comfyq`` command: serve | migrate | config | jobs ls/show/cancel/retry | instances |
prune."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from comfyq import logs
from comfyq.config import ConfigError, Settings, load_settings, masked, parse_set_flags
from comfyq.errors import ComfyqError
from comfyq.store import JobStore, State, StoreError, open_store

log = logging.getLogger("comfyq")
T = TypeVar("T")


# comfyq.sim.generation.VERSIONS, spelled out so that every command does not import the
# simulator (a test keeps the two equal).
SIM_VERSIONS = ("0.3.64", "0.38")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comfyq", description="A durable API server in front of ComfyUI."
    )
    p.add_argument("--config", help="settings file (default: $COMFYQ_CONFIG or comfyq.toml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting (repeatable), e.g. --set max_queue_size=500",
    )
    p.add_argument("--database", help="a SQLite file or a postgresql:// URL (setting: database)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the API server and the pipeline")
    s.add_argument("--host", help="listen address (setting: api_host)")
    s.add_argument("--port", type=int, help="listen port (setting: api_port)")
    s.add_argument(
        "--simulate", action="store_true", help="run against the built-in ComfyUI simulator"
    )
    s.add_argument(
        "--comfyui-version",
        choices=SIM_VERSIONS,
        default=None,
        help="with --simulate: which ComfyUI protocol the simulator speaks (default: the newest)",
    )

    sub.add_parser("migrate", help="create the database or apply pending migrations")
    sub.add_parser("config", help="print the effective settings (secrets masked)")

    j = sub.add_parser("jobs", help="inspect and steer jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    ls = jsub.add_parser("ls", help="list jobs, newest first")
    ls.add_argument("--status", action="append", help="only these states (repeatable)")
    ls.add_argument("--limit", type=int, default=30)
    for name, text in (
        ("show", "a job with its event history"),
        ("cancel", "cancel a job"),
        ("retry", "run a failed or cancelled job again"),
    ):
        c = jsub.add_parser(name, help=text)
        c.add_argument("id")

    ins = sub.add_parser("instances", help="the instances registered on the database")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pr = sub.add_parser("prune", help="delete finished jobs and their files")
    pr.add_argument("--older-than", required=True, help="age such as 3600, 90m, 12h, 7d")
    return p


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ConfigError(f"--older-than: cannot read {text!r} (use e.g. 3600, 90m, 12h, 7d)")
    return (
        float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = parse_set_flags(args.set)
        if args.database:
            overrides["database"] = args.database
        if args.cmd == "serve":
            if args.host:
                overrides["api_host"] = args.host
            if args.port is not None:
                overrides["api_port"] = str(args.port)
            if args.simulate:
                overrides["simulate"] = "true"
            elif args.comfyui_version:
                print("comfyq: --comfyui-version needs --simulate", file=sys.stderr)
                return 2
        settings = load_settings(config_path=args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"comfyq: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings)
    try:
        if args.cmd == "serve":
            return asyncio.run(serve(settings, comfyui_version=args.comfyui_version))
        if args.cmd == "migrate":
            return _migrate(settings)
        if args.cmd == "config":
            print(json.dumps(masked(settings), indent=2))
            return 0
        if args.cmd == "jobs":
            return _jobs(settings, args)
        if args.cmd == "instances":
            from comfyq.cluster.cli import main as instances

            return instances(settings, args.json)
        if args.cmd == "prune":
            return _prune(settings, parse_age(args.older_than))
    except (ConfigError, StoreError) as exc:
        print(f"comfyq: {exc}", file=sys.stderr)
        return 2
    except ComfyqError as exc:
        print(f"comfyq: {exc.message}", file=sys.stderr)
        return 1
    return 0


# --- serve -----------------------------------------------------------------------------------


async def _until_accepting(host: str, port: int) -> None:
    """Return once a TCP connection to the listener succeeds (a few tries; never raises)."""
    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    for delay in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5):
        await asyncio.sleep(delay)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(target, port), 2)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    log.warning("listener on %s:%s did not accept a test connection", target, port)


async def serve(settings: Settings, *, comfyui_version: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; then stop claiming, let in-flight work finish, exit 0.

    ``comfyui_version``: the simulator's ComfyUI generation (``--simulate`` only; None = newest).
    """
    from aiohttp import web

    from comfyq.api.server import Runner
    from comfyq.app import create_app
    from comfyq.limits import fixed_mmap_threshold
    from comfyq.services import Services

    fixed_mmap_threshold()  # large bodies' memory is returned after they are done
    sim = None
    backends = None
    if settings.simulate:
        from comfyq.sim import Simulator
        from comfyq.sim.generation import NEWEST

        sim = Simulator(
            data_dir=Path(settings.database).parent / "simulator",
            node_duration=settings.simulate_node_duration,
            progress_steps=settings.simulate_progress_steps,
            comfyui_version=comfyui_version or NEWEST,
        )
        await sim.start()
        backends = [sim.url]
        log.info(
            "simulate: built-in ComfyUI simulator (ComfyUI %s) at %s",
            sim.generation.comfyui_version,
            sim.url,
        )
    services = Services(settings, backends=backends)
    logs.attach(services)  # one line per job state change
    # Watchers (Vast's worker) connect the moment they read BACKENDS_READY: hold it back until the
    # listener below accepts connections.
    services.pool.hold_ready_line()
    services.listening = False
    try:
        await services.start()
    except Exception as exc:
        log.error(
            "Application startup failed: %s",
            exc,
            exc_info=not isinstance(exc, StoreError),
            extra=logs.SIGNAL,
        )
        if sim:
            await sim.stop()
        return 2
    try:
        app = create_app(services)
        # aiohttp's own access log would print query strings (?access_token=): the API's
        # middleware logs each request instead (comfyq.access).
        runner = Runner(app, settings, access_log=None, handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        site = web.TCPSite(runner, settings.api_host, settings.api_port)
        await site.start()
    except BaseException as exc:
        log.error(
            "Application startup failed: %s",
            exc,
            exc_info=not isinstance(exc, OSError),
            extra=logs.SIGNAL,
        )
        await services.stop()
        if sim:
            await sim.stop()
        return 2
    if settings.api_host not in ("127.0.0.1", "localhost", "::1") and not (
        settings.api_keys or settings.api_keys_file
    ):
        log.warning(
            "listening on %s without API keys: anyone who can reach it can submit jobs",
            settings.api_host,
        )
    bound = runner.addresses
    port = bound[0][1] if bound else settings.api_port
    await services.cluster.listening_at(settings.api_host, int(port))
    log.info(
        "comfyq listening on http://%s:%s (database %s, backends %s)",
        settings.api_host,
        port,
        services.store.describe(),
        ", ".join(services.backend_urls),
    )
    await _until_accepting(settings.api_host, port)
    services.listening = True
    services.pool.release_ready_line()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from comfyq.api.context import API

    loop.add_signal_handler(signal.SIGHUP, app[API].keys.reload)  # COMFYQ_API_KEYS_FILE again
    await stop.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace)
    await runner.cleanup()  # stops the site, then the app's cleanup stops the services
    if services.started:
        await services.stop()
    if sim:
        await sim.stop()
    log.info("stopped")
    return 0


# --- jobs ------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    widths = {
        c: max(len(c), *(len(str(r.get(c, "") or "")) for r in rows)) if rows else len(c)
        for c in cols
    }
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    for r in rows:
        lines.append(
            "  ".join(
                str(r.get(c, "") if r.get(c) is not None else "").ljust(widths[c]) for c in cols
            )
        )
    return "\n".join(lines)


def _with_store(settings: Settings, fn: Callable[[JobStore], Awaitable[T]]) -> T:
    """Open the store the settings name (migrating it), run ``fn(store)``, close it."""

    async def run() -> T:
        store = open_store(settings.database)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _migrate(settings: Settings) -> int:
    store = open_store(settings.database)
    applied = asyncio.run(store.migrate())
    where = store.describe()
    print(f"{where}: applied {applied}" if applied else f"{where}: up to date")
    if store.engine == "postgres":
        from comfyq.cluster.migrate import migrate_url

        cluster = asyncio.run(migrate_url(settings.database))
        print(
            f"{where}: cluster tables: applied {cluster}"
            if cluster
            else f"{where}: cluster tables: up to date"
        )
    return 0


def _jobs(settings: Settings, args: argparse.Namespace) -> int:
    return _with_store(settings, lambda store: _jobs_cmd(store, args))


async def _jobs_cmd(store: JobStore, args: argparse.Namespace) -> int:
    if args.jobs_cmd == "ls":
        rows = await store.overview(args.status, args.limit)
        print(
            _table(
                rows,
                [
                    "id",
                    "status",
                    "stage",
                    "tries",
                    "priority",
                    "created_at",
                    "age_s",
                    "error_type",
                    "message",
                ],
            )
        )
        return 0
    if args.jobs_cmd == "show":
        return await _show(store, args.id)
    if args.jobs_cmd == "cancel":
        job, tr = await store.request_cancel(args.id)
        if tr is not None:
            print(f"{args.id}: cancelled")
        elif job.state == State.RUNNING:
            print(f"{args.id}: cancel requested; the server stops it within a few seconds")
        else:
            print(f"{args.id}: already {job.state}")
        return 0
    if args.jobs_cmd == "retry":
        await store.retry_job(args.id)
        print(f"{args.id}: queued again")
        return 0
    return 0


async def _show(store: JobStore, job_id: str) -> int:
    job = await store.get(job_id)
    if job is None:
        print(f"comfyq: job {job_id} not found", file=sys.stderr)
        return 1
    print(f"job       {job.id}")
    print(f"status    {job.status} (state {job.state}, stage {job.stage})")
    print(
        f"attempts  {job.attempts}/{job.max_attempts}   priority {job.priority}"
        f"   kind {job.kind or '-'}"
    )
    print(f"created   {job.created_at}   finished {job.finished_at or '-'}")
    print(f"comfyui   backend {job.comfy_backend or '-'}   prompt {job.comfy_prompt_id or '-'}")
    print(f"message   {job.message}")
    if job.error:
        print("error     " + json.dumps(job.error)[:2000])
    if job.timings:
        print("timings   " + ", ".join(f"{k}={v:.0f}" for k, v in job.timings.items()))
    events = await store.events(job_id)
    for e in events:
        e["change"] = f"{e['from_state'] or '-'} -> {e['to_state']}"
    print("\nevents")
    print(_table(events, ["id", "at", "change", "stage", "attempt", "message"]))
    outputs = await store.outputs(job_id)
    if outputs:
        print("\noutputs")
        print(_table(outputs, ["filename", "node_id", "mimetype", "size", "url", "upload_error"]))
    deliveries, rows = await store.webhook_history(job_id)
    if deliveries:
        for d in deliveries:
            if d["state"] != "pending":
                d["next_attempt_at"] = "-"
        print("\nwebhook deliveries")
        print(
            _table(
                deliveries,
                [
                    "id",
                    "event",
                    "state",
                    "host",
                    "attempts",
                    "next_attempt_at",
                    "last_status",
                    "last_error",
                ],
            )
        )
    if rows:
        print("\nwebhook attempts")
        print(_table(rows, [c for c in rows[0] if c not in ("job_id", "body")]))
    return 0


def _prune(settings: Settings, older_than: float) -> int:
    from comfyq.services import prune_jobs

    n = _with_store(
        settings, lambda store: prune_jobs(store, Path(settings.output_dir), older_than)
    )
    print(f"pruned {n} job(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
