"""Prometheus metrics (text format at ``GET /metrics``).

Durations are observed from committed transitions as they happen (claim -> leave gives a stage's
run time; entering pending -> claim gives its wait). Levels (jobs by state, queue depths, workers,
backends, the webhook outbox) are read when scraped, so they include work done by other processes
(the CLI) and survive restarts. Each server has its own registry, so tests can run several.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from comfyq.clock import parse_iso
from comfyq.store.model import STAGES, TERMINAL, State, Transition

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BOUNDS = (*(float(b) for b in _HTTP_BUCKETS), float("inf"))


class _Http(Collector):
    """The request counter and duration histogram, counted in plain ints on the loop thread and
    turned into the two metric families when scraped (the same series as a prometheus_client
    Counter and Histogram with these labels, without a lock and three method calls per
    request)."""

    _LE = (*(floatToGoString(b) for b in _HTTP_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}  # (route, method, status) -> count
        # (route, method) -> per-bucket counts (not cumulative; the last is +Inf), then the sum
        self.durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "comfyq_http_requests",
            "HTTP requests by route and status",
            labels=["route", "method", "status"],
        )
        for labels, n in list(self.requests.items()):
            c.add_metric(labels, n)
        yield c
        h = HistogramMetricFamily(
            "comfyq_http_request_duration_seconds",
            "HTTP request handling time",
            labels=["route", "method"],
        )
        for key, (counts, total) in list(self.durations.items()):
            acc = 0
            buckets = []
            for le, n in zip(self._LE, counts, strict=True):
                acc += n
                buckets.append((le, float(acc)))
            h.add_metric(key, buckets, total[0])
        yield h


class _Levels(Collector):
    """Gauges filled from the last ``Metrics.refresh`` (scrape time)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        lv = self.m.levels
        g = GaugeMetricFamily("comfyq_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(lv.get("jobs", {}).items()):
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "comfyq_queue_depth", "Unfinished jobs per stage", labels=["stage", "state"]
        )
        for stage, c in lv.get("queues", {}).items():
            g.add_metric([stage, "waiting"], c["waiting"])
            g.add_metric([stage, "running"], c["running"])
        yield g
        alive = GaugeMetricFamily(
            "comfyq_stage_workers_alive", "Live workers per stage", labels=["stage"]
        )
        busy = GaugeMetricFamily(
            "comfyq_stage_workers_busy", "Workers running a job", labels=["stage"]
        )
        size = GaugeMetricFamily(
            "comfyq_stage_workers", "Configured workers per stage", labels=["stage"]
        )
        crashes = CounterMetricFamily(
            "comfyq_stage_worker_crashes", "Worker crashes (restarted)", labels=["stage"]
        )
        for stage, h in lv.get("stages", {}).items():
            alive.add_metric([stage], h["alive"])
            busy.add_metric([stage], h["busy"])
            size.add_metric([stage], h["workers"])
            crashes.add_metric([stage], h["crashes"])
        yield from (alive, busy, size, crashes)
        up = GaugeMetricFamily(
            "comfyq_backend_up", "ComfyUI backend answers HTTP and websocket", labels=["backend"]
        )
        http = GaugeMetricFamily(
            "comfyq_backend_http_ok", "ComfyUI backend answers HTTP", labels=["backend"]
        )
        ws = GaugeMetricFamily(
            "comfyq_backend_websocket_ok", "ComfyUI backend websocket is up", labels=["backend"]
        )
        inflight = GaugeMetricFamily(
            "comfyq_backend_in_flight", "Prompts running on the backend", labels=["backend"]
        )
        for b in lv.get("backends", []):
            up.add_metric([b["url"]], float(bool(b["healthy"])))
            http.add_metric([b["url"]], float(bool(b.get("http_ok"))))
            ws.add_metric([b["url"]], float(bool(b.get("websocket_ok"))))
            inflight.add_metric([b["url"]], b.get("in_flight") or 0)
        warm = GaugeMetricFamily(
            "comfyq_backend_warm",
            "The backend's warm-up has run since its last (re)start (1 without a warm-up)",
            labels=["backend"],
        )
        restarts = CounterMetricFamily(
            "comfyq_comfyui_restarts",
            "Restarts of the ComfyUI child comfyq supervises (COMFYUI_COMMAND)",
            labels=["backend"],
        )
        running = GaugeMetricFamily(
            "comfyq_comfyui_process_running",
            "The supervised ComfyUI child is running",
            labels=["backend"],
        )
        for b in lv.get("backends", []):
            warm.add_metric([b["url"]], float(bool(b.get("warm", True))))
            proc = b.get("process")
            if proc:
                restarts.add_metric([b["url"]], proc.get("restarts") or 0)
                running.add_metric([b["url"]], float(proc.get("state") == "running"))
        yield from (up, http, ws, inflight, warm, restarts, running)
        models = lv.get("models")
        if models:
            yield GaugeMetricFamily(
                "comfyq_model_cache_bytes",
                "Bytes of the models comfyq downloaded into COMFYUI_MODELS_DIR (input.models)",
                value=models["bytes"],
            )
            yield GaugeMetricFamily(
                "comfyq_model_cache_budget_bytes",
                "COMFYQ_MODEL_CACHE_GB in bytes",
                value=models["budget"],
            )
            yield CounterMetricFamily(
                "comfyq_model_downloads",
                "Models downloaded (shared downloads count once)",
                value=models["downloads"],
            )
            yield CounterMetricFamily(
                "comfyq_model_evictions",
                "Downloaded models deleted to stay in the budget",
                value=models["evictions"],
            )
        g = GaugeMetricFamily(
            "comfyq_webhook_deliveries",
            "Webhook deliveries in the outbox by state",
            labels=["state"],
        )
        for state, n in sorted(lv.get("webhook_deliveries", {}).items()):
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "comfyq_webhook_attempts",
            "Recorded webhook delivery attempts by outcome",
            labels=["outcome"],
        )
        for outcome, n in sorted(lv.get("webhook_attempts", {}).items()):
            g.add_metric([outcome], n)
        yield g
        yield GaugeMetricFamily(
            "comfyq_event_subscribers",
            "Open event subscriptions (SSE, websocket, sync)",
            value=lv.get("subscribers", 0),
        )
        yield CounterMetricFamily(
            "comfyq_events_published", "Events published on the bus", value=lv.get("published", 0)
        )
        inst = GaugeMetricFamily(
            "comfyq_instance_up",
            "Instances registered on the store: 1 alive (heard within three heartbeats), 0 not",
            labels=["instance", "name", "roles"],
        )
        heard = GaugeMetricFamily(
            "comfyq_instance_heartbeat_age_seconds",
            "Seconds since each registered instance's last heartbeat",
            labels=["instance", "name"],
        )
        for i in lv.get("instances", []):
            inst.add_metric([i["id"], i["name"], ",".join(i["roles"])], float(bool(i["alive"])))
            heard.add_metric([i["id"], i["name"]], i["heartbeat_age"])
        yield from (inst, heard)
        link = lv.get("cluster", {})
        yield CounterMetricFamily(
            "comfyq_cluster_events_received",
            "State changes of other instances received through the store",
            value=link.get("received_events", 0),
        )
        yield CounterMetricFamily(
            "comfyq_cluster_live_received",
            "Live events (progress, text) of other instances received",
            value=link.get("received_live", 0),
        )
        yield CounterMetricFamily(
            "comfyq_cluster_listener_reconnects",
            "Times the LISTEN connection was lost and made again (open streams then read the"
            " event rows they may have missed)",
            value=link.get("reconnects", 0),
        )


class Metrics:
    """The server's metrics: counters and histograms updated live, levels read at scrape time."""

    def __init__(self, services: Any) -> None:
        self.services = services
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise here
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._http = _Http()
        r.register(self._http)
        self.stage_duration = Histogram(
            "comfyq_stage_duration_seconds",
            "Run time of one stage of one job",
            ["stage", "outcome"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.stage_wait = Histogram(
            "comfyq_stage_wait_seconds",
            "Time a job waited for a stage worker",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "comfyq_job_duration_seconds",
            "Accepted to finished, per final state",
            ["state"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.jobs_finished = Counter(
            "comfyq_jobs_finished", "Jobs that reached a final state", ["state"], registry=r
        )
        self.jobs_created = Counter("comfyq_jobs_created", "Jobs admitted", registry=r)
        self.levels: dict[str, Any] = {}
        self._http_keys: dict[tuple[str, str, int], tuple[tuple[str, str, str], Any]] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        r.register(_Levels(self))
        self._running: dict[str, tuple[str, float]] = {}  # job id -> (stage, claimed at)
        self._waiting: dict[str, tuple[str, float]] = {}  # job id -> (stage, pending since)
        for stage in STAGES:  # every series exists from the start, at zero
            self.stage_wait.labels(stage)
        services.store.listen(self.on_transitions)

    def on_transitions(self, trs: list[Transition]) -> None:
        """Store listener: observe stage run and wait times, count finished jobs."""
        last_iso, last_at = "", 0.0
        created = 0
        for tr in trs:
            if tr.at != last_iso:  # a commit's transitions share their time: parsed once
                last_iso, last_at = tr.at, parse_iso(tr.at)
            at = last_at
            if tr.from_state is None:
                created += 1
            ran = self._running.pop(tr.job_id, None)
            if ran is not None and tr.from_state == State.RUNNING:
                stage, since = ran
                if tr.to_state == State.PENDING:
                    outcome = "retried" if tr.stage == stage else "ok"
                else:
                    outcome = "ok" if tr.to_state == State.COMPLETED else tr.to_state
                self._child(self.stage_duration, stage, outcome).observe(max(0.0, at - since))
            waited = self._waiting.pop(tr.job_id, None)
            if tr.to_state == State.RUNNING:
                self._running[tr.job_id] = (tr.stage, at)
                if waited is not None:
                    self._child(self.stage_wait, waited[0]).observe(max(0.0, at - waited[1]))
            elif tr.to_state == State.PENDING:
                self._waiting[tr.job_id] = (tr.stage, at)
            elif tr.to_state in TERMINAL:
                self._child(self.jobs_finished, tr.to_state).inc()
                total = ((tr.job.timings if tr.job else None) or {}).get("total_ms")
                if isinstance(total, int | float):
                    self._child(self.job_duration, tr.to_state).observe(total / 1000.0)
        if created:
            self.jobs_created.inc(created)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (labels() takes a lock and builds its key each time;
        the stage and state labels are a handful)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request (its route pattern, method, status and duration)."""
        if method not in _METHODS:
            method = "other"  # methods are client-chosen: keep the label set bounded
        key = (route, method, status)
        known = self._http_keys.get(key)
        if known is None:
            cell = self._http.durations.get((route, method))
            if cell is None:
                cell = self._http.durations[(route, method)] = ([0] * (len(_BOUNDS)), [0.0])
            known = self._http_keys[key] = ((route, method, str(status)), cell)
            self._http.requests[known[0]] = 0
        labels, (counts, total) = known
        requests = self._http.requests
        requests[labels] += 1
        counts[bisect_left(_BOUNDS, seconds)] += 1  # the first bucket whose bound >= seconds
        total[0] += seconds

    async def refresh(self) -> None:
        """Read the levels (jobs by state, queues, workers, backends) for the next scrape."""
        svc = self.services
        stats = await svc.store.stats()
        self.levels = {
            "jobs": stats.jobs,
            "webhook_deliveries": stats.webhook_deliveries,
            "webhook_attempts": stats.webhook_attempts,
            "queues": await svc.store.counts(),
            "stages": svc.pipeline.health(),
            "backends": svc.pool.snapshot(),
            "models": svc.models.stats() if getattr(svc, "models", None) is not None else None,
            "subscribers": svc.bus.subscribers(),
            "published": svc.bus.published,
            "instances": await _instances(svc),
            "cluster": svc.cluster.health(),
            "at": time.time(),
        }

    async def render(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)


async def _instances(svc: Any) -> list[dict[str, Any]]:
    try:
        return list(await svc.cluster.instances())
    except Exception:  # noqa: BLE001 - a scrape must not fail because the registry is away
        return []
