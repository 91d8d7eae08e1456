"""Settings: one typed object, read from ``comfyq.toml``, then environment variables, then flags.

Nothing else in comfyq reads ``os.environ``. Every field documents itself (``description``); the
README's settings table is generated from this type and a test checks that none is undocumented.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

MiB = 1024 * 1024


def _d(text: str, **kw: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **kw)


PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
Role = Literal["all", "api", "preprocess", "generate", "postprocess", "webhooks"]
ROLES = ("api", "preprocess", "generate", "postprocess", "webhooks")


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every setting comfyq has. Field name = key in comfyq.toml."""

    # --- ComfyUI -----------------------------------------------------------------------------
    comfyui_api_base: Annotated[
        str, _d("ComfyUI base URL, used when comfyui_backends is empty")
    ] = "http://127.0.0.1:8188"
    comfyui_backends: Annotated[
        list[str],
        _d("ComfyUI base URLs (comma separated in the environment); overrides comfyui_api_base"),
    ] = msgspec.field(default_factory=list)
    backends_ready_timeout: Annotated[
        float, _d("seconds to wait for every backend before logging BACKENDS_READY_TIMEOUT", gt=0)
    ] = 600.0
    backend_probe_interval: Annotated[float, _d("seconds between backend health probes", gt=0)] = (
        5.0
    )
    comfyui_request_timeout: Annotated[float, _d("seconds for one HTTP call to ComfyUI", gt=0)] = (
        30.0
    )
    comfyui_ws_quiet_timeout: Annotated[
        float,
        _d(
            "seconds of websocket silence before a running prompt is checked through"
            " /history and /queue",
            gt=0,
        ),
    ] = 30.0
    backend_failover_after: Annotated[
        float,
        _d(
            "seconds a job waits for its (unreachable) backend before it is resubmitted elsewhere",
            gt=0,
        ),
    ] = 120.0
    comfyui_command: Annotated[
        str,
        _d(
            "start and supervise the local ComfyUI: its command line, e.g. 'python main.py --listen"
            " 127.0.0.1 --port {port}' ({port}: each loopback backend's port; several processes of"
            " one ComfyUI >= 0.38 install need their own --database-url or --disable-assets);"
            " empty: ComfyUI is started by someone else"
        ),
    ] = ""
    comfyui_workdir: Annotated[str, _d("working directory of the supervised ComfyUI")] = ""
    comfyui_restart_delay: Annotated[
        float, _d("seconds before a supervised ComfyUI that died is started again (doubles)", gt=0)
    ] = 1.0
    comfyui_restart_max_delay: Annotated[
        float, _d("cap on the supervised ComfyUI's restart delay in seconds", gt=0)
    ] = 60.0
    comfyui_stop_timeout: Annotated[
        float, _d("seconds the supervised ComfyUI gets after SIGTERM before SIGKILL", gt=0)
    ] = 20.0
    comfyui_warmup_workflow: Annotated[
        str,
        _d(
            "API-format workflow file run on each backend after every (re)start, before it takes"
            " jobs (empty: none)"
        ),
    ] = ""
    comfyui_warmup_timeout: Annotated[float, _d("seconds one warm-up run may take", gt=0)] = 600.0
    simulate: Annotated[
        bool, _d("run against the built-in ComfyUI simulator instead of a real ComfyUI")
    ] = False
    simulate_node_duration: Annotated[
        float,
        _d("with simulate: seconds each simulated node takes (slow ones tick progress)", ge=0),
    ] = 0.2
    simulate_progress_steps: Annotated[
        int, _d("with simulate: progress ticks of each slow simulated node", ge=0, le=1000)
    ] = 5

    # --- HTTP API ----------------------------------------------------------------------------
    api_host: Annotated[str, _d("address the API listens on")] = "127.0.0.1"
    api_port: Annotated[int, _d("port the API listens on", ge=0, le=65535)] = 8000
    api_log_level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"], _d("log level")
    ] = "info"
    log_format: Annotated[Literal["text", "json"], _d("log line format")] = "text"
    sse_coalesce_ms: Annotated[
        int,
        _d(
            "milliseconds an SSE event other than the final one may wait to leave with the next"
            " ones (fewer sends and wake-ups per job); 0 sends every event at once",
            ge=0,
            le=1000,
        ),
    ] = 20
    api_keys: Annotated[
        list[str],
        _d(
            "bearer keys (comma separated), each KEY or ROLE:KEY with ROLE admin or client (no "
            "role:"
            " admin); empty, with no api_keys_file, means no authentication",
            extra={"secret": True},
        ),
    ] = msgspec.field(default_factory=list)
    api_keys_file: Annotated[
        str,
        _d("file of more API keys, one KEY or ROLE:KEY per line (# comments); re-read on SIGHUP"),
    ] = ""
    cors_origins: Annotated[
        list[str], _d("origins allowed by CORS (comma separated; * for any)")
    ] = msgspec.field(default_factory=list)
    max_body_bytes: Annotated[
        int, _d("largest accepted request body in bytes (file uploads, multipart)", ge=1024)
    ] = 64 * MiB
    max_json_bytes: Annotated[
        int,
        _d("largest JSON request body in bytes (413 beyond; uploads use max_body_bytes)", ge=1024),
    ] = 16 * MiB
    max_json_items: Annotated[
        int,
        _d(
            "most values (keys and elements) a JSON request body may hold (413 beyond): bounds"
            " the time one body holds the server",
            ge=100,
        ),
    ] = 100_000
    max_workflow_nodes: Annotated[int, _d("most nodes a workflow may have (400 beyond)", ge=1)] = (
        5_000
    )
    http_header_timeout: Annotated[
        float, _d("seconds a client has to send a request's headers once it starts", gt=0)
    ] = 10.0
    http_body_timeout: Annotated[
        float, _d("seconds a client has to send a request's body once its headers are in", gt=0)
    ] = 60.0
    http_keepalive_timeout: Annotated[
        float, _d("seconds an idle keep-alive connection stays open", gt=0)
    ] = 75.0
    # 10,000, from bench/bench_queue_depth.py: up to there admission, /result (position and ETA)
    # and /queue-info stay within a few ms p50 and the server under ~80 MB; at 50,000 waiting
    # jobs /queue-info and the streams' shared ranking cost tens of ms each. The original
    # wrapper's 100 was a cap on in-memory queues; this queue is a database.
    max_queue_size: Annotated[
        PosInt, _d("jobs not yet finished (all stages) beyond which new jobs get 503")
    ] = 10000

    # --- pipeline ----------------------------------------------------------------------------
    preprocess_workers: Annotated[PosInt, _d("concurrent preprocess workers")] = 3
    generation_workers: Annotated[PosInt, _d("prompts in flight per ComfyUI backend")] = 2
    postprocess_workers: Annotated[PosInt, _d("concurrent postprocess workers")] = 3
    job_timeout: Annotated[
        PosFloat, _d("default per-job deadline in seconds (input.timeout overrides)")
    ] = 3600.0
    max_attempts: Annotated[PosInt, _d("tries per job before a retryable error fails it")] = 3
    retry_base_delay: Annotated[
        PosFloat, _d("first retry delay in seconds (doubles per attempt, with jitter)")
    ] = 2.0
    retry_max_delay: Annotated[PosFloat, _d("cap on the retry delay in seconds")] = 60.0
    lease_seconds: Annotated[PosFloat, _d("lease of a claimed job; renewed while it runs")] = 30.0
    claim_poll_interval: Annotated[
        PosFloat,
        _d(
            "seconds between looks for work written by another process (new work in this one wakes"
            " workers at once)"
        ),
    ] = 2.0
    shutdown_grace: Annotated[
        float, _d("seconds in-flight work gets on SIGTERM before it is left to resume", ge=0)
    ] = 20.0

    # --- several instances -------------------------------------------------------------------
    roles: Annotated[
        list[Role],
        _d(
            "what this instance runs (comma separated): api, preprocess, generate, postprocess,"
            " webhooks, or all"
        ),
    ] = msgspec.field(default_factory=lambda: ["all"])
    instance_name: Annotated[
        str,
        _d("this instance's name in the registry (empty: host name and API port)"),
    ] = ""
    advertise_url: Annotated[
        str,
        _d(
            "base URL other instances reach this one's API at, to fetch the output files it holds"
            " (empty: http://<host name or api_host>:<port>)"
        ),
    ] = ""
    instance_heartbeat: Annotated[
        PosFloat, _d("seconds between an instance's heartbeats in the registry")
    ] = 5.0
    database_pool_size: Annotated[
        int,
        _d(
            "most PostgreSQL connections this instance opens (0: one per worker its roles run,"
            " plus 8 for the API, webhooks and upkeep); SQLite ignores it",
            ge=0,
        ),
    ] = 0

    # --- storage -----------------------------------------------------------------------------
    database: Annotated[
        str, _d("the SQLite file, or a postgresql:// URL: queue, jobs, events, outbox")
    ] = "data/comfyq.db"
    output_dir: Annotated[str, _d("where output files are kept, one folder per job")] = (
        "data/outputs"
    )
    cache_dir: Annotated[str, _d("content-hash cache of downloaded inputs")] = "data/cache"
    assets_dir: Annotated[str, _d("Comfy API v2 uploads, one file per blake3 hash")] = "data/assets"
    asset_max_bytes: Annotated[
        int, _d("largest Comfy API v2 asset upload in bytes (413 beyond)", ge=1)
    ] = 512 * MiB
    v2_streams_per_key: Annotated[
        PosInt, _d("open Comfy API v2 event streams per API key (429 too_many_streams beyond)")
    ] = 1000
    retention_seconds: Annotated[
        float, _d("finished jobs and their files older than this are pruned (0 keeps them)", ge=0)
    ] = 7 * 24 * 3600.0
    prune_interval: Annotated[PosFloat, _d("seconds between automatic prune runs")] = 3600.0
    wal_checkpoint_interval: Annotated[PosFloat, _d("seconds between WAL checkpoints")] = 60.0

    # --- inputs ------------------------------------------------------------------------------
    url_allowlist: Annotated[
        list[str],
        _d("hosts or CIDRs downloads and webhooks may reach although private or loopback"),
    ] = msgspec.field(default_factory=list)
    modifiers_dir: Annotated[
        str, _d("extra folder searched for user modifiers (empty: ./modifiers when present)")
    ] = ""
    download_max_bytes: Annotated[int, _d("largest input download in bytes", ge=1)] = 512 * MiB
    comfyui_models_dir: Annotated[
        str,
        _d(
            "the local ComfyUI's models folder, where input.models downloads go (empty: models"
            " by URL are refused)"
        ),
    ] = ""
    model_cache_gb: Annotated[
        float,
        _d(
            "budget in GB for models comfyq downloaded; beyond it the least recently used are"
            " deleted (never files comfyq did not download)",
            ge=0,
        ),
    ] = 50.0
    model_max_bytes: Annotated[int, _d("largest model download in bytes", ge=1)] = 64 * 1024 * MiB
    model_download_timeout: Annotated[PosFloat, _d("total seconds for one model download")] = 3600.0
    download_timeout: Annotated[PosFloat, _d("total seconds for one input download")] = 600.0

    # --- outputs, S3, webhooks ---------------------------------------------------------------
    output_base64_max_bytes: Annotated[int, _d("largest output inlined as base64", ge=0)] = 10 * MiB
    output_convert_format: Annotated[
        Literal["", "png", "jpeg", "webp"],
        _d(
            "convert image outputs to this format by default (empty: keep them; input.convert wins)"
        ),
    ] = ""
    output_convert_quality: Annotated[
        int, _d("default JPEG/WebP quality of converted outputs", ge=1, le=100)
    ] = 90
    output_convert_max_side: Annotated[
        int, _d("default longest side of converted outputs in pixels (0: keep the size)", ge=0)
    ] = 0
    include_comfyui_response: Annotated[
        bool,
        _d(
            "Results carry ComfyUI's history body (comfyui_response) unless a request's header "
            "says no"
        ),
    ] = False
    s3_access_key_id: Annotated[str, _d("operator S3 access key", extra={"secret": True})] = ""
    s3_secret_access_key: Annotated[str, _d("operator S3 secret key", extra={"secret": True})] = ""
    s3_bucket_name: Annotated[str, _d("operator S3 bucket")] = ""
    s3_endpoint_url: Annotated[str, _d("operator S3 endpoint (empty: AWS)")] = ""
    s3_region: Annotated[str, _d("operator S3 region")] = ""
    s3_prefix: Annotated[str, _d("key prefix for uploaded outputs")] = ""
    s3_presign_expiry: Annotated[PosInt, _d("lifetime of presigned output URLs in seconds")] = (
        7 * 24 * 3600
    )
    s3_fail_job_on_upload_error: Annotated[
        bool, _d("fail the job when an upload fails (else complete with warnings)")
    ] = False
    webhook_url: Annotated[str, _d("default webhook URL for jobs that name none")] = ""
    webhook_secret: Annotated[str, _d("default webhook signing secret", extra={"secret": True})] = (
        ""
    )
    webhook_timeout: Annotated[PosFloat, _d("seconds per webhook attempt")] = 30.0
    webhook_max_attempts: Annotated[
        PosInt, _d("webhook attempts before a delivery is given up")
    ] = 12
    webhook_retry_base_delay: Annotated[
        PosFloat, _d("first webhook retry delay in seconds (doubles per attempt, with jitter)")
    ] = 5.0
    webhook_retry_max_delay: Annotated[
        PosFloat, _d("cap on the webhook retry delay in seconds")
    ] = 3600.0
    webhook_concurrency: Annotated[
        PosInt, _d("webhook posts in flight at once (at most half of them to one host)")
    ] = 16
    webhook_max_age: Annotated[
        PosFloat, _d("seconds after which an undelivered webhook is given up")
    ] = 24 * 3600.0

    @property
    def active_roles(self) -> frozenset[str]:
        """The roles this instance runs ("all" stands for every one of them)."""
        return frozenset(ROLES) if "all" in self.roles or not self.roles else frozenset(self.roles)

    def database_pool(self, backends: int | None = None) -> int:
        """The PostgreSQL pool's size: ``database_pool_size``, or (0) one connection per worker
        this instance's roles run (``backends`` generate backends, default: those configured)
        plus 8 for API requests, the webhook sender and upkeep. A worker holds a connection for
        one statement at a time, so this is the most it can need at once; 16 by default."""
        if self.database_pool_size:
            return self.database_pool_size
        roles = self.active_roles
        n = len(self.backends) if backends is None else backends
        workers = (
            (self.preprocess_workers if "preprocess" in roles else 0)
            + (self.generation_workers * n if "generate" in roles else 0)
            + (self.postprocess_workers if "postprocess" in roles else 0)
        )
        return workers + 8

    @property
    def backends(self) -> list[str]:
        """The ComfyUI base URLs to use, trailing slashes removed, duplicates dropped."""
        raw = self.comfyui_backends or [self.comfyui_api_base]
        out: list[str] = []
        for url in raw:
            url = url.strip().rstrip("/")
            if url and url not in out:
                out.append(url)
        return out


# Environment names that keep the original wrapper's meaning (no COMFYQ_ prefix).
_LEGACY_ENV = {
    "comfyui_api_base": "COMFYUI_API_BASE",
    "comfyui_backends": "COMFYUI_BACKENDS",
    "api_host": "API_HOST",
    "api_port": "API_PORT",
    "api_log_level": "API_LOG_LEVEL",
    "preprocess_workers": "PREPROCESS_WORKERS",
    "generation_workers": "GENERATION_WORKERS",
    "postprocess_workers": "POSTPROCESS_WORKERS",
    "max_queue_size": "MAX_QUEUE_SIZE",
    "s3_access_key_id": "S3_ACCESS_KEY_ID",
    "s3_secret_access_key": "S3_SECRET_ACCESS_KEY",
    "s3_bucket_name": "S3_BUCKET_NAME",
    "s3_endpoint_url": "S3_ENDPOINT_URL",
    "s3_region": "S3_REGION",
    "webhook_url": "WEBHOOK_URL",
    "webhook_secret": "WEBHOOK_SECRET",
    "webhook_timeout": "WEBHOOK_TIMEOUT",
    "output_base64_max_bytes": "OUTPUT_BASE64_MAX_BYTES",
    "include_comfyui_response": "INCLUDE_COMFYUI_RESPONSE",
    "comfyui_command": "COMFYUI_COMMAND",
    "comfyui_workdir": "COMFYUI_WORKDIR",
    "comfyui_warmup_workflow": "COMFYUI_WARMUP_WORKFLOW",
    "comfyui_models_dir": "COMFYUI_MODELS_DIR",
}


class ConfigError(Exception):
    """A settings file, variable or flag that cannot be used; the message names the key."""


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return _LEGACY_ENV.get(field, "COMFYQ_" + field.upper())


def fields() -> list[msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return list(info.fields)


def _is_list(f: msgspec.inspect.Field) -> bool:
    t = f.type
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return isinstance(t, msgspec.inspect.ListType)


def is_secret(f: msgspec.inspect.Field) -> bool:
    t = f.type
    return isinstance(t, msgspec.inspect.Metadata) and bool((t.extra or {}).get("secret"))


def _coerce_text(f: msgspec.inspect.Field, value: str) -> Any:
    if _is_list(f):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def load_settings(
    *,
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective settings: file, then environment, then ``overrides`` (CLI flags)."""
    env = os.environ if env is None else env
    path = Path(config_path or env.get("COMFYQ_CONFIG") or "comfyq.toml")
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    elif config_path:
        raise ConfigError(f"settings file {path} does not exist")
    known = {f.name: f for f in fields()}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    for name, f in known.items():
        var = env_name(name)
        if var in env and env[var] != "":
            data[name] = _coerce_text(f, env[var])
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        data[key] = _coerce_text(known[key], value)
    for name, value in data.items():
        # API_LOG_LEVEL=INFO and friends: choices are lower case, operators often are not.
        if isinstance(value, str) and _is_lowercase_choice(known[name]):
            data[name] = value.lower()
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc))) from exc


def _is_lowercase_choice(f: msgspec.inspect.Field) -> bool:
    t = f.type
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return isinstance(t, msgspec.inspect.LiteralType) and all(
        isinstance(v, str) and v == v.lower() for v in t.values
    )


def _explain(msg: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.api_port`"; name the key and its variable.
    if " - at `$." in msg:
        text, _, where = msg.partition(" - at `$.")
        key = where.rstrip("`").split(".")[0].split("[")[0]
        return f"setting {key!r} (env {env_name(key)}): {text}"
    return msg


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as a plain dict with every secret replaced by ``***``."""
    raw: dict[str, Any] = msgspec.to_builtins(settings)
    for f in fields():
        if is_secret(f) and raw.get(f.name):
            raw[f.name] = ["***"] * len(raw[f.name]) if isinstance(raw[f.name], list) else "***"
    return raw


def describe() -> list[tuple[str, str, str, str]]:
    """(toml key, environment variable, default, description) of every setting."""
    out = []
    defaults = msgspec.to_builtins(Settings())
    for f in fields():
        t = f.type
        desc = (
            (t.extra_json_schema or {}).get("description")
            if isinstance(t, msgspec.inspect.Metadata)
            else None
        )
        default = defaults[f.name]
        shown = (
            ",".join(default)
            if isinstance(default, list)
            else str(default).lower()
            if isinstance(default, bool)
            else str(default)
        )
        out.append((f.name, env_name(f.name), shown, desc or ""))
    return out


def parse_set_flags(items: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings (``--set`` flags) as a dict; a malformed one is a ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out
