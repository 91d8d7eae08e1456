"""What the registry knows about one instance."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Instance:
    """One comfyq instance as the registry shows it (``comfyq instances``, /health, /metrics)."""

    id: str  # the lease owner it writes on jobs it claims
    name: str
    url: str = ""  # where the other instances reach its API
    roles: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    host: str = ""
    pid: int = 0
    version: str = ""
    started_at: float = 0.0  # epoch seconds
    heartbeat_at: float = 0.0
    stopped_at: float | None = None
    heartbeat_age: float = 0.0  # seconds since its last heartbeat, by the database's clock

    def alive(self, heartbeat: float) -> bool:
        """Running: not stopped, and heard from within three heartbeats."""
        return self.stopped_at is None and self.heartbeat_age <= 3 * heartbeat

    def as_dict(self, heartbeat: float) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "roles": self.roles,
            "backends": self.backends,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started_at": self.started_at,
            "heartbeat_age": round(self.heartbeat_age, 3),
            "alive": self.alive(heartbeat),
            "stopped": self.stopped_at is not None,
        }
