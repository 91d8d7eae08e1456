"""Services: everything a running comfyq holds, built from the settings, started and stopped in
order."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
from functools import partial
from pathlib import Path
from typing import Any

from yarl import URL

from comfyq.clock import Clock
from comfyq.cluster.files import OutputRouter
from comfyq.cluster.link import ClusterLink, LocalLink
from comfyq.cluster.member import Membership
from comfyq.comfy.backends import BackendPool
from comfyq.comfy.supervisor import Supervisor, command_for
from comfyq.comfy.warmup import Warmup, WarmupFileError, load_workflow
from comfyq.config import ConfigError, Settings
from comfyq.errors import OutputError
from comfyq.events import EventBus
from comfyq.inputs import Downloader
from comfyq.inputs.models import GiB, ModelStore
from comfyq.netguard import AddressGuard
from comfyq.outputs.convert import ConvertSpec
from comfyq.outputs.local import job_dir
from comfyq.outputs.s3 import S3Uploader
from comfyq.stages.generate import Generate
from comfyq.stages.postprocess import Postprocess
from comfyq.stages.preprocess import Preprocess
from comfyq.stages.runner import Pipeline, RunnerConfig, StageHandler
from comfyq.store import JobStore, Stage, open_store
from comfyq.store.assets import AssetStore
from comfyq.store.postgres import PostgresStore
from comfyq.v2.resolve import AssetResolver
from comfyq.webhooks import WebhookConfig, WebhookSender
from modifiers import ModifierRegistry
from modifiers.registry import BUILTIN_MODIFIERS_DIR

log = logging.getLogger("comfyq")


class Services:
    """The store, the bus, the backends, the pipeline and the maintenance tasks of one server."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        backends: list[str] | None = None,
        link: ClusterLink | None = None,
    ) -> None:
        self.settings = settings
        self.roles = settings.active_roles
        self.clock = clock or Clock()
        self.backend_urls = backends or settings.backends
        self.db_path = Path(settings.database)  # the SQLite file (meaningless for a server URL)
        self.output_dir = Path(settings.output_dir).absolute()
        self.store = open_store(
            settings.database,
            clock=self.clock,
            pool_size=settings.database_pool(len(self.backend_urls)),
        )
        self.bus = EventBus()
        self.store.listen(self.bus.on_transitions)
        self.link: ClusterLink = link or _link_for(settings.database, self.store.owner)
        self.guard = AddressGuard(settings.url_allowlist)
        self.downloader = Downloader(
            Path(settings.cache_dir),
            self.guard,
            max_bytes=settings.download_max_bytes,
            total_timeout=settings.download_timeout,
        )
        extra = [Path(settings.modifiers_dir)] if settings.modifiers_dir else []
        local = Path("modifiers")
        if not extra and local.is_dir() and local.resolve() != BUILTIN_MODIFIERS_DIR:
            extra = [
                local
            ]  # a user's modifiers/ folder where comfyq runs is found without a setting
        self.registry = ModifierRegistry(extra)
        self.pool = BackendPool(
            self.backend_urls,
            slots_per_backend=settings.generation_workers,
            probe_interval=settings.backend_probe_interval,
            ready_timeout=settings.backends_ready_timeout,
            client_kwargs={
                "request_timeout": settings.comfyui_request_timeout,
                "ws_quiet_timeout": settings.comfyui_ws_quiet_timeout,
            },
            client_id_for=self._client_id,
            warmup=_warmup(settings),
        )
        self.models = (
            ModelStore(
                Path(settings.comfyui_models_dir),
                self.guard,
                budget_bytes=int(settings.model_cache_gb * GiB),
                max_bytes=settings.model_max_bytes,
                total_timeout=settings.model_download_timeout,
            )
            if settings.comfyui_models_dir
            else None
        )
        self.supervisors = _supervisors(settings, self.backend_urls)
        for sup in self.supervisors:
            self.pool.process_info[sup.url] = sup.snapshot
        # False between `comfyq serve`'s start and its listener accepting connections (/ready).
        self.listening = True
        self.uploader = S3Uploader.from_settings(settings, self.guard)
        self.webhooks = WebhookSender(self.store, self.guard, WebhookConfig.from_settings(settings))
        self.generate = Generate(self.pool, failover_after=settings.backend_failover_after)
        self.asset_resolver = AssetResolver(self.store)  # Comfy API v2 assets (comfyq/v2)
        self.postprocess = Postprocess(
            self.pool,
            self.output_dir,
            uploader=self.uploader,
            fail_on_upload_error=settings.s3_fail_job_on_upload_error,
            convert_default=(
                ConvertSpec(
                    settings.output_convert_format,
                    settings.output_convert_quality,
                    settings.output_convert_max_side,
                )
                if settings.output_convert_format
                else None
            ),
        )
        handlers: dict[Stage, StageHandler] = {
            Stage.PREPROCESS: Preprocess(
                self.registry, self.downloader, self.asset_resolver, models=self.models
            ),
            Stage.GENERATE: self.generate,
            Stage.POSTPROCESS: self.postprocess,
        }
        workers = {
            Stage.PREPROCESS: settings.preprocess_workers,
            Stage.GENERATE: settings.generation_workers * len(self.backend_urls),
            Stage.POSTPROCESS: settings.postprocess_workers,
        }
        # COMFYQ_ROLES: an instance runs only the stages it has the role of (its workers claim
        # only those); the others' jobs wait in the shared queue for the instances that do.
        self.pipeline = Pipeline(
            self.store,
            self.bus,
            {n: h for n, h in handlers.items() if n in self.roles},
            workers,
            RunnerConfig(
                lease=settings.lease_seconds,
                retry_base=settings.retry_base_delay,
                retry_max=settings.retry_max_delay,
                idle_poll=settings.claim_poll_interval,
            ),
        )
        self.cluster = Membership(
            settings,
            self.link,
            instance_id=self.store.owner,
            bus=self.bus,
            wake=[self.bus.on_transitions, self.pipeline.wake],
            pool=self.pool if "generate" in self.roles else None,
            backends=self.backend_urls,
            rescue=self.store.recover,
            outbox_rescue=(
                partial(self.store.outbox_recover, settings.webhook_max_attempts)
                if "webhooks" in self.roles
                else None
            ),
        )
        self.postprocess.holder = lambda: self.cluster.me.name
        if "webhooks" in self.roles:
            # A job that ended on another instance queued its webhook: any sender may take it.
            self.cluster.on_outbox = self.webhooks.wake
        if isinstance(self.store, PostgresStore):
            # recover() at start and the cluster's rescue take the jobs of dead instances only.
            self.store.dead_owners = self.cluster.dead_owners
        self.outputs = OutputRouter(
            self.cluster, api_key=settings.api_keys[0] if settings.api_keys else None
        )
        self._tasks: list[asyncio.Task[Any]] = []
        self.started = False

    def _client_id(self, url: str) -> str:
        """Stable per (database, backend), and per instance when the database is shared: ComfyUI
        sends a prompt's messages to one websocket per client id, so instances sharing a backend
        must not share an id, while a restarted instance must get its old one back."""
        key = f"comfyq|{self.store.identity}|{url}"
        if self.link.shared:
            s = self.settings
            key += "|" + (s.instance_name or f"{socket.gethostname()}:{s.api_port or os.getpid()}")
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def start(self) -> None:
        """Take the database lock, migrate, connect to ComfyUI, resume jobs, start workers."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open(exclusive=True)
        try:
            # Before the workers start: a job admitted elsewhere must wake them from the first one.
            await self.cluster.start()
            if "generate" in self.roles:
                # Only a generate instance runs and talks to ComfyUI (and logs BACKENDS_READY).
                for sup in self.supervisors:
                    await sup.start()
                for be in self.pool.backends:
                    be.client.on_preview = self.generate.on_preview
                await self.pool.start()
            await self.pipeline.start()
            if "webhooks" in self.roles:
                await self.webhooks.start()
        except BaseException:
            await self.pool.close()
            for sup in self.supervisors:
                await sup.stop()
            await self.cluster.stop()
            await self.store.close()
            raise
        self._tasks.append(
            asyncio.create_task(self._every(self.settings.wal_checkpoint_interval, self.checkpoint))
        )
        if self.settings.retention_seconds > 0:
            self._tasks.append(
                asyncio.create_task(self._every(self.settings.prune_interval, self.prune))
            )
        else:  # jobs are kept, but an upload given expires_in still goes when it expires
            self._tasks.append(
                asyncio.create_task(self._every(self.settings.prune_interval, self.prune_uploads))
            )
        self.started = True

    async def stop(self) -> None:
        """Graceful: stop claiming, give work in flight the grace period, the rest resumes later."""
        for t in self._tasks:
            t.cancel()
        await self._step("periodic tasks", asyncio.gather(*self._tasks, return_exceptions=True), 10)
        self._tasks.clear()
        grace = self.settings.shutdown_grace
        await self._step("pipeline", self.pipeline.stop(grace), grace + 30)
        await self._step("webhooks", self.webhooks.stop(grace=min(5.0, grace)), 20)
        await self._step("backends", self.pool.close(), 20)
        for sup in self.supervisors:  # after comfyq's own shutdown: nothing uses ComfyUI any more
            await self._step(f"ComfyUI {sup.label}", sup.stop(), sup.stop_timeout + 10)
        await self._step("downloader", self.downloader.close(), 10)
        if self.models is not None:
            await self._step("model downloads", self.models.close(), 10)
        await self._step("cluster", self.cluster.stop(), 10)
        await self._step("output router", self.outputs.close(), 5)
        # Last and unbounded: the writer finishes every write already asked for, then closes.
        await self.store.close()
        self.started = False

    @staticmethod
    async def _step(name: str, aw: Any, timeout: float) -> None:
        # A stop that hangs is worse than one that cuts a step short: whatever is cut short is
        # left leased in the database and resumes at the next start, like after a crash.
        try:
            async with asyncio.timeout(timeout):
                await aw
        except TimeoutError:
            log.error("shutdown: %s did not stop within %.0fs; going on without it", name, timeout)

    async def _every(self, seconds: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except Exception:
                log.exception("periodic task %s failed", getattr(fn, "__name__", fn))

    async def checkpoint(self) -> None:
        log.debug("%s", await self.store.maintain())

    async def prune(self, older_than: float | None = None) -> int:
        """Delete finished jobs (and their files) older than the retention age."""
        age = self.settings.retention_seconds if older_than is None else older_than
        n = await prune_jobs(self.store, self.output_dir, age)
        await self.prune_uploads()
        # Cached inputs are referenced by waiting jobs: keep them at least twice the job deadline.
        await self.downloader.prune(max(age, 2 * self.settings.job_timeout))
        return n

    async def prune_uploads(self) -> None:
        """Comfy API v2 uploads past their expires_at, and the blob files no asset uses."""
        await prune_assets(self.asset_resolver.assets, Path(self.settings.assets_dir).absolute())


def _link_for(database: str, owner: str) -> ClusterLink:
    """The store's link to other instances: Postgres is shared, a SQLite file is not."""
    if database.startswith(("postgresql://", "postgres://")):
        from comfyq.cluster.pg import PgLink

        return PgLink(database, app_name=owner)
    return LocalLink()


async def prune_jobs(store: JobStore, output_dir: Path, older_than: float) -> int:
    total = 0
    while True:
        ids = await store.prune(older_than)
        for job_id in ids:
            try:
                folder = job_dir(output_dir, job_id)
            except OutputError:  # an id that cannot name a folder has none to remove
                continue
            await asyncio.to_thread(shutil.rmtree, folder, True)
        total += len(ids)
        if len(ids) < 500:
            break
    if total:
        log.info("pruned %d finished job(s) older than %.0fs", total, older_than)
    return total


def _warmup(settings: Settings) -> Warmup | None:
    if not settings.comfyui_warmup_workflow:
        return None
    try:
        workflow = load_workflow(settings.comfyui_warmup_workflow)
    except WarmupFileError as exc:
        raise ConfigError(f"COMFYUI_WARMUP_WORKFLOW: {exc}") from None
    return Warmup(workflow, settings.comfyui_warmup_timeout)


def _supervisors(settings: Settings, urls: list[str]) -> list[Supervisor]:
    """One supervised ComfyUI per loopback backend when COMFYUI_COMMAND is set."""
    if not settings.comfyui_command.strip() or settings.simulate:
        return []
    local = [u for u in urls if URL(u).host in ("127.0.0.1", "localhost", "::1")]
    if not local:
        log.warning("COMFYUI_COMMAND is set but no backend is on this host: nothing supervised")
        return []
    if len(local) > 1 and "{port}" not in settings.comfyui_command:
        raise ConfigError(
            "COMFYUI_COMMAND must contain {port} to start one ComfyUI per local backend"
            f" ({', '.join(local)})"
        )
    return [
        Supervisor(
            url,
            command_for(settings.comfyui_command, url),
            workdir=settings.comfyui_workdir or None,
            restart_delay=settings.comfyui_restart_delay,
            restart_max_delay=settings.comfyui_restart_max_delay,
            stop_timeout=settings.comfyui_stop_timeout,
        )
        for url in local
    ]


async def prune_assets(assets: AssetStore, root: Path) -> None:
    """Remove Comfy API v2 assets past their expires_at, and the blob files left unused."""
    for path in await assets.prune_assets():
        p = Path(path)
        if p.parent.parent == root:  # only ever a blob file of ours
            await asyncio.to_thread(p.unlink, True)
