"""ModifierRegistry: finds modifier classes by class name, and checks requests against them.

Modules are imported once, at construction, from the ``modifiers`` package folder and from folders
the operator names; requests only ever look names up in the resulting table, so nothing a client
sends decides what gets imported (the original wrapper imported ``modifiers.<name>`` on demand).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from comfyq.errors import BadRequest, ComfyqError, ModifierError
from modifiers.basemodifier import (
    DEFAULT_WORKFLOWS_DIR,
    BaseModifier,
    ModificationError,
    ParamsError,
    WorkflowFileError,
)

log = logging.getLogger("comfyq.modifiers")

_PACKAGE_DIR = Path(__file__).resolve().parent
BUILTIN_MODIFIERS_DIR = _PACKAGE_DIR
_NOT_MODIFIER_MODULES = frozenset({"__init__", "basemodifier", "registry"})
_MAX_MESSAGE = 500


def _field_path(key: str) -> str:
    if key.isidentifier():
        return f"$.input.modifications.{key}"
    return "$.input.modifications[" + repr(key) + "]"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class ModifierInfo:
    """A typed modifier as the API documents it."""

    name: str
    params: type[Any]
    description: str
    example: dict[str, Any] | None


class ModifierRegistry:
    """The table of modifier classes by class name (built-ins plus operator folders)."""

    def __init__(
        self, extra_dirs: Sequence[Path] = (), *, workflow_dirs: Sequence[Path] = ()
    ) -> None:
        self._classes: dict[str, type[BaseModifier]] = {}
        self.workflow_dirs: tuple[Path, ...] = tuple(Path(d) for d in workflow_dirs) + (
            DEFAULT_WORKFLOWS_DIR,
        )
        for stem in self._module_stems(_PACKAGE_DIR):
            self._collect(importlib.import_module(f"modifiers.{stem}"), builtin=True)
        for folder in extra_dirs:
            self._load_folder(Path(folder))

    # --- discovery -------------------------------------------------------------------------

    @staticmethod
    def _module_stems(folder: Path) -> list[str]:
        return sorted(
            p.stem
            for p in folder.glob("*.py")
            if p.stem not in _NOT_MODIFIER_MODULES
            and not p.stem.startswith("_")
            and p.stem.isidentifier()
        )

    def _load_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ModifierError(f"modifier folder {folder} does not exist")
        tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
        for stem in self._module_stems(folder):
            path = folder / f"{stem}.py"
            name = f"comfyq_user_modifiers_{tag}.{stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ModifierError(f"cannot load modifier file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(name, None)
                raise ModifierError(
                    f"modifier file {path} failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            self._collect(module, builtin=False)

    def _collect(self, module: ModuleType, *, builtin: bool) -> None:
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseModifier)
                and obj is not BaseModifier
                and obj.__module__ == module.__name__
                and not obj.__name__.startswith("_")
            ):
                previous = self._classes.get(obj.__name__)
                if previous is not None and previous is not obj:
                    log.warning(
                        "modifier %s from %s replaces the one from %s",
                        obj.__name__,
                        module.__name__,
                        previous.__module__,
                    )
                self._classes[obj.__name__] = obj

    # --- lookup ----------------------------------------------------------------------------

    def typed(self) -> list[ModifierInfo]:
        """The modifiers that declare ``Params`` (those get a schema and a /workflows route)."""
        out = []
        for name in self.names():
            cls = self._classes[name]
            if cls.Params is not None:
                doc = (cls.__doc__ or "").strip() or f"Run the {name} workflow"
                out.append(ModifierInfo(name, cls.Params, doc, cls.EXAMPLE))
        return out

    def names(self) -> list[str]:
        """The available modifier class names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type[BaseModifier]:
        """The modifier class called ``name``; BadRequest listing the others if none."""
        if isinstance(name, str) and name in self._classes:
            return self._classes[name]
        available = ", ".join(self.names()) or "none"
        shown = repr(name)[:100]
        hint = ""
        if isinstance(name, str):
            close = [n for n in self._classes if n.lower() == name.lower()]
            if close:
                hint = f" (names are case-sensitive: did you mean {close[0]}?)"
        message = f"unknown modifier {shown}{hint}; available: {available}"
        raise BadRequest(
            message,
            fields=[{"path": "$.input.modifier", "message": message}],
            details={"available": self.names()},
        )

    def create(self, name: str, modifications: dict[str, Any] | None) -> BaseModifier:
        """A new instance of modifier ``name`` for these modifications."""
        modifier = self.get(name)(modifications or {})
        modifier.workflow_dirs = self.workflow_dirs
        return modifier

    # --- admission -------------------------------------------------------------------------

    async def check(self, name: str, modifications: dict[str, Any] | None) -> None:
        """Dry-run the modifier (no downloads); BadRequest for unknown or bad modifications."""
        cls = self.get(name)
        if modifications is None:
            modifications = {}
        if not isinstance(modifications, dict):
            raise BadRequest(
                "modifications must be an object",
                fields=[{"path": "$.input.modifications", "message": "must be an object"}],
            )
        if cls.Params is not None:
            # Typed: every unknown key at once, then types and ranges (the Struct), all before any
            # workflow is built; the dry run below then only checks rules across parameters.
            fields = {f.encode_name for f in msgspec.structs.fields(cls.Params)}
            self._refuse_unknown(name, [k for k in modifications if k not in fields], fields)
        try:
            modifier = self.create(name, modifications)
            await modifier.get_modified_workflow()
        except ParamsError as exc:
            path = "$.input.modifications" + (f".{exc.key}" if exc.key else "")
            raise BadRequest(exc.message, fields=[{"path": path, "message": exc.message}]) from None
        except ModificationError as exc:
            raise BadRequest(
                exc.message, fields=[{"path": _field_path(exc.key), "message": exc.message}]
            ) from None
        except WorkflowFileError as exc:
            # The operator's installation is broken, not the request.
            raise ModifierError(f"modifier {name}: {exc}") from None
        except ComfyqError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code must not kill us
            message = _short(
                f"modifier {name} rejected the modifications: {type(exc).__name__}: {exc}"
            )
            raise BadRequest(
                message, fields=[{"path": "$.input.modifications", "message": message}]
            ) from None
        if cls.Params is not None:
            return
        accepted = set(cls.ACCEPTS) if cls.ACCEPTS is not None else modifier.modifications.accessed
        self._refuse_unknown(name, [k for k in modifications if k not in accepted], accepted)

    @staticmethod
    def _refuse_unknown(name: str, unknown: list[str], accepted: set[str]) -> None:
        if unknown:
            known = ", ".join(sorted(accepted)) or "none"
            message = (
                f"unknown modification{'s' if len(unknown) > 1 else ''} for {name}: "
                f"{', '.join(unknown)} (accepted: {known})"
            )
            raise BadRequest(
                message,
                fields=[
                    {"path": _field_path(k), "message": f"unknown modification for {name}"}
                    for k in unknown
                ],
                details={"unknown": unknown, "accepted": sorted(accepted)},
            )
