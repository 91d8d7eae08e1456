"""Workflow modifiers: ``BaseModifier`` and the modifiers shipped with comfyq.

Operators add their own modifiers by dropping ``*.py`` files with ``BaseModifier`` subclasses into
a folder the registry is told about; requests pick one by class name.
"""

from __future__ import annotations

from modifiers.basemodifier import (
    BaseModifier,
    MissingModification,
    ModificationError,
    ParamsError,
    WorkflowFileError,
    parse_params,
)
from modifiers.registry import ModifierRegistry

__all__ = [
    "BaseModifier",
    "MissingModification",
    "ModificationError",
    "ModifierRegistry",
    "ParamsError",
    "WorkflowFileError",
    "parse_params",
]
