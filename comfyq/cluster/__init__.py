"""Several comfyq instances on one store: registry, cross-instance events, roles, output routing.

The store adapter decides what travels: SQLite has one instance per file (``LocalLink``);
Postgres carries the registry and LISTEN/NOTIFY between instances (``comfyq.cluster.pg``).
"""

from comfyq.cluster.link import ClusterLink, LocalLink
from comfyq.cluster.model import Instance

__all__ = ["ClusterLink", "Instance", "LocalLink"]
