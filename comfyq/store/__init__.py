"""The SQLite store: the queue, the job log and the outbox in one file."""

from comfyq.store.jobs import JobStore
from comfyq.store.model import Job, NewJob, Stage, State, Transition

__all__ = ["Job", "JobStore", "NewJob", "Stage", "State", "Transition"]
