"""The store: one interface (``JobStore``), the shared model, and two adapters (sqlite, postgres).

``JobStore(database)`` returns the adapter that the database setting names.
"""

from comfyq.store.base import (
    Attempt,
    JobReads,
    JobStore,
    StoreError,
    StoreUnavailable,
    open_store,
)
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
