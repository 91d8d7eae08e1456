"""The API's types: one set of msgspec structs validates requests, shapes responses and is the
source of the OpenAPI document (``comfyq.api.openapi``).

Field names follow CONTRACT.md exactly; fields the original wrapper accepted keep their meaning.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field


def _d(text: str, **kw: Any) -> Meta:
    return Meta(description=text, **kw)


# 1-128 chars of [A-Za-z0-9._-], not starting with "." (so never "." or ".."); "" = mint one.
# Written without look-arounds so that property-based generators can produce matching strings.
REQUEST_ID_PATTERN = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,127})?$"

RequestId = Annotated[
    str,
    _d(
        "client id of the job (idempotency key): 1-128 of A-Z a-z 0-9 . _ -,"
        " not starting with a dot;"
        " empty or absent: the server makes one",
        pattern=REQUEST_ID_PATTERN,
        max_length=128,
    ),
]
Status = Literal[
    "queued", "processing", "generating", "postprocessing", "completed", "failed", "cancelled"
]


# --- request ---------------------------------------------------------------------------------


class S3Config(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Where to upload outputs; empty fields fall back to the operator's S3 settings."""

    access_key_id: Annotated[str, _d("secret: never stored with the job or shown")] = ""
    secret_access_key: Annotated[str, _d("secret: never stored with the job or shown")] = ""
    endpoint_url: str = ""
    bucket_name: str = ""
    region: str = ""
    connect_timeout: Annotated[int, _d("seconds", ge=1, le=3600)] = 60
    connect_attempts: Annotated[int, Meta(ge=1, le=20)] = 3


class Webhook(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Called once when the job ends (durable outbox, retried)."""

    url: Annotated[str, _d("http(s) URL", max_length=4096)] = ""
    extra_params: Annotated[dict[str, Any], _d("sent back as `extra` in the webhook body")] = field(
        default_factory=dict
    )
    timeout: Annotated[float, _d("seconds per delivery attempt", gt=0, le=300)] | None = None
    secret: Annotated[str, _d("signing secret (Standard Webhooks); never shown")] = ""


class ImageInput(Struct, forbid_unknown_fields=True):
    """An input file for the workflow: refer to it by ``name`` in the workflow."""

    name: Annotated[str, _d("name used in the workflow", min_length=1, max_length=255)]
    image: Annotated[str, _d("base64, a data: URI, or an http(s) URL", min_length=1)]


class WorkflowNode(Struct):
    """One node of a ComfyUI API-format workflow (other keys such as ``_meta`` are kept)."""

    class_type: Annotated[str, Meta(min_length=1)]
    inputs: dict[str, Any] = field(default_factory=dict)


ModelFolder = Literal[
    "checkpoints",
    "loras",
    "vae",
    "text_encoders",
    "clip",
    "clip_vision",
    "controlnet",
    "diffusion_models",
    "unet",
    "embeddings",
    "upscale_models",
    "style_models",
    "gligen",
    "hypernetworks",
    "photomaker",
    "vae_approx",
    "model_patches",
    "audio_encoders",
]


class ModelRef(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A model or LoRA to download into the local ComfyUI's models folder before the job runs."""

    url: Annotated[
        str, _d("http(s) URL of a .safetensors or .gguf file", min_length=1, max_length=4096)
    ]
    folder: Annotated[ModelFolder, _d("ComfyUI's model folder")]
    filename: Annotated[
        str, _d("the file name the workflow uses (default: the URL's last part)", max_length=200)
    ] = ""
    sha256: Annotated[
        str,
        _d(
            "expected sha256 (hex): verified, the download is refused on mismatch",
            pattern=r"^(?:[0-9a-fA-F]{64})?$",
        ),
    ] = ""


class Convert(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Convert image outputs with Pillow before upload, base64 and /outputs."""

    format: Annotated[
        Literal["png", "jpeg", "webp", "original"],
        _d("target format; original: no conversion (overrides the server's default)"),
    ]
    quality: Annotated[int, _d("JPEG/WebP quality", ge=1, le=100)] = 90
    max_side: Annotated[
        int,
        _d("scale down so that the longer side is at most this (0: keep the size)", ge=0, le=65535),
    ] = 0


class Input(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What to run. Exactly one of ``workflow_json`` and ``modifier``."""

    request_id: RequestId = ""
    modifier: Annotated[str, _d("modifier class name", max_length=200)] = ""
    modifications: Annotated[dict[str, Any], _d("values for the modifier")] = field(
        default_factory=dict
    )
    workflow_json: Annotated[dict[str, WorkflowNode], _d("a ComfyUI API-format workflow")] = field(
        default_factory=dict
    )
    images: list[ImageInput] = field(default_factory=list)
    s3: S3Config | None = None
    webhook: Webhook | None = None
    return_outputs_as_base64: Annotated[
        bool, _d("inline output files as base64 (`output[i].data`)")
    ] = False
    models: Annotated[
        list[ModelRef],
        _d(
            "models/LoRAs to fetch into COMFYUI_MODELS_DIR first (name them in the workflow)",
            max_length=20,
        ),
    ] = field(default_factory=list)
    convert: Annotated[
        Convert | None, _d("convert image outputs (default: the server's output_convert_*)")
    ] = None
    include_comfyui_response: Annotated[
        bool,
        _d(
            "put ComfyUI's history body in the Result's comfyui_response (header"
            " X-Include-ComfyUI-Response; default INCLUDE_COMFYUI_RESPONSE)"
        ),
    ] = False
    priority: Annotated[int, _d("higher runs first", ge=-1000, le=1000)] = 0
    timeout: (
        Annotated[float, _d("job deadline in seconds (default: the server's)", gt=0, le=30 * 86400)]
        | None
    ) = None


_EXAMPLES = [
    {"modifier": "ImageEffects", "modifications": {"width": 64, "height": 64, "blur_radius": 2}},
    {
        "workflow_json": {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255},
            },
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": "comfyq"},
            },
        },
        "priority": 0,
    },
]


class GenerateRequest(Struct):
    """The body of every generate endpoint."""

    input: Annotated[Input, Meta(examples=_EXAMPLES)]


# --- responses -------------------------------------------------------------------------------


class FieldError(Struct):
    path: Annotated[str, _d("JSONPath of the field, e.g. $.input.webhook.url")]
    message: str


class ErrorInfo(Struct, omit_defaults=True):
    type: Annotated[
        str,
        _d(
            "node_error, validation_error, comfyui_unreachable, timeout, cancelled,"
            " invalid_request, not_found, ..."
        ),
    ]
    message: str
    node_id: str | None = None
    node_type: str | None = None
    details: dict[str, Any] | None = None
    fields: list[FieldError] | None = None


class ErrorBody(Struct):
    """Every error response has this shape."""

    error: ErrorInfo


class Progress(Struct, omit_defaults=True):
    node: str | None = None
    node_type: str | None = None
    value: float = 0
    max: float = 0
    percent: float = 0.0


class OriginalFile(Struct):
    """An output file before conversion."""

    filename: str
    mimetype: str
    size: int


class OutputFile(Struct, omit_defaults=True, kw_only=True):
    """One output file. The fields CONTRACT.md documents are always present (no default, so never
    omitted: ``"subfolder": ""`` included, as the original wrapper sent it); the rest only when
    set."""

    filename: str
    local_path: Annotated[str | None, _d("the file on the comfyq host")]
    url: Annotated[str, _d("S3 URL when uploaded, else /outputs/{id}/{filename}")]
    type: Annotated[str, _d("ComfyUI's folder type: output or temp")]
    subfolder: Annotated[str, _d("ComfyUI's subfolder (empty string for none)")]
    node_id: str
    output_type: Annotated[str, _d("ComfyUI's output key: images, gifs, video, audio, text, ...")]
    mimetype: str
    size: int
    sha256: str | None = None
    original: Annotated[
        OriginalFile | None,
        _d("the file as ComfyUI made it, when it was converted (input.convert)"),
    ] = None
    data: Annotated[str | None, _d("base64 of the file, only when asked for")] = None
    upload_error: str | None = None
    error: str | None = None


class Timings(Struct):
    queued_ms: int = 0
    preprocess_ms: int = 0
    generation_ms: int = 0
    postprocess_ms: int = 0
    total_ms: Annotated[int | None, _d("set once the job has finished")] = None
    generate_wait_ms: Annotated[int, _d("time waiting for a ComfyUI slot")] = 0
    postprocess_wait_ms: int = 0


class WebhookAttempt(Struct, omit_defaults=True):
    attempt: int
    at: str
    outcome: Annotated[str, _d("delivered, retry or gave_up")]
    duration_ms: int | None = None
    status_code: int | None = None
    error: str | None = None


class WebhookDelivery(Struct, omit_defaults=True):
    """One webhook the job's end queued (the outbox), with every attempt."""

    id: Annotated[str, _d("the webhook-id header, the same on every attempt")]
    event: str
    state: Annotated[str, _d("pending, sending, delivered or failed")]
    attempts: int
    created_at: str
    url: Annotated[str | None, _d("without credentials or query")] = None
    next_attempt_at: str | None = None
    last_status: int | None = None
    last_error: str | None = None
    finished_at: str | None = None
    attempt_log: list[WebhookAttempt] = field(default_factory=list)


class Result(Struct):
    """A job as clients see it, in every state."""

    id: str
    status: Status
    message: str
    created_at: str
    updated_at: str
    attempts: int
    max_attempts: int
    priority: int
    progress: Progress | None = None
    output: list[OutputFile] = field(default_factory=list)
    error: ErrorInfo | None = None
    timings: Timings = field(default_factory=Timings)
    finished_at: str | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)
    webhooks: Annotated[
        list[WebhookDelivery], _d("deliveries of the job's webhook (single-job reads only)")
    ] = field(default_factory=list)
    comfyui_response: Annotated[
        dict[str, Any],
        _d(
            "ComfyUI's /history body for the prompt plus execution_details; {} unless asked for"
            " (X-Include-ComfyUI-Response or INCLUDE_COMFYUI_RESPONSE)"
        ),
    ] = field(default_factory=dict)


class JobList(Struct):
    jobs: list[Result]
    next_cursor: Annotated[
        str | None, _d("pass as ?cursor= for the next page; null on the last")
    ] = None


class QueueInfo(Struct):
    preprocess_queue_size: Annotated[int, _d("jobs waiting for preprocessing")]
    generation_queue_size: Annotated[int, _d("jobs waiting for a ComfyUI slot")]
    postprocess_queue_size: Annotated[int, _d("jobs waiting for post-processing")]
    preprocess_in_flight: int = 0
    generation_in_flight: int = 0
    postprocess_in_flight: int = 0
    unfinished: Annotated[
        int, _d("jobs not yet finished, all stages (compared with max_queue_size)")
    ] = 0
    max_queue_size: int = 0


class QueuePosition(Struct):
    current_queue: Literal["preprocessing", "generation", "postprocessing"]
    position: Annotated[int, _d("1-based among waiting jobs of the stage; 0 while running")]
    queue_size: Annotated[int, _d("jobs waiting in that stage")]
    estimated_wait_time: Annotated[
        float | None,
        _d(
            "seconds until the job is expected to finish, from measured durations of"
            " recent jobs; null until some job has completed"
        ),
    ] = None


class StreamEvent(Struct, omit_defaults=True):
    """One SSE ``data:`` (or websocket text frame)."""

    request_id: str
    status: Annotated[str, _d("a Result status, or final_result for the last event")]
    event: Annotated[
        str, _d("state, progress, queue, execution_start, execution_cached, text, final_result")
    ]
    message: str = ""
    elapsed_time: Annotated[float, _d("seconds since the job was accepted")] = 0.0
    timestamp: str = ""
    id: Annotated[str | None, _d("the SSE id (websocket only)")] = None
    stage: str | None = None
    attempt: int | None = None
    progress: Progress | None = None
    queue_position: QueuePosition | None = None
    queue_info: QueueInfo | None = None
    result: Result | None = None
    data: dict[str, Any] | None = None


class WsSubscribe(Struct, forbid_unknown_fields=True):
    """What a websocket client sends."""

    subscribe: Annotated[list[str] | Literal["*"], _d('job ids, or "*" for every job')]


class StageHealth(Struct):
    workers: int
    alive: int
    busy: int
    crashes: int


class SupervisedProcess(Struct):
    state: Annotated[str, _d("starting, running, backoff (waiting to restart) or stopped")]
    pid: int | None = None
    starts: int = 0
    restarts: int = 0
    last_exit: Annotated[str | None, _d("how the last run ended: exit code N, killed by SIGX")] = (
        None
    )
    reason: Annotated[
        str | None,
        _d("why it is not running: the exit, or ASSETS_STARTUP_FAILED with what to do about it"),
    ] = None
    next_start_in: Annotated[float | None, _d("seconds until the next start (backoff)")] = None


class BackendHealth(Struct, omit_defaults=True):
    url: str
    healthy: bool
    http_ok: bool = False
    websocket_ok: bool = False
    in_flight: int = 0
    slots: int = 0
    last_error: str | None = None
    comfyui_version: Annotated[
        str | None, _d("system.comfyui_version of /system_stats (shown, never acted on)")
    ] = None
    queue_remaining: int | None = None
    capabilities: Annotated[
        list[str] | None,
        _d(
            "what the last probe found: jobs_api, atomic_cancel, assets, node_replacements,"
            " preview_metadata; null until probed (probed again after a backend restart)"
        ),
    ] = None
    capabilities_probed_at: str | None = None
    reachable: Annotated[bool, _d("answers HTTP and websocket (warm or not)")] = False
    warm: Annotated[
        bool, _d("the warm-up workflow has run since the last (re)start (true without one)")
    ] = True
    warmups: Annotated[int, _d("warm-up runs so far")] = 0
    warmup_error: str | None = None
    process: Annotated[
        SupervisedProcess | None, _d("the ComfyUI child comfyq supervises (COMFYUI_COMMAND)")
    ] = None


class Ready(Struct, omit_defaults=True):
    """``GET /ready``: whether this box should get traffic now."""

    ready: bool
    backends_warm: Annotated[str, _d("warm/configured backends")]
    queues: QueueInfo
    reason: str | None = None


class StoreHealth(Struct):
    writable: bool
    path: str
    error: str | None = None


class InstanceHealth(Struct):
    id: Annotated[str, _d("the lease owner it writes on the jobs it claims")]
    name: str
    url: Annotated[str, _d("where the other instances reach its API")]
    roles: list[str]
    backends: list[str]
    host: str
    pid: int
    version: str
    started_at: Annotated[float, _d("epoch seconds")]
    heartbeat_age: Annotated[float, _d("seconds since its last heartbeat")]
    alive: Annotated[bool, _d("not stopped and heard from within three heartbeats")]
    stopped: bool
    self: Annotated[bool, _d("this is the instance that answered")] = False


class Health(Struct, omit_defaults=True):
    status: Literal["healthy", "unhealthy"]
    store: StoreHealth
    stages: dict[str, StageHealth]
    backends_healthy: Annotated[str, _d("healthy/configured")]
    backends: list[BackendHealth]
    queues: QueueInfo | None = None
    reason: str | None = None
    roles: Annotated[list[str] | None, _d("what this instance runs (COMFYQ_ROLES)")] = None
    instances: Annotated[
        list[InstanceHealth] | None, _d("every instance registered on the store")
    ] = None


encoder = msgspec.json.Encoder()
