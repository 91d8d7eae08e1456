"""One error root for comfyq.

Every error knows the ``type`` string it shows to clients (``error.type`` in a Result or an HTTP
error body), the HTTP status it maps to when raised by a request handler, and whether a stage that
hit it may retry the job.
"""

from __future__ import annotations

from typing import Any


class ComfyqError(Exception):
    """Base of every error comfyq raises on purpose."""

    type: str = "internal_error"
    http_status: int = 500
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        node_id: str | None = None,
        node_type: str | None = None,
        fields: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.node_id = node_id
        self.node_type = node_type
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of a Result or of an HTTP error body."""
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.node_id is not None:
            out["node_id"] = self.node_id
        if self.node_type is not None:
            out["node_type"] = self.node_type
        if self.details:
            out["details"] = self.details
        if self.fields is not None:
            out["fields"] = self.fields
        return out


# --- request errors (raised by HTTP handlers) -------------------------------------------------


class BadRequest(ComfyqError):
    type = "invalid_request"
    http_status = 400


class Unauthorized(ComfyqError):
    type = "unauthorized"
    http_status = 401


class Forbidden(ComfyqError):
    type = "forbidden"
    http_status = 403


class NotFound(ComfyqError):
    type = "not_found"
    http_status = 404


class MethodNotAllowed(ComfyqError):
    type = "method_not_allowed"
    http_status = 405


class RequestTimeout(ComfyqError):
    """The client did not send its request body in time (``http_body_timeout``)."""

    type = "request_timeout"
    http_status = 408


class Conflict(ComfyqError):
    type = "conflict"
    http_status = 409


class PayloadTooLarge(ComfyqError):
    type = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(ComfyqError):
    type = "unsupported_media_type"
    http_status = 415


class QueueFull(ComfyqError):
    type = "queue_full"
    http_status = 503


# --- job errors (raised inside stages; end up in a Result's ``error``) ----------------------


class JobError(ComfyqError):
    """An error that fails (or, if retryable, retries) one job and nothing else."""

    type = "job_error"
    http_status = 500


class ValidationError(JobError):
    """ComfyUI rejected the workflow (HTTP 400 from ``POST /prompt``)."""

    type = "validation_error"
    http_status = 400


class NodeError(JobError):
    """A node raised while ComfyUI executed the prompt (``execution_error``)."""

    type = "node_error"
    http_status = 500


class ComfyUIUnreachable(JobError):
    """ComfyUI did not answer, answered 5xx, or lost the prompt; worth another attempt."""

    type = "comfyui_unreachable"
    http_status = 502
    retryable = True


class PromptLost(ComfyUIUnreachable):
    """The prompt is in neither ComfyUI's queue nor its history (ComfyUI restarted)."""

    type = "prompt_lost"


class Interrupted(JobError):
    """ComfyUI interrupted the prompt although comfyq did not ask it to."""

    type = "interrupted"
    http_status = 502
    retryable = True


class JobTimeout(JobError):
    type = "timeout"
    http_status = 500


class Cancelled(JobError):
    type = "cancelled"
    http_status = 499


class InputError(JobError):
    """An input (URL, base64 image) could not be fetched, decoded or accepted."""

    type = "input_error"
    http_status = 400


class ModifierError(JobError):
    """A workflow modifier raised or was misused."""

    type = "modifier_error"
    http_status = 500


class OutputError(JobError):
    """Outputs could not be collected, stored or uploaded."""

    type = "output_error"
    http_status = 500


class LeaseLost(JobError):
    """Another worker or the reaper took the job; this worker must stop touching it."""

    type = "lease_lost"


class IllegalTransition(ComfyqError):
    """A state change that the job state machine does not allow."""

    type = "illegal_transition"
    http_status = 409
