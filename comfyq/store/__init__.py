"""The store: one interface (``JobStore``), the shared model, and two adapters (sqlite, postgres).

``open_store(database)`` returns the adapter that the database setting names.
"""

from comfyq.store.base import (
    Attempt,
    JobReads,
    JobStore,
    StoreError,
    StoreUnavailable,
)
from comfyq.store.factory import open_store
from comfyq.store.model import Job, NewJob, Stage, State, Transition

__all__ = [
    "Attempt",
    "Job",
    "JobReads",
    "JobStore",
    "NewJob",
    "Stage",
    "State",
    "StoreError",
    "StoreUnavailable",
    "Transition",
    "open_store",
]
