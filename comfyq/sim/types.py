"""Value types of the ComfyUI simulator: graph values, node specs, the per-node run context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Records of what flows along the graph's links. Only the metadata matters (size, batch, colour):
# every simulated image is one solid colour, which is enough to write real PNG files.


@dataclass(frozen=True)
class SimImage:
    """An IMAGE batch: `batch` solid-colour pictures of width x height."""

    width: int
    height: int
    batch: int
    rgb: tuple[int, int, int]

    def __str__(self) -> str:
        return f"SimImage(shape=[{self.batch}, {self.height}, {self.width}, 3], rgb={self.rgb})"


@dataclass(frozen=True)
class SimMask:
    """A MASK batch."""

    width: int
    height: int
    batch: int

    def __str__(self) -> str:
        return f"SimMask(shape=[{self.batch}, {self.height}, {self.width}])"


@dataclass(frozen=True)
class SimLatent:
    """A LATENT batch; width/height are in pixels."""

    width: int
    height: int
    batch: int
    rgb: tuple[int, int, int]

    def __str__(self) -> str:
        return f"SimLatent(shape=[{self.batch}, 4, {self.height // 8}, {self.width // 8}])"


@dataclass(frozen=True)
class SimModelPart:
    """MODEL, CLIP or VAE loaded from a (pretend) checkpoint."""

    kind: str
    ckpt: str

    def __str__(self) -> str:
        return f"<{self.kind} {self.ckpt}>"


@dataclass(frozen=True)
class SimConditioning:
    """CONDITIONING produced by CLIPTextEncode."""

    text: str

    def __str__(self) -> str:
        return f"<CONDITIONING {self.text[:40]!r}>"


class NodeFailure(Exception):
    """A node raised at run time; carries the exception type name ComfyUI would report."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


class RunContext(Protocol):
    """What a running node may do: report progress, send a TEXT frame, spend time, save files."""

    node_id: str
    prompt_id: str
    duration: float
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    env: Any

    async def tick(
        self, value: float, maximum: float, preview_png: bytes | None = None
    ) -> None: ...

    async def text(self, text: str) -> None: ...

    async def sleep(self, seconds: float) -> None: ...


RunResult = tuple[tuple[Any, ...], dict[str, Any] | None]
RunFn = Callable[[RunContext, dict[str, Any]], Awaitable[RunResult]]
InputSpec = tuple[Any, ...]


@dataclass
class NodeSpec:
    """One simulated node class: its /object_info description plus how it runs."""

    name: str
    required: dict[str, InputSpec]
    outputs: tuple[str, ...]
    run: RunFn
    optional: dict[str, InputSpec] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    category: str = "image"
    display_name: str | None = ""  # "" means: same as name
    description: str = ""
    python_module: str = "nodes"
    output_tooltips: tuple[str | None, ...] | None = None
    v3: bool = False  # newer-style nodes list a few extra keys in /object_info
    custom_validate: tuple[str, ...] = ()  # inputs checked by the node's own validator
    is_changed: Callable[[Any, dict[str, Any]], Any] | None = None
    slow: bool = False  # emits `progress_steps` ticks when the simulator is asked to
    own_progress: bool = False  # spends its duration and reports progress itself

    @property
    def unique_id_in_signature(self) -> bool:
        """ComfyUI adds the node id to the cache key of nodes that take UNIQUE_ID."""
        return "UNIQUE_ID" in self.hidden.values()
